"""lm-evaluation-harness as a client: the real harness (``--model hf``, ``pretrained=<pruned folder>``) loads a
pruned checkpoint and gives the same log-likelihoods as gradpruner's own evaluator; ``eval --harness``."""
import json
from importlib import resources

import pytest
import yaml

from gradpruner import api
from gradpruner.cli import main
from gradpruner.data.tasks import TASKS
from gradpruner.evaluation.loglik import score_choices
from gradpruner.models.loading import load_model, load_tokenizer

pytestmark = [pytest.mark.usefixtures("one_thread")]
lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install -e '.[test]')")


@pytest.fixture(scope="module")
def local_arc(tmp_path_factory):
    """The harness's own arc_easy task, its dataset read from the ARC-Easy file shipped with gradpruner."""
    src = resources.files("gradpruner.data") / "files" / "arc_easy" / "validation.jsonl"
    task = yaml.safe_load((resources.files("lm_eval") / "tasks" / "arc" / "arc_easy.yaml").read_text())
    task.update(task="arc_easy_local", dataset_path="json", dataset_name=None, test_split=None, training_split=None,
                dataset_kwargs={"data_files": {"validation": str(src)}})
    task.pop("tag", None)
    folder = tmp_path_factory.mktemp("harness_tasks")
    (folder / "arc_easy_local.yaml").write_text(yaml.safe_dump(task))
    return folder, [json.loads(line) for line in src.read_text().splitlines()[:6]]


@pytest.fixture(scope="module")
def pruned(tiny_llama, tiny_scores, tmp_path_factory):
    d = tmp_path_factory.mktemp("harness")
    api.plan(tiny_scores / "scores.json", d / "plan.json", prune=3, merge=0)
    api.prune(str(tiny_llama), d / "plan.json", d / "pruned")
    return d / "pruned"


def test_the_harness_scores_a_pruned_folder_like_gradpruner(pruned, local_arc):
    from gradpruner.evaluation.harness import run_harness

    include, rows = local_arc
    res = run_harness(pruned, ["arc_easy_local"], limit=6, batch_size=2, include=include, samples=True)
    theirs = {s["doc_id"]: s["loglikelihoods"] for s in res["samples"]["arc_easy_local"]}
    model, tok = load_model(pruned), load_tokenizer(pruned)
    items = [TASKS["arc_easy"].to_choices(r) for r in rows]
    ours = score_choices(model, tok, items, batch_size=4, progress=False)
    assert sorted(theirs) == list(range(6))
    diff = max(abs(a - b) for i, o in enumerate(ours) for a, b in zip(o, theirs[i]))
    assert diff < 1e-4, diff
    acc = sum(max(range(len(o)), key=o.__getitem__) == it.gold for o, it in zip(ours, items)) / 6
    assert res["tasks"]["arc_easy_local"]["acc"] == pytest.approx(acc)


def test_eval_harness_command(pruned, local_arc, tmp_path, capsys):
    include, _ = local_arc
    out = tmp_path / "h.json"
    assert main(["eval", "--model", str(pruned), "--harness", "arc_easy_local", "--harness-include", str(include),
                 "--limit", "4", "--out", str(out)]) == 0
    assert "arc_easy_local: acc = " in capsys.readouterr().out
    assert set(json.loads(out.read_text())["tasks"]["arc_easy_local"]) >= {"acc", "acc_norm"}
    assert main(["eval", "--model", str(pruned), "--harness", "no_such_task_xyz"]) == 2
    assert "has no task 'no_such_task_xyz'" in capsys.readouterr().err
