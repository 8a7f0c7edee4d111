"""llama.cpp itself (llama-cpp-python, built from its PyPI source by `make test`) runs the GGUF that
`gradpruner export` writes for a pruned SmolLM2-135M: same prompt tokens, same greedy continuation as
transformers on the pruned safetensors folder, for f32 and f16 (bench/llama_cpp_check.py is the longer
version whose output is in bench/results/llama_cpp_check.md)."""
import numpy as np
import pytest
import torch

from gradpruner import api
from gradpruner.export import FORMATS

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow, pytest.mark.needs_llama_cpp]
PROMPTS = ["Question: Which of these animals is a mammal?\nAnswer:", "The capital of France is",
           "Photosynthesis is the process by which plants"]
NEW = 16


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_cpp")
    plan = {"num_layers": 30, "drop": [4, 5, 6, 9, 13, 14, 15, 17, 18, 19, 25, 26],  # the demo's plan
            "keep": [0, 1, 2, 3, 7, 8, 10, 11, 12, 16, 20, 21, 22, 23, 24, 27, 28, 29], "merge": {}}
    api.prune("smollm2-135m", plan, d / "pruned")
    return d


def _transformers(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for text in PROMPTS:
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=tok.eos_token_id)
        out.append((ids[0].tolist(), gen[0, ids.shape[1]:].tolist()))
    return out


def _llama_cpp(gguf, prompt_ids):
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=128, n_threads=1, logits_all=True, verbose=False)
    try:
        tokenized = [llm.tokenize(t.encode(), add_bos=False, special=False) for t in PROMPTS]
        outs = []
        for ids in prompt_ids:
            llm.reset()
            llm.eval(ids)
            got = []
            for _ in range(NEW):
                got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
                llm.eval([got[-1]])
            outs.append(got)
        return tokenized, outs
    finally:
        llm.close()


@pytest.mark.parametrize("kind", ["f32", "f16"])
def test_llama_cpp_continues_like_transformers(pruned, kind):
    folder = pruned / "pruned"
    hf = _transformers(folder)
    gguf = pruned / f"pruned-{kind}.gguf"
    FORMATS["gguf"](folder, gguf, kind)
    tokenized, cpp = _llama_cpp(gguf, [p for p, _ in hf])
    assert tokenized == [p for p, _ in hf]  # llama.cpp's tokenizer splits the prompts as transformers does
    assert cpp == [g for _, g in hf]


def test_llama31_rotary_scaling_runs_in_llama_cpp_as_in_transformers(pruned, tmp_path):
    """Llama 3.1's rotary scaling (the paper's Llama-3.1-8B has it) reaches llama.cpp: the pruned SmolLM2
    given that scaling, with an original context of 16 positions so that most frequencies are divided."""
    import json
    import shutil

    plain = pruned / "pruned"
    folder = tmp_path / "scaled"
    shutil.copytree(plain, folder)
    cfg = json.loads((folder / "config.json").read_text())
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
    if "rope_parameters" in cfg:
        cfg["rope_parameters"] = {**scaling, "rope_theta": cfg["rope_parameters"]["rope_theta"]}
    else:
        cfg["rope_scaling"] = scaling
    (folder / "config.json").write_text(json.dumps(cfg))
    hf = _transformers(folder)
    assert [g for _, g in hf] != [g for _, g in _transformers(plain)]  # the scaling changes what the model says
    gguf = tmp_path / "scaled-f32.gguf"
    FORMATS["gguf"](folder, gguf, "f32")
    _, cpp = _llama_cpp(gguf, [p for p, _ in hf])
    assert cpp == [g for _, g in hf]
