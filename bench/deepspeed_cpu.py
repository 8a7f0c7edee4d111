"""DeepSpeed ZeRO-2 and ZeRO-3 on CPU: `gradpruner score` on 2 DeepSpeed processes vs 1 DeepSpeed process
vs a plain single process, on the test suite's tiny Llama; prints the table of docs/scale.md.

DeepSpeed is not a gradpruner dependency. Install it beside the venv, without building its ops:

    DS_BUILD_OPS=0 .venv/bin/pip install --target /tmp/dsenv --no-deps --no-build-isolation \
        deepspeed==0.19.8 hjson py-cpuinfo ninja nvidia-ml-py msgpack einops
    PYTHONPATH=/tmp/dsenv HF_HUB_OFFLINE=1 .venv/bin/python bench/deepspeed_cpu.py [--work DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from helpers import qa_rows, save_tiny_model_dir, write_jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
FLAGS = ["--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--seed", "0", "--max-length", "64"]


def config(work: Path, procs: int, port: int, stage: int = 2) -> Path:
    text = (ROOT / "configs/accelerate/deepspeed_zero2_cpu.yaml").read_text()
    text = text.replace("num_processes: 2", f"num_processes: {procs}").replace("29533", str(port))
    text = text.replace("zero_stage: 2", f"zero_stage: {stage}")
    path = work / f"ds{stage}-{procs}.yaml"
    path.write_text(text)
    return path


def score(work: Path, out: str, launch: list[str]) -> Path:
    cmd = [*launch, str(BIN / "gradpruner"), "score", "--model", str(work / "tiny"), "--data",
           str(work / "qa.jsonl"), *FLAGS, "--out", str(work / out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return work / out


def compare(a: Path, b: Path) -> tuple[float, list[float]]:
    sa, sb = (json.loads((d / "scores.json").read_text())["layer_scores"] for d in (a, b))
    layer = max(abs(x - y) / abs(x) for x, y in zip(sa, sb))
    fa, fb = load_file(str(a / "igia.safetensors")), load_file(str(b / "igia.safetensors"))
    steps = next(iter(fa.values())).shape[0]
    per_step = [max(float((fa[k][t] - fb[k][t]).norm() / fa[k][t].norm()) for k in fa if fa[k][t].norm() > 0)
                for t in range(steps)]
    return layer, per_step


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default=None)
    work = Path(ap.parse_args().work or tempfile.mkdtemp(prefix="gp-ds-"))
    save_tiny_model_dir(work / "tiny")
    write_jsonl(work / "qa.jsonl", qa_rows())
    accelerate = str(BIN / "accelerate")
    plain = score(work, "plain", [])
    launch = lambda procs, port, stage: [accelerate, "launch", "--config_file", str(config(work, procs, port, stage))]  # noqa: E731
    ds1, ds2 = score(work, "ds1", launch(1, 29534, 2)), score(work, "ds2", launch(2, 29533, 2))
    z1, z2 = score(work, "z3-1", launch(1, 29535, 3)), score(work, "z3-2", launch(2, 29536, 3))
    print(f"torch {torch.__version__}; work folder {work}")
    print("| compared | layer scores (max rel. diff.) | IGIA factors per step (max rel. diff.) |\n|---|---|---|")
    for label, a, b in (("ZeRO-2, 2 processes vs ZeRO-2, 1 process", ds1, ds2),
                        ("ZeRO-3, 2 processes vs ZeRO-3, 1 process", z1, z2),
                        ("ZeRO-3 vs ZeRO-2, 1 process", ds1, z1),
                        ("ZeRO-2, 1 process vs no DeepSpeed, 1 process", plain, ds1),
                        ("ZeRO-3, 2 processes vs no DeepSpeed, 1 process", plain, z2)):
        layer, steps = compare(a, b)
        print(f"| {label} | {layer:.2g} | {', '.join(f'{s:.2g}' for s in steps)} |")


if __name__ == "__main__":
    main()
