"""A pruned SmolLM2-135M in llama.cpp itself: the GGUF that `gradpruner export` writes, loaded by
llama-cpp-python (built from its PyPI source), must continue fixed prompts greedily with the same tokens
as transformers does from the pruned safetensors folder (f32 and f16), and tokenize the prompts alike.

llama-cpp-python is not a gradpruner dependency (it compiles llama.cpp: time it with /usr/bin/time):

    CMAKE_BUILD_PARALLEL_LEVEL=2 .venv/bin/pip install llama-cpp-python
    HF_HUB_OFFLINE=1 .venv/bin/python bench/llama_cpp_check.py      # writes bench/results/llama_cpp_check.md

The pruned model is SmolLM2-135M with the 12 layers of the demo's plan (results/demo/plan.json) removed.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "runs" / "llama_cpp_check"
OUT = ROOT / "bench" / "results" / "llama_cpp_check.md"
PROMPTS = ["Question: Which of these animals is a mammal?\nAnswer:",
           "The capital of France is",
           "def fibonacci(n):\n    ",
           "Photosynthesis is the process by which plants",
           "Q: If you have 3 apples and eat one, how many are left?\nA:"]
NEW_TOKENS = 24


def sh(*args: str) -> None:
    subprocess.run([str(ROOT / ".venv" / "bin" / "gradpruner"), *args], check=True, cwd=ROOT)


def hf_greedy(folder: Path) -> tuple[list[list[int]], list[list[int]]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts, outs = [], []
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
        prompts.append(ids[0].tolist())
        outs.append(gen[0, ids.shape[1]:].tolist())
    return prompts, outs


def llama_cpp_greedy(gguf: Path, prompts: list[list[int]]) -> tuple[list[list[int]], list[list[int]]]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=256, n_threads=2, logits_all=True, verbose=False)
    tokenized = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in PROMPTS]
    outs = []
    for ids in prompts:  # the same prompt ids as transformers: the comparison is of the model, not the tokenizer
        llm.reset()
        llm.eval(ids)
        got = []
        for _ in range(NEW_TOKENS):
            nxt = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            got.append(nxt)
            if nxt == llm.token_eos():
                break
            llm.eval([nxt])
        outs.append(got)
    llm.close()
    return tokenized, outs


def agree(a: list[int], b: list[int]) -> int:
    """How many leading tokens two continuations share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def main() -> None:
    import llama_cpp

    WORK.mkdir(parents=True, exist_ok=True)
    pruned = WORK / "pruned"
    if not pruned.is_dir():
        sh("prune", "--model", "smollm2-135m", "--plan", "results/demo/plan.json", "--out", str(pruned))
    prompt_ids, hf = hf_greedy(pruned)
    lines = [f"# llama.cpp runs the pruned SmolLM2-135M", "",
             f"llama-cpp-python {llama_cpp.__version__}; SmolLM2-135M with the demo plan's 12 of 30 layers removed; "
             f"{len(PROMPTS)} prompts, greedy, up to {NEW_TOKENS} new tokens; the same prompt ids given to both. "
             f"Command: `HF_HUB_OFFLINE=1 .venv/bin/python bench/llama_cpp_check.py`.", "",
             "| type | file MiB | export s | prompts tokenized alike | continuations identical | tokens agreeing before the first difference |",
             "|---|---|---|---|---|---|"]
    record = {"prompts": PROMPTS, "transformers": hf}
    for fmt in ("f32", "f16"):
        gguf = WORK / f"pruned-{fmt}.gguf"
        t0 = time.perf_counter()
        sh("export", "--model", str(pruned), "--format", "gguf", "--type", fmt, "--out", str(gguf), "--overwrite")
        seconds = time.perf_counter() - t0
        tokenized, cpp = llama_cpp_greedy(gguf, prompt_ids)
        same_tok = sum(a == b for a, b in zip(tokenized, prompt_ids))
        same = sum(a == b for a, b in zip(cpp, hf))
        lead = [agree(a, b) for a, b in zip(cpp, hf)]
        record[fmt] = {"llama_cpp": cpp, "tokenized": tokenized, "identical": same, "leading_agreement": lead}
        lines.append(f"| {fmt} | {gguf.stat().st_size / 2 ** 20:.1f} | {seconds:.0f} | {same_tok}/{len(PROMPTS)} | "
                     f"{same}/{len(PROMPTS)} | {', '.join(map(str, lead))} (of {', '.join(str(len(h)) for h in hf)}) |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    OUT.with_suffix(".json").write_text(json.dumps(record, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
