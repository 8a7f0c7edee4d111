"""Why a DeepSpeed run trains differently from plain AdamW: one LoRA optimizer step on the tiny Llama, with and
without DeepSpeed, and the update each made checked against AdamW's formula from the gradient it saw.

    DS_BUILD_OPS=0 .venv/bin/pip install --target /tmp/dsenv --no-deps --no-build-isolation \
        deepspeed==0.19.8 hjson py-cpuinfo ninja nvidia-ml-py msgpack einops
    PYTHONPATH=/tmp/dsenv HF_HUB_OFFLINE=1 .venv/bin/python bench/deepspeed_parity.py

Each run (a child process: plain, or under `accelerate launch` with configs/accelerate/deepspeed_zero2_cpu.yaml
on one process) prints the optimizer it actually stepped with (class and settings) and saves the LoRA
weights before and after the step with the gradient of that step; the parent compares.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def child(work: Path, tag: str) -> None:
    from helpers import qa_rows, save_tiny_model_dir  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from gradpruner.data.examples import Example, PadCollator, tokenize
    from gradpruner.models.architectures import linear_module_names
    from gradpruner.models.lora import attach_lora

    tok = AutoTokenizer.from_pretrained(work / "tiny")
    base = AutoModelForCausalLM.from_pretrained(work / "tiny", dtype=torch.float32)
    torch.manual_seed(0)
    model = attach_lora(base, rank=8, alpha=32, dropout=0.0, target_modules=linear_module_names(base))
    feats = tokenize([Example(r["prompt"], r["completion"]) for r in qa_rows(16)], tok, max_length=64)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    seen: dict = {}

    class Grab(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, optimizer=None, **kw):
            # DS_PARITY_READ=1: read every LoRA gradient as gradpruner's capture does under DeepSpeed
            # (safe_get_full_grad, first thing in the ZeRO optimizer's step)
            if os.environ.get("DS_PARITY_READ") and tag == "ds":
                from gradpruner.util.distributed import DEEPSPEED, call_before_step, full_grad

                params = [p for p in model.parameters() if p.requires_grad]
                seen["read"] = call_before_step(optimizer, lambda: [full_grad(p, DEEPSPEED) for p in params])

        def on_optimizer_step(self, args, state, control, optimizer=None, **kw):
            opt = kw.get("optimizer") or optimizer
            seen["optimizer"] = f"{type(opt).__module__}.{type(opt).__name__}"
            inner = getattr(opt, "optimizer", None)
            while inner is not None:
                seen.setdefault("wrapped", []).append(f"{type(inner).__module__}.{type(inner).__name__}")
                seen["defaults"] = {k: (v if isinstance(v, (int, float, bool, str, type(None))) else str(v))
                                    for k, v in getattr(inner, "defaults", {}).items()}
                inner = getattr(inner, "optimizer", None)

    args = TrainingArguments(output_dir=str(work / f"out-{tag}"), max_steps=int(os.environ.get("DS_PARITY_STEPS", "1")), per_device_train_batch_size=4,
                             learning_rate=1e-3, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                             max_grad_norm=0.0, logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0,
                             remove_unused_columns=False, use_cpu=True, dataloader_num_workers=0)
    grads: dict = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            p.register_hook(lambda g, n=n: grads.__setitem__(n, g.detach().clone()))
    trainer = Trainer(model=model, args=args, train_dataset=feats, data_collator=PadCollator(tok.pad_token_id),
                      callbacks=[Grab()])
    trainer.train()
    after = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    lr = trainer.optimizer.param_groups[0]["lr"] if trainer.optimizer is not None else None
    torch.save({"before": before, "after": after, "grads": grads, "names": names}, work / f"{tag}.pt")
    (work / f"{tag}.json").write_text(json.dumps({**seen, "lr_after": lr, "deepspeed": bool(os.environ.get("ACCELERATE_USE_DEEPSPEED"))}))


def adamw_step(w, g, lr=1e-3, eps=1e-8):
    """AdamW's first step from zero state (bias-corrected): w − lr·g/(|g| + eps)."""
    return w - lr * g / (g.abs() + eps)


def main() -> None:
    if len(sys.argv) == 3:
        return child(Path(sys.argv[1]), sys.argv[2])
    from helpers import save_tiny_model_dir

    work = Path(tempfile.mkdtemp(prefix="gp-dsparity-"))
    save_tiny_model_dir(work / "tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    me = [sys.executable, __file__, str(work)]
    subprocess.run([*me, "plain"], check=True, env=env)
    cfg = (ROOT / "configs/accelerate/deepspeed_zero2_cpu.yaml").read_text().replace("num_processes: 2", "num_processes: 1")
    (work / "ds.yaml").write_text(cfg.replace("29533", "29541"))
    accelerate = str(Path(sys.executable).parent / "accelerate")
    subprocess.run([accelerate, "launch", "--config_file", str(work / "ds.yaml"), __file__, str(work), "ds"], check=True, env=env)
    runs = {t: torch.load(work / f"{t}.pt") for t in ("plain", "ds")}
    for tag, r in runs.items():
        info = json.loads((work / f"{tag}.json").read_text())
        dev = max(float((r["after"][n] - adamw_step(r["before"][n], r["grads"][n])).abs().max()) for n in r["names"] if n in r["grads"])
        moved = max(float((r["after"][n] - r["before"][n]).abs().max()) for n in r["names"])
        print(f"{tag}: optimizer {info.get('optimizer')} wrapping {info.get('wrapped')}, defaults {info.get('defaults')}; "
              f"largest |update| {moved:.3g}; largest deviation from AdamW's first step {dev:.3g}")
    p, d = runs["plain"], runs["ds"]
    gdiff = max(float((p["grads"][n] - d["grads"][n]).abs().max() / p["grads"][n].abs().max().clamp_min(1e-30))
                for n in p["grads"] if n in d["grads"])
    wdiff = max(float((p["after"][n] - d["after"][n]).norm() / p["after"][n].norm()) for n in p["names"])
    print(f"gradients of step 1, DeepSpeed vs plain: max rel. diff {gdiff:.3g}; weights after it: {wdiff:.3g}")


if __name__ == "__main__":
    main()
