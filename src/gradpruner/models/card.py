"""The model card (README.md with Hugging Face Hub front matter) of every folder gradpruner saves.

The card is written from the provenance files in the folder — ``gradpruner.json`` (the prune: plan,
merge rule, source), ``heal.json`` (the heal), ``finetune.json`` (the fine-tune) and
``gradpruner_results.json`` (evaluations, when a run measured them) — so it says what was done to the
checkpoint wherever the folder travels. ``base_model`` is the Hub id of the model everything started
from, when it is known: an alias's Hub original, a Hub id given as the model, or the ``base_model`` a
gradpruner folder given as the model recorded.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from gradpruner.util.atomic import atomic_file, write_json

CARD = "README.md"
RESULTS = "gradpruner_results.json"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def base_model_id(spec: str, hub_ids: dict[str, str]) -> str | None:
    """The Hub id a model given as ``spec`` started from: ``hub_ids[spec]`` for an alias, ``spec`` itself
    for a Hub id, the recorded ``base_model`` of a local gradpruner folder, else None (a local model
    whose origin is not recorded)."""
    if spec in hub_ids:
        return hub_ids[spec]
    path = Path(spec).expanduser()
    if path.is_dir():
        for name in ("gradpruner.json", "finetune.json"):
            try:
                found = json.loads((path / name).read_text()).get("base_model")
            except (OSError, ValueError, AttributeError):
                continue
            if found:
                return found
        return None
    return spec if HUB_ID.match(spec) and not path.exists() else None


def _read(folder: Path, name: str) -> dict | None:
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _ranges(xs: list[int]) -> str:
    xs, out, start = sorted(xs), [], None
    for i, x in enumerate(xs):
        start = x if start is None else start
        if i == len(xs) - 1 or xs[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}–{x}")
            start = None
    return ", ".join(out) or "none"


def _prune_lines(p: dict) -> list[str]:
    plan = p.get("plan") or {}
    n, drop, merge = plan.get("num_layers"), plan.get("drop") or [], plan.get("merge") or {}
    lines = [f"- **Pruned**: {len(drop)} of {n} decoder layers removed (layers {_ranges(drop)}, counted from 0), "
             f"{len(plan.get('keep') or [])} kept; selection: `{plan.get('score_rule') or plan.get('method') or '?'}`."]
    if merge:
        pairs = ", ".join(f"{k} → {v}" for k, v in sorted(merge.items(), key=lambda kv: int(kv[0])))
        lines.append(f"- **Merged** into the kept layer named ({p.get('merge_rule')}, density {p.get('density')}): {pairs}.")
    moved = plan.get("mlp_from") or {}
    if moved:
        pairs = ", ".join(f"{k} ← {v}" for k, v in sorted(moved.items(), key=lambda kv: int(kv[0])))
        lines.append(f"- **MLP blocks moved** (attention and MLP blocks removed in pairs; kept layer ← the removed "
                     f"layer whose MLP it now has): {pairs}.")
    params = plan.get("params") or {}
    if params.get("removed_fraction") is not None:
        lines.append(f"- Parameters: {params['total_after']:,} of {params['total_before']:,} "
                     f"({1 - params['removed_fraction']:.3f}×).")
    return lines


def _heal_lines(h: dict) -> list[str]:
    loss = h.get("loss") or {}
    text = f"- **Healed** (`{h.get('rule')}`): a linear map folded into the layer before each cut, no new parameters"
    if loss.get("before") is not None and loss.get("after") is not None:
        text += f"; held-out loss {loss['before']:.3f} → {loss['after']:.3f} (dense {loss.get('dense', float('nan')):.3f})"
    return [text + "."]


def _finetune_lines(f: dict) -> list[str]:
    c = f.get("config") or {}
    what = f.get("task") or f.get("data") or "the user's data"
    return [f"- **Fine-tuned** on {what}: mode `{c.get('mode')}`, {f.get('optimizer_steps')} optimizer steps of batch "
            f"{c.get('batch_size')} (≈{f.get('epochs_done', 0):.2f} epochs), lr {c.get('lr')}; final loss "
            f"{f.get('final_loss', float('nan')):.4f}."]


def _result_lines(results: dict) -> list[str]:
    rows = [f"| {r.get('label', name)} | {r.get('task')} | {r.get('metric')} | {r.get('value', float('nan')):.4f} | {r.get('n')} |"
            for name, r in results.items()]
    return ["", "## Measured results", "", "| model | task | metric | value | items |", "|---|---|---|---|---|", *rows]


def card_text(folder: Path) -> str:
    """The card of ``folder`` from the provenance files it holds."""
    folder = Path(folder)
    prune, heal, ft, results = (_read(folder, n) for n in ("gradpruner.json", "heal.json", "finetune.json", RESULTS))
    base = next((d.get("base_model") for d in (prune, ft, heal) if d and d.get("base_model")), None)
    tags = ["gradpruner", "pruned", "layer-pruning"] if prune else ["gradpruner"]
    tags += (["healed"] if heal else []) + (["fine-tuned"] if ft else [])
    front = {**({"base_model": base} if base else {}), "library_name": "transformers", "pipeline_tag": "text-generation",
             "tags": tags}
    body = ["# " + (f"{base.split('/')[-1]}, " if base else "") + ("pruned by gradpruner" if prune else "fine-tuned by gradpruner"),
            "", "A standard Hugging Face checkpoint: `AutoModelForCausalLM.from_pretrained` (and vLLM, or llama.cpp after a "
            "GGUF conversion) load it without gradpruner.", "", "## What was done", ""]
    if base is None:
        body.append("- Started from a local model whose Hub origin is not recorded.")
    else:
        body.append(f"- Started from [{base}](https://huggingface.co/{base}).")
    body += (_prune_lines(prune) if prune else []) + (_heal_lines(heal) if heal else []) + (_finetune_lines(ft) if ft else [])
    versions = next((d.get("versions") for d in (ft, heal, prune) if d and d.get("versions")), None)
    if versions:
        body.append("- Made with " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".")
    if results:
        body += _result_lines(results)
    body += ["", "Provenance files beside this card: " + ", ".join(
        f"`{n}`" for n in ("gradpruner.json", "heal.json", "finetune.json", RESULTS) if (folder / n).is_file()) + "."]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body) + "\n"


def write_card(folder: Path) -> Path:
    """Write (or rewrite) README.md in ``folder`` from its provenance files, atomically."""
    path = Path(folder) / CARD
    with atomic_file(path) as fh:
        fh.write(card_text(folder))
    return path


def add_results(folder: Path, results: dict[str, dict]) -> Path:
    """Record evaluations of (and beside) the model in ``folder`` and rewrite its card with them: ``results``
    maps a label to an ``evaluate`` result."""
    keep = ("task", "metric", "value", "n", "offset", "limit")
    write_json(Path(folder) / RESULTS, {label: {k: r.get(k) for k in keep} | {"label": label}
                                        for label, r in results.items()})
    return write_card(folder)


def front_matter(text: str) -> dict:
    """The YAML front matter of a card (what the Hub reads)."""
    if not text.startswith("---\n"):
        return {}
    return yaml.safe_load(text[4:text.index("\n---\n", 4)]) or {}
