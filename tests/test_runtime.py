"""The one runtime (device, dtype): resolved once, taken by every stage that holds a model.

No GPU runs here, so the GPU path is checked with a stand-in accelerator: the ``meta`` device. A stage
run with ``Runtime(meta, bfloat16)`` must put its model's weights there in bfloat16 and send its input
ids there too; a spy on every embedding call (a global forward pre-hook) records what reached the model
and stops the stage. A stage that leaves its model or its inputs on the CPU, or in float32 — the bugs
of evaluation always running on the CPU, or healing choosing CUDA on its own — fails these tests.
Trainer-based stages (IGIA scoring, fine-tuning) are checked through the ``TrainingArguments`` and the
model they hand to the Trainer.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import write_jsonl

from gradpruner import api
from gradpruner.cli import main
from gradpruner.errors import GradPrunerError
from gradpruner.models.runtime import Runtime, RuntimeConfig, resolve

pytestmark = pytest.mark.usefixtures("one_thread")

META_BF16 = Runtime(torch.device("meta"), torch.bfloat16)


class Seen(Exception):
    """Raised by the spy once the model was called: what reached it is in ``calls``."""


@pytest.fixture
def spy():
    """Every embedding call's (input device, weight device, weight dtype); the first call stops the stage."""
    calls = []

    def hook(module, args):
        if isinstance(module, torch.nn.Embedding):
            calls.append((args[0].device.type, module.weight.device.type, module.weight.dtype))
            raise Seen

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    yield calls
    handle.remove()


def _on_meta_bf16(calls):
    assert calls, "the stage never called its model"
    assert calls[0] == ("meta", "meta", torch.bfloat16), f"input/weights/dtype: {calls[0]}"


# --- resolving --------------------------------------------------------------------------------

def test_auto_on_a_machine_without_a_gpu_is_the_cpu_in_float32(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    rt = resolve()
    assert (rt.device, rt.dtype) == (torch.device("cpu"), torch.float32)
    assert rt.record() == {"device": "cpu", "dtype": "float32"}


def test_auto_on_a_gpu_is_this_process_gpu_in_bfloat16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setenv("LOCAL_RANK", "1")  # torchrun's second process takes the second GPU
    rt = resolve(RuntimeConfig())
    assert (rt.device, rt.dtype) == (torch.device("cuda", 1), torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a V100
    assert resolve().dtype == torch.float32
    with pytest.raises(GradPrunerError, match="does not support it"):
        resolve(RuntimeConfig(device="cuda:0", dtype="bfloat16"))
    with pytest.raises(GradPrunerError, match="asks for GPU 5 but 2 are visible"):
        resolve(RuntimeConfig(device="cuda:5"))


def test_bad_values_are_one_sentence_each(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GradPrunerError, match="no CUDA GPU is visible; use --device cpu"):
        resolve(RuntimeConfig(device="cuda"))
    with pytest.raises(GradPrunerError, match="Unknown --device 'tpu'"):
        resolve(RuntimeConfig(device="tpu"))
    with pytest.raises(GradPrunerError, match="Did you mean 'bfloat16'"):
        resolve(RuntimeConfig(dtype="bfloat61"))
    assert resolve(RuntimeConfig(dtype="bf16")).dtype == torch.bfloat16


def test_a_run_config_refuses_a_missing_gpu_before_any_stage(monkeypatch):
    from gradpruner.pipeline.config import config_from_dict

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(GradPrunerError, match="runtime: --device cuda was asked for"):
        config_from_dict({}, ["runtime.device=cuda"])
    assert config_from_dict({"runtime": {"dtype": "bfloat16"}}).runtime.dtype == "bfloat16"


def test_the_same_runtime_flags_on_every_command_that_holds_a_model():
    from gradpruner.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction)).choices
    for cmd in ("score", "plan", "prune", "heal", "finetune", "eval", "bench", "run", "compare", "search"):
        flags = {o for a in sub[cmd]._actions for o in a.option_strings}
        assert {"--device", "--dtype", "--attn-implementation", "--trust-remote-code", "--allow-pickle"} <= flags, cmd


def test_a_launch_starts_its_process_group_for_the_runtime_device(tiny_llama, monkeypatch):
    """Under torchrun the first start of the process group decides for the whole process (the Trainer
    reuses it): after a stage loaded its model, the group is started for that model's device, not for
    whatever GPU the machine has."""
    import accelerate

    from gradpruner.models.loading import load_model
    from gradpruner.util import distributed

    started = []
    monkeypatch.setattr(distributed, "_group_on_cpu", None)  # restored afterwards
    monkeypatch.setattr(accelerate, "PartialState", lambda **kw: started.append(kw))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU machine …
    for device, cpu in (("cpu", True), ("meta", False)):  # … running the CPU runtime, then an accelerator
        load_model(tiny_llama, Runtime(torch.device(device), torch.float32))
        distributed.ensure_group()
        assert started.pop() == {"cpu": cpu}


# --- every stage lands on the runtime's device and dtype ---------------------------------------

def test_eval_puts_model_and_inputs_on_the_runtime(tiny_llama, spy):
    from gradpruner.evaluation.evaluate import evaluate

    with pytest.raises(Seen):
        evaluate(str(tiny_llama), task="arc_easy", limit=2, batch_size=2, progress=False, runtime=META_BF16)
    _on_meta_bf16(spy)


def test_eval_cli_takes_device_and_dtype(tiny_llama, spy):
    with pytest.raises(Seen):
        main(["eval", "--model", str(tiny_llama), "--task", "arc_easy", "--limit", "2", "--device", "meta",
              "--dtype", "bfloat16"])
    _on_meta_bf16(spy)


def test_score_without_training_runs_its_batches_on_the_runtime(tiny_llama, qa_file, tmp_path, spy):
    with pytest.raises(Seen):
        api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="block_influence", calib_examples=4,
                  batch_size=2, runtime=META_BF16)
    _on_meta_bf16(spy)
    assert not (tmp_path / "s").exists()


def _capture_trainer(monkeypatch):
    """Stop at Trainer(...): keep its args and the model it was given. TrainingArguments' own checks are
    skipped (they refuse bfloat16 off the CPU on a machine without a GPU, which is this one)."""
    import transformers

    seen = {}
    monkeypatch.setattr(transformers.TrainingArguments, "__post_init__", lambda self: None)
    monkeypatch.setattr(transformers.TrainingArguments, "world_size", property(lambda self: 1))

    def init(self, model=None, args=None, **kwargs):  # read now: scoring unloads the adapters afterwards
        seen["args"], seen["devices"] = args, {p.device.type for p in model.parameters()}
        seen["frozen"], seen["adapters"] = _frozen_dtypes(model), _adapter_dtypes(model)
        seen["all"] = {p.dtype for p in model.parameters()}
        raise Seen

    monkeypatch.setattr(transformers.Trainer, "__init__", init)
    return seen


def _frozen_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if "lora_" not in n}


def _adapter_dtypes(model) -> set:
    return {p.dtype for n, p in model.named_parameters() if "lora_" in n}


def test_igia_scoring_trains_on_the_runtime(tiny_llama, qa_file, tmp_path, monkeypatch):
    seen = _capture_trainer(monkeypatch)
    with pytest.raises(Seen):
        api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="igia", steps=2, batch_size=2,
                  runtime=META_BF16)
    args = seen["args"]
    assert args.use_cpu is False and args.bf16 is True
    assert args.fp16 is False  # loss-scaled float16 gradients would be captured scaled
    assert seen["devices"] == {"meta"}
    assert seen["frozen"] == {torch.bfloat16} and seen["adapters"] == {torch.float32}


def test_full_grad_scoring_trains_float32_weights_on_the_runtime(tiny_llama, qa_file, tmp_path, monkeypatch):
    seen = _capture_trainer(monkeypatch)
    with pytest.raises(Seen):
        api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="full_grad", steps=2, batch_size=2,
                  runtime=META_BF16)
    assert seen["args"].use_cpu is False and seen["args"].bf16 is True and seen["args"].fp16 is False
    assert seen["devices"] == {"meta"} and seen["all"] == {torch.float32}  # trained weights stay float32


def test_cpu_runtime_trains_on_the_cpu(tiny_llama, qa_file, tmp_path, monkeypatch):
    seen = _capture_trainer(monkeypatch)
    with pytest.raises(Seen):
        api.score(str(tiny_llama), tmp_path / "s", data=qa_file, method="igia", steps=2, batch_size=2,
                  runtime=RuntimeConfig(device="cpu"))
    assert seen["args"].use_cpu is True and seen["args"].bf16 is False


@pytest.mark.parametrize("mode, frozen", [("lora", torch.bfloat16), ("full", None)])
def test_finetune_trains_on_the_runtime(tiny_llama, qa_file, tmp_path, monkeypatch, mode, frozen):
    from gradpruner.finetuning.finetune import finetune

    seen = _capture_trainer(monkeypatch)
    with pytest.raises(Seen):
        finetune(str(tiny_llama), tmp_path / "ft", data=qa_file, mode=mode, max_steps=1, batch_size=2,
                 progress=False, runtime=META_BF16)
    args = seen["args"]
    assert args.use_cpu is False and args.bf16 is True and args.fp16 is False
    assert seen["devices"] == {"meta"}
    if mode == "lora":
        assert seen["frozen"] == {frozen} and seen["adapters"] == {torch.float32}
    else:  # weights that are trained stay float32 under bfloat16 autocast
        assert seen["all"] == {torch.float32}
    assert not (tmp_path / "ft").exists()


def _tiny_plan(tmp_path: Path) -> Path:
    plan = {"num_layers": 8, "keep": [0, 1, 2, 4, 7], "drop": [3, 5, 6], "merge": {}}
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def test_heal_runs_both_models_on_the_runtime(tiny_llama, qa_file, tmp_path, spy):
    api.prune(str(tiny_llama), _tiny_plan(tmp_path), tmp_path / "pruned", runtime=RuntimeConfig(device="cpu"))
    with pytest.raises(Seen):
        api.heal(str(tiny_llama), tmp_path / "pruned", tmp_path / "healed", _tiny_plan(tmp_path), data=qa_file,
                 rule="lstsq", calib_examples=4, heldout_examples=2, max_length=32, runtime=META_BF16)
    _on_meta_bf16(spy)  # the dense model: forward passes only, in the runtime's dtype


def test_prune_in_memory_works_on_the_runtime_device_and_keeps_the_precision(tiny_llama, tmp_path, monkeypatch):
    from gradpruner.pruning import surgery

    seen = []
    real = surgery.remove_layers

    def spy_remove(model, keep):
        seen.append({p.device.type for p in model.parameters()})
        return real(model, keep)

    monkeypatch.setattr(surgery, "remove_layers", spy_remove)
    with pytest.raises(Exception):  # noqa: B017 - a meta model cannot be saved: the point is where it was
        api.prune(str(tiny_llama), _tiny_plan(tmp_path), tmp_path / "m", out_of_core=False, runtime=META_BF16)
    assert seen == [{"meta"}]
    res = api.prune(str(tiny_llama), _tiny_plan(tmp_path), tmp_path / "cpu", out_of_core=False,
                    runtime=RuntimeConfig(device="cpu", dtype="bfloat16"))
    assert res["runtime"] == {"device": "cpu", "dtype": "bfloat16"}
    from safetensors import safe_open

    with safe_open(str(tmp_path / "cpu" / "model.safetensors"), "pt") as f:  # the source's float32, not bf16
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}


def test_plan_latency_target_measures_on_the_runtime(tiny_llama, tiny_scores, tmp_path, spy):
    with pytest.raises(Seen):
        api.plan(tiny_scores / "scores.json", tmp_path / "plan.json", model=str(tiny_llama), target_latency=0.9,
                 runtime=META_BF16)
    _on_meta_bf16(spy)


def test_bench_runs_both_models_on_the_runtime(tiny_llama, tmp_path, spy):
    from gradpruner.measure.bench import bench_models

    api.prune(str(tiny_llama), _tiny_plan(tmp_path), tmp_path / "pruned", runtime=RuntimeConfig(device="cpu"))
    with pytest.raises(Seen):
        bench_models(tiny_llama, tmp_path / "pruned", seqs=[8], batches=[1], reps=1, warmup=1, new_tokens=1,
                     parts=["inference"], runtime=META_BF16)
    _on_meta_bf16(spy)


def test_harness_loads_on_the_runtime(tiny_llama, monkeypatch):
    pytest.importorskip("lm_eval")
    import lm_eval

    from gradpruner.evaluation.harness import run_harness

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        raise Seen

    monkeypatch.setattr(lm_eval, "simple_evaluate", fake)
    with pytest.raises(Seen):
        run_harness(tiny_llama, ["arc_easy"], runtime=META_BF16)
    assert seen["device"] == "meta" and seen["model_args"]["dtype"] == "bfloat16"


def test_run_pipeline_evaluates_on_the_runtime(tiny_llama, qa_file, tmp_path, spy):
    """`gradpruner run` with runtime.device set: its first model-holding stage (the dense zero-shot
    evaluation) gets the runtime, in the stage process as in this one."""
    from gradpruner.pipeline.config import config_from_dict
    from gradpruner.pipeline.run import run

    held = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "q?", "completion": " a"}] * 3)
    cfg = config_from_dict({"model": str(tiny_llama), "task": None, "data": str(qa_file), "eval_data": str(held),
                            "out": str(tmp_path / "run"), "runtime": {"device": "meta", "dtype": "bfloat16"},
                            "finetune": {"dense_baseline": False}})
    with pytest.raises(Seen):
        run(cfg, echo=lambda *a: None, isolate=False)
    _on_meta_bf16(spy)


# --- bfloat16 end to end on the CPU, against float32 -------------------------------------------

def test_bfloat16_loglikelihoods_agree_with_float32(tiny_llama):
    """Per-choice log-likelihoods of a tiny model in bfloat16 vs float32 on the CPU: within 2% of their
    size (bfloat16 keeps 8 bits of mantissa, ≈0.4% per value, accumulated over a few tokens)."""
    from gradpruner.evaluation.evaluate import evaluate

    runs = {dt: evaluate(str(tiny_llama), task="arc_easy", limit=20, batch_size=4, progress=False, details=True,
                         runtime=RuntimeConfig(device="cpu", dtype=dt)) for dt in ("float32", "bfloat16")}
    assert runs["bfloat16"]["runtime"] == {"device": "cpu", "dtype": "bfloat16"}
    f32 = [x for d in runs["float32"]["details"] for x in d["loglik"]]
    b16 = [x for d in runs["bfloat16"]["details"] for x in d["loglik"]]
    assert len(f32) == len(b16) > 40
    worst = max(abs(a - b) / max(abs(a), 1.0) for a, b in zip(f32, b16))
    assert worst < 0.02, worst


def test_bfloat16_layer_scores_agree_with_float32(tiny_llama, qa_file, tmp_path):
    """IGIA layer scores from LoRA steps over a bfloat16 base vs a float32 one (CPU, same seed and
    batches): the same ranking of the layers up to one swapped pair, every score within 10%."""
    scores = {}
    for dt in ("float32", "bfloat16"):
        res = api.score(str(tiny_llama), tmp_path / dt, data=qa_file, method="igia", steps=4, batch_size=4, lr=1e-3,
                        runtime=RuntimeConfig(device="cpu", dtype=dt))
        assert res["runtime"] == {"device": "cpu", "dtype": dt}
        scores[dt] = res["layer_scores"]
    a, b = scores["float32"], scores["bfloat16"]
    rank = lambda s: sorted(range(len(s)), key=s.__getitem__)  # noqa: E731
    assert sum(x != y for x, y in zip(rank(a), rank(b))) <= 2
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) < 0.10
