"""Command line: a thin layer over ``gradpruner.api``. Errors print one message and exit 2."""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import sys
import traceback
from pathlib import Path

from gradpruner.errors import GradPrunerError
from gradpruner.evaluation.config import EvalConfig
from gradpruner.finetuning.config import FinetuneConfig
from gradpruner.healing.config import HealConfig
from gradpruner.models.runtime import RuntimeConfig
from gradpruner.pipeline.config import SearchConfig
from gradpruner.planning.config import DEFAULT_PRUNE, PlanConfig
from gradpruner.pruning.config import PruneConfig
from gradpruner.scoring.catalog import methods_help
from gradpruner.scoring.config import ScoreConfig
from gradpruner.util.options import add_options, cli_fields, defaults, from_args


def _add_model(p, required=True):
    p.add_argument("--model", required=required, help="local HF folder, .gguf file, alias (smollm2-135m, gemma3-270m) or Hub id")
    _add_runtime(p)


def _add_runtime(p) -> None:
    """The same runtime flags (device, dtype, attention kernel, what loading trusts) on every command that
    holds a model."""
    add_options(p.add_argument_group("runtime (where models run)"), RuntimeConfig)


def _runtime(args) -> RuntimeConfig:
    return from_args(RuntimeConfig, args)


def _add_out(p, help_text):
    p.add_argument("--out", required=True, help=help_text)
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists")


DATA_DIR_HELP = ("folder with the task folders (arc_easy/, piqa/, ...), or hub to read the task from the Hugging "
                 "Face Hub (default: $GRADPRUNER_DATA_DIR, else the data shipped in the package, ARC-Easy)")


def _add_data(p, required: bool) -> None:
    src = p.add_mutually_exclusive_group(required=required)
    src.add_argument("--task", help="built-in task: arc_easy, piqa, hellaswag, winogrande, medmcqa, pubmedqa, "
                     "fingpt_sentiment, billsum")
    src.add_argument("--data", help='JSONL file of {"prompt","completion"} or {"text"} lines')
    p.add_argument("--data-dir", help=DATA_DIR_HELP)


def _add_runtime_overrides(p) -> None:
    """The runtime flags for commands driven by a config: a flag typed overrides the config's runtime:
    section (runtime.device=…), a flag not typed leaves it in force."""
    add_options(p.add_argument_group("runtime (where models run; overrides the config's runtime: section)"),
                RuntimeConfig, typed_only=True)


def _typed_overrides(section: str, cls, args) -> list[str]:
    """``section.key=value`` run-config overrides for the flags of ``cls`` the user typed (added with
    ``typed_only``: a flag not typed is absent from ``args``)."""
    import json

    return [f"{section}.{f.name}={json.dumps(getattr(args, f.name))}" for f in cli_fields(cls) if hasattr(args, f.name)]


def _runtime_overrides(args) -> list[str]:
    return _typed_overrides("runtime", RuntimeConfig, args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="gradpruner", description="Prune a fine-tuned LLM for one task with early LoRA gradients.")
    ap.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = ap.add_subparsers(dest="command", required=True)

    s = sub.add_parser("score", help="score every decoder layer: IGIA from T early LoRA steps, or a baseline method",
                       epilog=methods_help(), formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model(s)
    _add_data(s, required=True)
    s.add_argument("--prune", type=int, help="layers the plan will remove: sizes the guard of igia_guarded and the pools "
                   f"of greedy_loss and igia_greedy, and tells laco and the greedy search when to stop (default "
                   f"{DEFAULT_PRUNE}, the plan's default)")
    add_options(s, ScoreConfig)
    s.add_argument("--seed", type=int, default=0)
    _add_out(s, "folder for scores.json, igia.safetensors and layer_scores.png")

    p = sub.add_parser("plan", help="choose layers to drop and merge from scores.json (plan.json)")
    p.add_argument("--scores", required=True, help="scores.json written by `gradpruner score`")
    p.add_argument("--model", help="the model the scores came from: --target-latency and --target-memory measure it")
    _add_runtime(p)
    add_options(p, PlanConfig)
    p.set_defaults(prune=None)  # so that a target alone is not mixed with the default count
    _add_out(p, "plan.json to write")

    r = sub.add_parser("prune", help="merge and remove layers per plan.json; save a standard checkpoint")
    _add_model(r)
    r.add_argument("--plan", required=True, help="plan.json (from `gradpruner plan` or written by hand)")
    r.add_argument("--igia", help="igia.safetensors (default: beside the plan's scores file)")
    add_options(r, PruneConfig)
    r.add_argument("--in-memory", dest="out_of_core", action="store_false", help="load the whole model (= --no-out-of-core)")
    r.add_argument("--heal", default=defaults(HealConfig)["rule"], metavar="RULE",
                   help="heal the pruned model in the same command with this heal rule and the other heal settings' "
                   "defaults: none (default), lstsq or trained; needs --task or --data (see docs/heal.md)")
    _add_data(r, required=False)
    _add_out(r, "folder for the pruned (with --heal: healed) checkpoint")

    h = sub.add_parser("heal", help="fold a linear map across each cut of a pruned model (ReplaceMe); save a checkpoint "
                       "and heal.json")
    _add_model(h)
    h.add_argument("--pruned", required=True, help="the pruned model (same kinds of input as --model, the dense one)")
    h.add_argument("--plan", required=True, help="plan.json that made --pruned from --model")
    _add_data(h, required=True)
    add_options(h, HealConfig)
    _add_out(h, "folder for the healed checkpoint and heal.json")

    f = sub.add_parser("finetune", help="fine-tune a (pruned) model on the task: LoRA merged into the weights, full, or the last layers")
    _add_model(f)
    _add_data(f, required=True)
    add_options(f, FinetuneConfig)
    f.add_argument("--resume", action="store_true", help="continue from the last checkpoint in OUT.checkpoints/")
    _add_out(f, "folder for the fine-tuned checkpoint")

    e = sub.add_parser("eval", help="evaluate a model on a task's held-out split or a JSONL file")
    _add_model(e)
    e.add_argument("--task", help="built-in task; with --data, a file of that task's own rows")
    e.add_argument("--data", help="JSONL to evaluate (prompt/completion lines, or the task's rows with --task)")
    e.add_argument("--data-dir", help=DATA_DIR_HELP)
    add_options(e, EvalConfig)
    e.add_argument("--train-data", help="your training JSONL: refuse to evaluate on examples that overlap it")
    e.add_argument("--seed", type=int, default=0, help="seed of the deterministic task split")
    e.add_argument("--details", action="store_true", help="keep per-item results in --out")
    e.add_argument("--harness", help="instead: lm-evaluation-harness task(s), comma-separated (e.g. arc_easy,piqa), run by "
                   "the harness itself on the model folder (needs lm-eval and, for its own tasks, the Hub)")
    e.add_argument("--harness-include", help="folder of harness task YAML files of your own (the harness's --include_path)")
    e.add_argument("--out", help="JSON file for the result")
    e.add_argument("--overwrite", action="store_true")

    ru = sub.add_parser("run", help="the whole pipeline from one YAML config (see docs/config.md)")
    ru.add_argument("config", help="YAML config, e.g. configs/demo.yaml")
    ru.add_argument("overrides", nargs="*", help="key=value overrides, e.g. finetune.max_steps=50")
    _add_runtime_overrides(ru)

    c = sub.add_parser("compare", help="a grid of runs (methods × tasks or an ablation) and its comparison table")
    c.add_argument("config", help="compare config, e.g. experiments/methods_and_ablations/compare_methods.yaml (see docs/commands.md#compare)")
    c.add_argument("overrides", nargs="*", help="key=value overrides applied to every cell")
    _add_runtime_overrides(c)
    c.add_argument("--dry-run", action="store_true", help="validate the grid and list its cells, run nothing")
    c.add_argument("--table-only", action="store_true", help="rewrite the table from the cells finished so far, run nothing")

    sr = sub.add_parser("search", help="how many layers can go: the largest removal whose metric (or loss) stays within a "
                        "tolerance of the dense model's, both fine-tuned alike; writes the curve and plan.json")
    sr.add_argument("overrides", nargs="*", help="key=value run-config overrides, e.g. score.method=block_influence")
    sr.add_argument("--config", help="run config YAML whose settings (and search: section) the search starts from")
    sr.add_argument("--model", help="local HF folder, .gguf file, alias or Hub id (default: the config's)")
    sr.add_argument("--task", help="built-in task (default: the config's)")
    sr.add_argument("--data", help='JSONL of {"prompt","completion"} lines (instead of --task; needs --eval-data)')
    sr.add_argument("--eval-data", help="held-out JSONL with --data; the validation slice is its last lines")
    sr.add_argument("--data-dir", help=DATA_DIR_HELP)
    sr.add_argument("--out", help="search folder: search.md, search.png, curve.csv, search.json, plan.json")
    _add_runtime_overrides(sr)
    # a search flag is absent unless typed, so one typed at its default still overrides the config's search:
    add_options(sr.add_argument_group("search"), SearchConfig, typed_only=True)

    se = sub.add_parser("sensitivity", help="how soon a layer ranking settles (paper Fig. 2): igia or full_grad scores.json")
    se.add_argument("scores", help="scores.json of an igia, igia_norm or full_grad run (uses the igia rule: mean of squared norms)")
    se.add_argument("--k", type=int, required=True, help="size of the layer set compared (e.g. the layers removed)")
    se.add_argument("--reference", help="scores.json of a longer run to compare against (default: the last step)")
    se.add_argument("--which", default="bottom", help="bottom (the k least important, default) or top")
    se.add_argument("--out", help="folder for sensitivity.json and sensitivity.png")

    b = sub.add_parser("bench", help="dense vs pruned side by side: parameters, FLOPs, latency, throughput, memory, "
                       "training step; medians and pruned/dense ratios (see docs/bench.md)")
    _add_model(b)
    b.add_argument("--pruned", required=True, help="the pruned model (same kinds of input as --model)")
    b.add_argument("--seq", type=int, nargs="+", default=[128, 512], help="prompt lengths (default 128 512)")
    b.add_argument("--batch", type=int, nargs="+", default=[1, 4], help="batch sizes (default 1 4)")
    b.add_argument("--reps", type=int, default=5, help="timed runs of each model, alternating (default 5)")
    b.add_argument("--warmup", type=int, default=1, help="untimed runs of each model first (default 1)")
    b.add_argument("--new-tokens", type=int, default=16, help="tokens decoded with the KV cache (default 16)")
    b.add_argument("--train-batch", type=int, default=4, help="training batch, LoRA and full alike (default 4)")
    b.add_argument("--train-seq", type=int, default=128, help="training sequence length (default 128)")
    b.add_argument("--rank", type=int, default=8, help="LoRA rank of the training step (default 8)")
    for part in ("inference", "memory", "train"):
        b.add_argument(f"--skip-{part}", action="store_true", help=f"do not measure {part}")
    b.add_argument("--out", help="folder for bench.json and bench.md")
    b.add_argument("--overwrite", action="store_true", help="replace --out if it exists")

    x = sub.add_parser("export", help="write a model folder (a pruned one, say) as one file for another runtime: GGUF "
                       "for llama.cpp (see docs/export.md)")
    x.add_argument("--model", required=True, help="local model folder with safetensors weights and its tokenizer, e.g. "
                   "the --out of prune, heal or finetune")
    x.add_argument("--format", default="gguf", help="file format: gguf (default, for llama.cpp; the only one so far)")
    x.add_argument("--type", default="f16", help="tensor type: f32, f16 (default) or q8_0 (8-bit blocks; vectors stay "
                   "float32)")
    _add_out(x, "the file to write, e.g. model.gguf")

    rp = sub.add_parser("report", help="(re)write report.md and report.html of a run folder")
    rp.add_argument("run_dir")

    d = sub.add_parser("demo", help="the pipeline on SmolLM2-135M and ARC-Easy (≈15 min on 2 CPU cores)")
    d.add_argument("--out", default="runs/demo", help="run folder (finished stages are reused)")
    d.add_argument("overrides", nargs="*", help="key=value overrides of the demo config")
    return ap


def _run(args) -> int:
    from gradpruner import api

    if args.command == "score":
        res = api.score(args.model, args.out, task=args.task, data=args.data, data_dir=args.data_dir,
                        config=from_args(ScoreConfig, args), seed=args.seed, target=args.prune,
                        overwrite=args.overwrite, runtime=_runtime(args))
        from gradpruner.report.plots import score_bars

        print(score_bars(res["layer_scores"]))
        if "informative_steps" in res:
            print(f"{res['steps']} steps ({res['informative_steps']} informative: step 1 has no signal since LoRA B starts at 0)")
        print(f"method {res['method']}; wrote {args.out}")
    elif args.command == "plan":
        from gradpruner.planning.plans import plan_summary

        given = vars(from_args(PlanConfig, args))
        if given["prune"] is None:  # not given: the API applies the default count unless target_params is given
            del given["prune"]
        res = api.plan(args.scores, args.out, model=args.model, overwrite=args.overwrite, runtime=_runtime(args), **given)
        print(plan_summary(res))
        if "target" in res:
            t = res["target"]
            print(f"measured: {t['latency']} latency {t['measured']:.3f} of the dense model's" if t["kind"] == "latency"
                  else f"weights {t['bytes_after'] / 1024 ** 3:.3f} GiB (dense {t['bytes_before'] / 1024 ** 3:.3f} GiB)")
        print(f"wrote {args.out}")
    elif args.command == "prune":
        res = api.prune(args.model, args.plan, args.out, igia=args.igia, config=from_args(PruneConfig, args),
                        heal=args.heal, task=args.task, data=args.data, data_dir=args.data_dir, overwrite=args.overwrite,
                        runtime=_runtime(args))
        if "heal" in res:
            print(_heal_summary(res["heal"]))
        print(f"wrote {args.out}")
    elif args.command == "heal":
        res = api.heal(args.model, args.pruned, args.out, args.plan, task=args.task, data=args.data,
                       data_dir=args.data_dir, config=from_args(HealConfig, args), overwrite=args.overwrite,
                       runtime=_runtime(args))
        print(_heal_summary(res))
        print(f"wrote {args.out}")
    elif args.command == "finetune":
        from gradpruner.finetuning.finetune import finetune

        rec = finetune(args.model, args.out, task=args.task, data=args.data, data_dir=args.data_dir,
                       config=from_args(FinetuneConfig, args), resume=args.resume, overwrite=args.overwrite,
                       runtime=_runtime(args))
        print(f"wrote {args.out} ({rec['optimizer_steps']} optimizer steps, {rec['wall_seconds']:.0f} s, "
              f"final loss {rec['final_loss']:.4f})")
    elif args.command == "eval" and args.harness:
        from gradpruner.evaluation.harness import (
            format_harness,
            run_harness,
            save_harness,
        )
        from gradpruner.models.loading import resolve_model
        from gradpruner.util.atomic import check_output

        if args.out:
            check_output(args.out, args.overwrite)
        res = run_harness(resolve_model(args.model), [t.strip() for t in args.harness.split(",") if t.strip()],
                          limit=args.limit, batch_size=args.batch_size, include=args.harness_include,
                          runtime=_runtime(args))
        if args.out:
            save_harness(res, args.out)
        print(format_harness(res) + (f"\nwrote {args.out}" if args.out else ""))
    elif args.command == "eval":
        from gradpruner.evaluation.evaluate import evaluate

        res = evaluate(args.model, task=args.task, data=args.data, data_dir=args.data_dir,
                       config=from_args(EvalConfig, args), train_data=args.train_data, seed=args.seed,
                       details=args.details, out=args.out, overwrite=args.overwrite, runtime=_runtime(args))
        extra = ", ".join(f"{k} {v:.4f}" for k, v in res["metrics"].items() if isinstance(v, (int, float)))
        print(f"{res['task'] or res['data']}: {res['metric']} = {res['value']:.4f} on {res['n']} items; {extra}"
              + (f"; wrote {args.out}" if args.out else ""))
    elif args.command == "run":
        from gradpruner.pipeline.config import load_config
        from gradpruner.pipeline.run import run

        run(load_config(args.config, args.overrides + _runtime_overrides(args)))
    elif args.command == "compare":
        from gradpruner.pipeline.compare import (
            load_grid,
            reference_of,
            run_grid,
            write_table,
        )

        if args.table_only:
            out, cells = load_grid(args.config, args.overrides + _runtime_overrides(args))
            print(f"wrote {write_table(out, cells, reference_of(args.config))}")
        elif args.dry_run:
            out, cells = load_grid(args.config, args.overrides + _runtime_overrides(args))
            print("\n".join(f"  {Path(cfg.out).name}" for _, cfg in cells) + f"\n{len(cells)} cells -> {out}")
        else:
            print(f"wrote {run_grid(args.config, args.overrides + _runtime_overrides(args))}")
    elif args.command == "search":
        from gradpruner.pipeline.config import load_config
        from gradpruner.pipeline.search import search

        search(load_config(args.config, _search_overrides(args)))
    elif args.command == "sensitivity":
        from gradpruner.scoring.sensitivity import format_curve, sensitivity

        print(format_curve(sensitivity(args.scores, args.k, args.reference, args.which, args.out)))
    elif args.command == "bench":
        from gradpruner.measure.bench import PARTS, bench_models, format_table

        res = bench_models(args.model, args.pruned, seqs=args.seq, batches=args.batch, reps=args.reps,
                           warmup=args.warmup, new_tokens=args.new_tokens, train_batch=args.train_batch,
                           train_seq=args.train_seq, rank=args.rank,
                           parts=[p for p in PARTS if not getattr(args, f"skip_{p}")], runtime=_runtime(args),
                           out=args.out, overwrite=args.overwrite)
        print(format_table(res))
        if args.out:
            print(f"wrote {args.out}")
    elif args.command == "export":
        from gradpruner.errors import lookup
        from gradpruner.export import FORMATS

        res = lookup(FORMATS, args.format, "export format")(args.model, args.out, args.type, overwrite=args.overwrite)
        print(f"wrote {res['out']}: {res['architecture']}, {res['layers']} layers, {res['type']}, "
              f"{res['bytes'] / 2 ** 20:.1f} MiB; tokenizer {res['tokenizer']}, pre-tokenizer {res['pre']}")
    elif args.command == "report":
        from gradpruner.report.run_report import write_report

        print(f"wrote {write_report(args.run_dir)}")
    elif args.command == "demo":
        from gradpruner.pipeline.demo import run_demo

        run_demo(args)
    return 0


def _search_overrides(args) -> list[str]:
    """The flags given to ``search`` as run-config overrides (a search flag only when typed, even at its
    default; the ones not typed leave a config's search: section in force), then the key=value overrides."""
    import json

    out = [f"{key}={json.dumps(getattr(args, key))}" for key in ("model", "task", "data", "eval_data", "data_dir", "out")
           if getattr(args, key) is not None]
    if args.data is not None and args.task is None:
        out.append("task=null")
    if args.out is None and args.config is None:
        out.append("out=runs/search")
    return out + _typed_overrides("search", SearchConfig, args) + list(args.overrides) + _runtime_overrides(args)


def _heal_summary(res: dict) -> str:
    def f(x):
        return "–" if x is None else f"{x:.4f}"

    lines = [f"cut {c['removed']}: {c['status']}, hidden-state error {f(c['error_before'])} → {f(c['error_after'])}"
             for c in res["cuts"]]
    loss = res["loss"]
    lines.append(f"held-out loss {f(loss['before'])} → {f(loss['after'])} (dense {f(loss['dense'])}), rule {res['rule']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # before any torch import: --help and usage errors answer at once
    from gradpruner.util.distributed import is_main

    logging.basicConfig(level=logging.INFO if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if not is_main():  # torchrun / accelerate launch: every process gets the same result; process 0 speaks
            with contextlib.redirect_stdout(io.StringIO()):
                return _run(args)
        return _run(args)
    except KeyboardInterrupt:
        print("gradpruner: interrupted; outputs of this command were not written.", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - only the kinds _user_error recognises are handled
        message = _user_error(exc)
        if message is None:
            raise
        if args.debug:
            traceback.print_exc()
        if is_main() or args.debug:  # the other processes raise the same error (see distributed.on_main)
            print(f"gradpruner: error: {message}", file=sys.stderr)
        return 2


def _user_error(exc: BaseException) -> str | None:
    """The message for an error that is the user's input or machine, not a bug; None for anything else."""
    from gradpruner.errors import disk_full

    if isinstance(exc, GradPrunerError):
        return str(exc)
    if disk_full(exc):
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        return f"The disk is full{where}; free space (or choose another --out) and run again, nothing half-written was kept."
    torch = sys.modules.get("torch")
    if isinstance(exc, MemoryError) or (torch is not None and isinstance(exc, torch.OutOfMemoryError)):
        return ("Ran out of memory; lower --batch-size or --max-length (or use a machine with more memory) and run "
                "again, nothing half-written was kept.")
    return None


if __name__ == "__main__":
    sys.exit(main())
