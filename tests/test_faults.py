"""Issue 6: bad input, faults and interruption — nothing lost, nothing half-written.

One section per requirement: (1) every input checked before work, all problems in one message;
(2) atomic outputs under kill -9 and stale temporaries; (3) interrupted runs resume to the same
result; (4) a full disk; (5) non-finite loss or gradients; (6) corrupted inputs; (7) hostile
inputs and properties; (8) loading never runs code from the model. Tiny random models only.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradpruner import api
from gradpruner.api import healing as api_healing
from gradpruner.api import planning as api_planning
from gradpruner.api import pruning as api_pruning
from gradpruner.api import scoring as api_scoring
from gradpruner.cli import main
from gradpruner.errors import GradPrunerError
from gradpruner.finetuning import finetune as ft
from gradpruner.util import atomic

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

KEEP6 = {"num_layers": 8, "keep": [0, 1, 2, 3, 4, 5], "drop": [6, 7], "merge": {}}
KEEP5 = {"num_layers": 8, "keep": [0, 1, 2, 3, 4], "drop": [5, 6, 7], "merge": {}}


def fails(capsys, *argv) -> list[str]:
    """Run the CLI, expect exit 2 and no traceback; return the problems, one per line."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "gradpruner: error: " in err, err
    lines = err[err.index("gradpruner: error: ") + len("gradpruner: error: "):].splitlines()
    return list(itertools.takewhile(str.strip, lines))  # a progress bar may close after the message


def leftovers(folder: Path, name: str) -> list[str]:
    """Hidden temporaries of ``name`` left in ``folder``."""
    return [p.name for p in folder.iterdir() if p.name.startswith((f".{name}.tmp", f".{name}.old"))]


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def write(path: Path, obj) -> Path:
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def layers_of(folder: Path) -> int:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder)).config.num_hidden_layers


@pytest.fixture()
def no_loading(monkeypatch):
    """Fail the test if any command gets as far as loading model weights."""
    def refuse(*a, **k):
        pytest.fail("the model was loaded before the inputs were checked")

    for module in (api_scoring, api_planning, api_pruning, api_healing, ft):
        monkeypatch.setattr(module, "load_model", refuse)
    monkeypatch.setattr("gradpruner.models.loading.load_model", refuse)


# --- 1. every input checked before work; every problem in one message -------------------------------

def test_prune_reports_every_problem_at_once(capsys, tiny_llama, tmp_path, no_loading):
    (tmp_path / "out").mkdir()
    plan = write(tmp_path / "plan.json", {**KEEP6, "keep": [0, 1, 2, 3, 4, 9], "merge": {"6": 7}})
    problems = fails(capsys, "prune", "--model", tiny_llama, "--plan", plan, "--merge-rule", "sign_sun",
                     "--density", "1.5", "--out", tmp_path / "out")
    text = "\n".join(problems)
    for needle in ("sign_sum", "--density", "outside 0..7", "merges into layer 7", "--overwrite"):
        assert needle in text, needle
    assert len(problems) >= 5


def test_score_reports_every_problem_at_once(capsys, tmp_path, no_loading):
    data = write(tmp_path / "d.jsonl", '{"prompt": "a"}\n')
    problems = fails(capsys, "score", "--model", tmp_path / "nope", "--data", data, "--steps", "1",
                     "--adapter", "lorra", "--lr", "-1", "--out", tmp_path / "o")
    text = "\n".join(problems)
    for needle in ("nope", "d.jsonl line 1", "--steps", "--adapter", "--lr"):
        assert needle in text, needle
    assert not (tmp_path / "o").exists()


def test_finetune_reports_every_problem_at_once(tiny_llama, tmp_path, no_loading):
    ckpt = ft.checkpoint_dir(tmp_path / "o")
    ckpt.mkdir()
    (ckpt / "mine.txt").write_text("kept")  # nothing is discarded while inputs are bad
    with pytest.raises(GradPrunerError) as err:
        ft.finetune(tiny_llama, tmp_path / "o", data=tmp_path / "missing.jsonl", overwrite=True,
                    config=ft.FinetuneConfig(lr=-1, rank=0))
    text = str(err.value)
    assert "--lr" in text and "--rank" in text and "missing.jsonl" in text
    assert (ckpt / "mine.txt").read_text() == "kept"


def test_eval_reports_every_problem_at_once(capsys, tiny_llama, tmp_path, no_loading):
    write(tmp_path / "r.json", "{}")
    problems = fails(capsys, "eval", "--model", tiny_llama, "--data", tmp_path / "missing.jsonl",
                     "--metric", "acc", "--limit", "0", "--out", tmp_path / "r.json")
    text = "\n".join(problems)
    for needle in ("limit", "missing.jsonl", "--overwrite"):
        assert needle in text, needle


def test_run_checks_model_and_data_before_any_stage(capsys, tmp_path):
    import yaml

    cfg = {"model": str(tmp_path / "no-model"), "task": None, "data": str(tmp_path / "no.jsonl"),
           "eval_data": str(tmp_path / "no-eval.jsonl"), "out": str(tmp_path / "run")}
    problems = fails(capsys, "run", write(tmp_path / "c.yaml", yaml.safe_dump(cfg)))
    text = "\n".join(problems)
    assert "no-model" in text and "no.jsonl" in text and "no-eval.jsonl" in text
    assert not (tmp_path / "run").exists()  # no stage started, no run folder made


# --- 2. atomic outputs under kill -9; stale temporaries -------------------------------------------

DRIVER = r'''
import os, sys, time
from pathlib import Path

phase, marker, argv = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

def pause(tag):
    marker.write_text(tag)
    time.sleep(600)

import gradpruner.api.pruning as api
import gradpruner.util.atomic as atomic
if phase == "load":  # before anything is written
    real_load = api.load_model
    api.load_model = lambda *a, **k: pause("load")
elif phase == "weights":  # mid-save: weights written in the temporary folder, tokenizer not yet
    import transformers.modeling_utils as mu
    real_save = mu.safe_save_file
    def save(*a, **k):
        real_save(*a, **k)
        pause("weights")
    mu.safe_save_file = save
elif phase == "stream":  # out of core, mid-save: a weights shard written, config and metadata not yet
    import gradpruner.pruning.streamed as shards
    real_write = shards._write_safetensors
    def write_shard(*a, **k):
        real_write(*a, **k)
        pause("stream")
    shards._write_safetensors = write_shard
elif phase == "swap":  # new output swapped in, the old one (now in the temporary) not yet removed
    real_exchange = atomic._exchange
    def exchange(a, b):
        assert real_exchange(a, b)
        pause("swap")
    atomic._exchange = exchange
elif phase == "swap-fallback":  # no atomic swap: between parking the old output and moving the new
    atomic._exchange = lambda a, b: False
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if ".old-" in str(dst):
            pause("swap-fallback")
    atomic.os.replace = replace
from gradpruner.cli import main
sys.exit(main(argv))
'''


def _kill_at(phase: str, tmp_path: Path, argv: list, delay: float | None = None) -> None:
    marker = tmp_path / f"marker-{phase}"
    driver = write(tmp_path / "driver.py", DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen([sys.executable, str(driver), phase, str(marker), *map(str, argv)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        if delay is not None:
            time.sleep(delay)
        else:
            deadline = time.monotonic() + 120
            while not marker.exists():
                assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
                assert time.monotonic() < deadline, "the command never reached the kill point"
                time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stderr.close()


@pytest.mark.parametrize("phase,expect", [(0.5, "old"), ("load", "old"), ("weights", "old"), ("stream", "old"),
                                          ("swap", "new"), ("swap-fallback", "old")])
def test_kill_9_leaves_old_or_complete_output_and_the_next_run_cleans_up(tiny_llama, tmp_path, phase, expect):
    out = tmp_path / "out"
    model_before = digest(tiny_llama)
    assert main(["prune", "--model", str(tiny_llama), "--plan", str(write(tmp_path / "p6.json", KEEP6)),
                 "--out", str(out)]) == 0  # the previous output: 6 layers
    argv = ["prune", "--model", tiny_llama, "--plan", write(tmp_path / "p5.json", KEEP5), "--out", out, "--overwrite"]
    if phase in ("load", "weights"):  # the kill points of the path that loads the model
        argv.append("--in-memory")
    _kill_at(str(phase), tmp_path, argv, delay=phase if isinstance(phase, float) else None)

    if phase == "swap-fallback":  # the only moment out is missing; the next write puts the old one back
        assert not out.exists() and [n for n in leftovers(tmp_path, "out") if ".old-" in n]
        atomic.clean_stale(out)
    assert layers_of(out) == {"old": 6, "new": 5}[expect]  # loads with transformers: complete, never partial
    assert json.loads((out / "gradpruner.json").read_text())["plan"]["keep"] == (KEEP6 if expect == "old" else KEEP5)["keep"]

    assert main(["prune", "--model", str(tiny_llama), "--plan", str(tmp_path / "p5.json"), "--out", str(out),
                 "--overwrite"]) == 0
    assert layers_of(out) == 5 and leftovers(tmp_path, "out") == []
    assert digest(tiny_llama) == model_before  # the input model is never modified


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_clean_stale_removes_only_our_dead_temporaries(tmp_path):
    host, dead, me = atomic._HOST, _dead_pid(), os.getpid()
    names = {
        f".out.tmp-{dead}-{host}-abc_1234": False,       # a killed write of out: removed
        f".out.tmp-{me}-{host}-abc_1234": True,          # this process's own, in progress
        f".out.tmp-1-{host}-abc_1234": True,             # its writer still runs
        f".out.tmp-{dead}-0badc0de-abc_1234": True,      # another machine's: cannot tell
        f".outer.tmp-{dead}-{host}-abc_1234": True,      # another output's
        ".out.tmp-notes": True, "out.tmp-1-x": True, ".out.backup": True,  # not our pattern
    }
    for name in names:
        (tmp_path / name).mkdir()
    (tmp_path / f".out.tmp-{dead}-{host}-file_123").write_text("partial json")  # atomic_file leftovers too
    removed = atomic.clean_stale(tmp_path / "out")
    assert sorted(p.name for p in removed) == sorted([f".out.tmp-{dead}-{host}-abc_1234", f".out.tmp-{dead}-{host}-file_123"])
    assert all((tmp_path / n).exists() == kept for n, kept in names.items())

    (tmp_path / f".out.old-{dead}-{host}").mkdir()  # a write killed mid-swap: the old output comes back
    (tmp_path / f".out.old-{dead}-{host}" / "config.json").write_text("{}")
    atomic.clean_stale(tmp_path / "out")
    assert (tmp_path / "out" / "config.json").exists() and not (tmp_path / f".out.old-{dead}-{host}").exists()


def test_overwrite_without_atomic_swap_still_replaces_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.txt").write_text("old")
    with atomic.atomic_dir(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["new.txt"] and leftovers(tmp_path, "out") == []


def test_scoring_never_modifies_the_input_model(tiny_llama, qa_file, tmp_path):
    before = digest(tiny_llama)
    api.score(str(tiny_llama), tmp_path / "s", data=qa_file, steps=2, batch_size=4, lr=1e-3)
    assert digest(tiny_llama) == before


# --- 3. interrupted runs resume to the result of an uninterrupted one -----------------------------

def _run_config(tmp_path: Path, model: Path, name: str):
    from gradpruner.pipeline.config import config_from_dict

    return config_from_dict({
        "model": str(model), "task": "arc_easy", "out": str(tmp_path / name), "seed": 0,
        "score": {"steps": 2, "batch_size": 4, "max_length": 64, "lr": 1e-3, "calib_examples": 4},
        "plan": {"prune": 3, "merge": 1},
        "finetune": {"mode": "lora", "max_steps": 4, "batch_size": 4, "max_length": 64, "limit": 16,
                     "dense_baseline": False},
        "eval": {"limit": 4, "batch_size": 4, "zero_shot_dense": False, "pruned_no_finetune": False}})


def test_run_interrupted_mid_finetune_resumes_to_the_same_result(tiny_llama, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from gradpruner.pipeline.run import run

    real_validate = ft.validate_config
    monkeypatch.setattr(ft, "validate_config", lambda cfg: real_validate(cfg.__class__(**{**vars(cfg), "save_steps": 2})))
    before = digest(tiny_llama)
    run(_run_config(tmp_path, tiny_llama, "a"), echo=lambda s: None, isolate=False)

    def interrupt(self, args, state, control, **kwargs):
        if state.global_step == 2:
            raise KeyboardInterrupt  # Ctrl-C right after checkpoint-2 of the pruned model's fine-tune

    monkeypatch.setattr(ft.StopOnNonFinite, "on_save", interrupt, raising=False)
    with pytest.raises(KeyboardInterrupt):
        run(_run_config(tmp_path, tiny_llama, "b"), echo=lambda s: None, isolate=False)
    b = tmp_path / "b"
    assert not (b / "pruned_ft").exists() and (b / "pruned_ft.checkpoints" / "checkpoint-2").is_dir()
    monkeypatch.undo()
    monkeypatch.setattr(ft, "validate_config", lambda cfg: real_validate(cfg.__class__(**{**vars(cfg), "save_steps": 2})))
    log: list[str] = []
    run(_run_config(tmp_path, tiny_llama, "b"), echo=log.append, isolate=False)
    assert [m.split("→ ")[1] for m in log if "→ " in m] == ["pruned_ft", "eval_pruned_ft"]

    a = tmp_path / "a"
    assert json.loads((b / "pruned_ft_finetune.json").read_text())["resumed_from"].endswith("checkpoint-2")
    assert json.loads((a / "plan.json").read_text())["drop"] == json.loads((b / "plan.json").read_text())["drop"]
    wa, wb = load_file(str(a / "pruned_ft" / "model.safetensors")), load_file(str(b / "pruned_ft" / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=0, atol=1e-5, msg=k)
    ea, eb = (json.loads((d / "eval" / "pruned_ft.json").read_text()) for d in (a, b))
    assert ea["value"] == eb["value"] and ea["metrics"]["acc"] == eb["metrics"]["acc"]
    assert digest(tiny_llama) == before


# --- 4. a full disk ---------------------------------------------------------------------------

def _enospc(*args, **kwargs):
    path = next((a for a in args if isinstance(a, (str, os.PathLike))), None)
    if path is not None:
        Path(path).write_bytes(b"\0" * 100)  # half-written, as a real full disk leaves it
    raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _enospc_mid_shard(path, *a, **k):  # the streaming writer fills part of a shard, then the disk is full
    Path(path).write_bytes(b"\0" * 100)
    _enospc(path)


@pytest.mark.parametrize("how", ["--in-memory", "--out-of-core"])
def test_disk_full_while_saving_a_pruned_model(capsys, tiny_llama, tmp_path, monkeypatch, how):
    out = tmp_path / "out"
    assert main(["prune", "--model", str(tiny_llama), "--plan", str(write(tmp_path / "p.json", KEEP6)), "--out", str(out)]) == 0
    old = digest(out)
    if how == "--in-memory":
        monkeypatch.setattr("transformers.modeling_utils.safe_save_file", _enospc)
    else:
        monkeypatch.setattr("gradpruner.pruning.streamed._write_safetensors", _enospc_mid_shard)
    problems = fails(capsys, "prune", "--model", tiny_llama, "--plan", write(tmp_path / "p5.json", KEEP5), "--out", out,
                     "--overwrite", how)
    assert len(problems) == 1 and "disk is full" in problems[0] and str(out) in problems[0]
    assert digest(out) == old and leftovers(tmp_path, "out") == []


def test_disk_full_as_a_safetensors_error(capsys, tiny_llama, tmp_path, monkeypatch):
    from safetensors import SafetensorError

    def full(*a, **k):  # what safetensors' Rust writer raises on a full disk: not an OSError
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr("transformers.modeling_utils.safe_save_file", full)
    problems = fails(capsys, "prune", "--model", tiny_llama, "--plan", write(tmp_path / "p.json", KEEP6), "--out", tmp_path / "out",
                     "--in-memory")
    assert "disk is full" in problems[0] and not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_disk_full_while_saving_the_fine_tuned_model_keeps_the_checkpoints(tiny_llama, qa_file, tmp_path, monkeypatch):
    import transformers.modeling_utils as mu

    real = mu.safe_save_file
    out, cfg = tmp_path / "o", ft.FinetuneConfig(max_steps=2, batch_size=4, save_steps=1)
    monkeypatch.setattr(mu, "safe_save_file", lambda sd, name, **k: _enospc(name) if ".o.tmp-" in str(name) else real(sd, name, **k))
    with pytest.raises(GradPrunerError, match="disk is full while writing .*o;"):
        ft.finetune(tiny_llama, out, data=qa_file, config=cfg, progress=False)
    assert not out.exists() and leftovers(tmp_path, "o") == []
    assert ft.last_checkpoint(ft.checkpoint_dir(out)).name == "checkpoint-2"  # the work done stays
    monkeypatch.setattr(mu, "safe_save_file", real)
    record = ft.finetune(tiny_llama, out, data=qa_file, config=cfg, resume=True, progress=False)
    assert record["resumed_from"].endswith("checkpoint-2") and layers_of(out) == 8


def test_disk_full_inside_training_is_one_sentence(capsys, tiny_llama, qa_file, tmp_path, monkeypatch):
    monkeypatch.setattr(torch, "save", _enospc)  # the Trainer's checkpoint (optimizer state)
    problems = fails(capsys, "finetune", "--model", tiny_llama, "--data", qa_file, "--max-steps", "1",
                     "--batch-size", "4", "--out", tmp_path / "o")
    assert len(problems) == 1 and "disk is full" in problems[0]
    assert not (tmp_path / "o").exists() and not ft.checkpoint_dir(tmp_path / "o").exists()


def test_disk_full_while_writing_scores(capsys, tiny_llama, qa_file, tmp_path, monkeypatch):
    monkeypatch.setattr(os, "pwrite", _enospc)  # the IGIA factor stream
    problems = fails(capsys, "score", "--model", tiny_llama, "--data", qa_file, "--steps", "2", "--batch-size", "4",
                     "--out", tmp_path / "s")
    assert "disk is full" in problems[0] and not (tmp_path / "s").exists() and leftovers(tmp_path, "s") == []


def test_disk_full_while_writing_json(capsys, tiny_scores, tmp_path, monkeypatch):
    plan = tmp_path / "plan.json"
    assert main(["plan", "--scores", str(tiny_scores / "scores.json"), "--prune", "2", "--out", str(plan)]) == 0
    old = plan.read_bytes()
    monkeypatch.setattr(os, "fsync", _enospc)
    problems = fails(capsys, "plan", "--scores", tiny_scores / "scores.json", "--prune", "3", "--out", plan, "--overwrite")
    assert "disk is full" in problems[0] and plan.read_bytes() == old and leftovers(tmp_path, "plan.json") == []


@pytest.mark.parametrize("exc,needle", [(MemoryError(), "out of memory"),
                                        (OSError(errno.EDQUOT, "Disk quota exceeded"), "disk is full"),
                                        (RuntimeError("bug"), None)])
def test_cli_turns_stray_resource_errors_into_one_sentence(capsys, monkeypatch, tmp_path, exc, needle):
    def boom(*a, **k):
        raise exc

    monkeypatch.setattr(api, "plan", boom)
    argv = ["plan", "--scores", str(tmp_path / "s.json"), "--prune", "1", "--out", str(tmp_path / "p.json")]
    if needle is None:  # a bug is not dressed up as the user's problem
        with pytest.raises(RuntimeError):
            main(argv)
        return
    problems = fails(capsys, *argv)
    assert len(problems) == 1 and needle in problems[0].lower()


# --- 5. non-finite loss or gradients -------------------------------------------------------------

class NanGrad(torch.autograd.Function):
    """Identity forward, NaN gradient: a diverged backward with a finite loss."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * float("nan")


def _poison(monkeypatch, module, what: str, from_call: int):
    """Make ``module.load_model`` return a model whose loss (value) or gradients go NaN from the
    ``from_call``-th forward pass on (one forward per optimizer step here)."""
    real, calls = module.load_model, []

    def hook(mod, args, output):
        if getattr(output, "loss", None) is None:
            return output
        calls.append(1)
        if len(calls) >= from_call:
            loss = output.loss
            output.loss = loss + loss.detach() * float("nan") if what == "loss" else NanGrad.apply(loss)
        return output

    def load(*a, **k):
        model = real(*a, **k)
        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(module, "load_model", load)


@pytest.mark.parametrize("what,needle", [("loss", "Non-finite training loss at optimizer step 3"),
                                         ("grad", "Non-finite gradient in .* at optimizer step 3")])
def test_scoring_stops_at_the_first_non_finite_step(capsys, tiny_llama, qa_file, tmp_path, monkeypatch, what, needle):
    import re

    out = tmp_path / "s"
    out.mkdir()
    (out / "scores.json").write_text('{"earlier": true}')  # a previous result stays as it was
    _poison(monkeypatch, api_scoring, what, 3)
    problems = fails(capsys, "score", "--model", tiny_llama, "--data", qa_file, "--steps", "5", "--batch-size", "4",
                     "--out", out, "--overwrite")
    assert len(problems) == 1 and re.search(needle, problems[0]) and "--lr" in problems[0], problems
    assert (out / "scores.json").read_text() == '{"earlier": true}' and leftovers(tmp_path, "s") == []


@pytest.mark.parametrize("what,needle", [("loss", "Non-finite training loss at optimizer step 3"),
                                         ("grad", "Non-finite gradients at optimizer step 3")])
def test_finetuning_stops_at_the_first_non_finite_step(tiny_llama, qa_file, tmp_path, monkeypatch, what, needle):
    _poison(monkeypatch, ft, what, 3)
    out = tmp_path / "o"
    cfg = ft.FinetuneConfig(max_steps=5, batch_size=4, save_steps=1, logging_steps=1)
    with pytest.raises(GradPrunerError, match=needle) as err:
        ft.finetune(tiny_llama, out, data=qa_file, config=cfg, progress=False)
    assert "lower the learning rate (--lr" in str(err.value) and "checkpoint-2" in str(err.value)
    assert not out.exists() and ft.last_checkpoint(ft.checkpoint_dir(out)).name == "checkpoint-2"


# --- 6. corrupted inputs ------------------------------------------------------------------------

def _copy_model(tiny_llama, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_llama, tmp_path / "model"))


def test_truncated_safetensors_file(capsys, tiny_llama, tmp_path, no_loading):
    model = _copy_model(tiny_llama, tmp_path)
    weights = model / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    problems = fails(capsys, "prune", "--model", model, "--plan", write(tmp_path / "p.json", KEEP6), "--out", tmp_path / "o")
    assert "model.safetensors" in problems[0] and "truncated or corrupt" in problems[0]
    assert not (tmp_path / "o").exists()


def test_config_json_that_does_not_parse(capsys, tiny_llama, tmp_path, no_loading):
    model = _copy_model(tiny_llama, tmp_path)
    (model / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')
    problems = fails(capsys, "prune", "--model", model, "--plan", write(tmp_path / "p.json", KEEP6), "--out", tmp_path / "o")
    assert "config.json is not valid JSON" in problems[0]


def test_scores_of_another_model(capsys, tiny_llama, tiny_scores, tmp_path):
    scores = json.loads((tiny_scores / "scores.json").read_text())
    other = {**scores, "layer_scores": scores["layer_scores"][:6], "num_layers": 6, "layer_params": scores["layer_params"][:6]}
    assert main(["plan", "--scores", str(write(tmp_path / "scores.json", other)), "--prune", "2",
                 "--out", str(tmp_path / "plan.json")]) == 0
    problems = fails(capsys, "prune", "--model", tiny_llama, "--plan", tmp_path / "plan.json", "--out", tmp_path / "o")
    assert any("made for a model with 6 layers" in p and "has 8" in p for p in problems)


def test_truncated_igia_file(capsys, tiny_llama, tiny_scores, tmp_path, no_loading):
    igia = tmp_path / "igia.safetensors"
    igia.write_bytes((tiny_scores / "igia.safetensors").read_bytes()[:1000])
    problems = fails(capsys, "prune", "--model", tiny_llama, "--plan", write(tmp_path / "p.json", {**KEEP6, "merge": {"6": 5}}),
                     "--igia", igia, "--out", tmp_path / "o")
    assert "igia.safetensors cannot be read" in problems[0]


@pytest.mark.parametrize("text,needle", [
    ('{"num_layers": 8, "keep": [0, 1', "not valid JSON"),           # saved half-way
    ("", "not valid JSON"),                                           # emptied
    ("[" * 100_000, "not valid JSON"),                                # a nesting bomb
    (json.dumps({"num_layers": 8, "keep": [0, 1, 2, 3, 4, 5, 7], "drop": [6, 7], "merge": {"7": 6}}), "in both"),
])
def test_hand_edited_plans(capsys, tiny_llama, tmp_path, text, needle, no_loading):
    problems = fails(capsys, "prune", "--model", tiny_llama, "--plan", write(tmp_path / "p.json", text), "--out", tmp_path / "o")
    assert any(needle in p for p in problems) and len("\n".join(problems)) < 2000
    if "in both" in needle:  # every inconsistency, not just the first
        assert any("merges into layer 6, which is not kept" in p for p in problems)


# --- 7. hostile inputs ------------------------------------------------------------------------------

def test_a_20_mb_line_is_refused_by_number_without_reading_it_whole(tmp_path):
    import tracemalloc

    from gradpruner.data.examples import MAX_LINE_BYTES, load_jsonl

    path = tmp_path / "big.jsonl"
    with open(path, "w") as f:
        f.write('{"text": "ok"}\n{"text": "' + "x" * (20 * 2**20) + '"}\n{"text": "fine"}\n')
    tracemalloc.start()
    t0 = time.monotonic()
    with pytest.raises(GradPrunerError) as err:
        load_jsonl(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert err.value.problems == [f"{path} line 2 is 20.0 MiB, over the limit of {MAX_LINE_BYTES // 2**20} MiB per "
                                  "line; shorten or split that example."]
    assert peak < 3 * MAX_LINE_BYTES and time.monotonic() - t0 < 10  # bounded by the limit, not the line


def test_hostile_data_lines_each_get_their_line_number(capsys, tiny_llama, tmp_path, no_loading):
    data = tmp_path / "d.jsonl"
    data.write_bytes(b'{"prompt": "", "completion": " ok"}\n'          # an empty prompt is fine
                     b'{"text": "caf\xe9"}\n'                           # not UTF-8
                     + b"[" * 100_000 + b"\n"                           # nesting bomb
                     + b'{"prompt": "q", "completion": ""}\n'          # nothing to learn
                     + b'{"prompt": ["a"], "completion": "b"}\n')
    problems = fails(capsys, "finetune", "--model", tiny_llama, "--data", data, "--out", tmp_path / "o")
    assert [p.split(" ")[2] for p in problems] == ["2", "3", "4", "5"]
    assert "UTF-8" in problems[0] and "nests too deeply" in problems[1] and "empty completion" in problems[2]


def test_an_empty_prompt_trains_like_a_text_line(tmp_path):
    from helpers import make_tiny_tokenizer

    from gradpruner.data.examples import load_jsonl, tokenize

    path = write(tmp_path / "d.jsonl", '{"prompt": "", "completion": "abc"}\n{"text": "abc"}\n')
    a, b = tokenize(load_jsonl(path), make_tiny_tokenizer())
    assert a == b and a["labels"][0] == -100 and a["labels"][1:] == a["input_ids"][1:]


@pytest.mark.parametrize("task,row,needle", [
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": 5}, "has label 5, expected an index from 0 to 1"),
    ("piqa", {"goal": "g", "sol1": "a", "sol2": "b", "label": True}, "label"),
    ("arc_easy", {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "E"},
     "answerKey 'E' that is not one of its choice labels"),
])
def test_labels_out_of_range(capsys, tiny_llama, tmp_path, task, row, needle, no_loading):
    good = {"goal": "g", "sol1": "a", "sol2": "b", "label": 1} if task == "piqa" else \
        {"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"}
    data = write(tmp_path / "rows.jsonl", json.dumps(good) + "\n" + json.dumps(row) + "\n")
    problems = fails(capsys, "eval", "--model", tiny_llama, "--task", task, "--data", data)
    assert len(problems) == 1 and "rows.jsonl line 2" in problems[0] and needle in problems[0]


def test_config_nesting_bomb_and_control_characters(tmp_path):
    from gradpruner.pipeline.config import load_config

    bomb = write(tmp_path / "bomb.yaml", "a: " + "[" * 100_000)
    with pytest.raises(GradPrunerError, match="not valid YAML"):
        load_config(bomb)
    with pytest.raises(GradPrunerError) as err:
        load_config(None, ['out="runs/a\\0b"', 'model="m\\tx"'])
    assert "Config key out" in str(err.value) and "Config key model" in str(err.value)


@pytest.mark.parametrize("change,needle", [
    ({"axes": {"method": {"../../escape": {}}}}, "may not contain '/'"),
    ({"axes": {"method": {"a\x00b": {}}}}, "control characters"),
    ({"out": "../outside"}, "Compare out '../outside'"),
    ({"store": "results/../../store"}, "Compare store"),
    ({"reuse": "results/x"}, "Compare reuse must be a list"),
])
def test_compare_paths_cannot_escape(tmp_path, change, needle):
    import yaml

    from gradpruner.pipeline.compare import load_grid

    spec = {"base": {"model": "m", "task": "piqa"}, "out": "results/c", "axes": {"method": {"igia": {}}}, **change}
    with pytest.raises(GradPrunerError) as err:
        load_grid(write(tmp_path / "c.yaml", yaml.safe_dump(spec, allow_unicode=True)))
    assert needle in str(err.value)


override_text = st.builds(lambda k, v: f"{k}={v}", st.sampled_from(
    ["model", "task", "out", "seed", "score", "score.steps", "plan.prune", "plan.merge", "finetune.mode", "eval.limit",
     "prune.density", "plan.prune.x", "nope", "", "score.lr", "finetune.distill"]), st.text(max_size=12))


@settings(max_examples=300, deadline=None)
@given(st.lists(override_text | st.text(max_size=12), max_size=5))
def test_any_overrides_either_build_or_list_problems(overrides):
    from gradpruner.pipeline.config import RunConfig, load_config

    try:
        cfg = load_config(None, overrides)
    except GradPrunerError as exc:
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems)
    else:
        assert isinstance(cfg, RunConfig)


yaml_leaf = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6) | st.dates()
yaml_value = st.recursive(yaml_leaf, lambda k: st.lists(k, max_size=3) | st.dictionaries(st.text(max_size=4), k, max_size=3),
                          max_leaves=8)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["base", "out", "axes", "store", "reuse", "overrides", "other"]), yaml_value,
                       max_size=6),
       st.dictionaries(st.text(max_size=4), st.dictionaries(st.text(max_size=4), yaml_value, max_size=2) |
                       st.fixed_dictionaries({"key": st.text(max_size=8), "values": st.lists(yaml_leaf, max_size=3)}),
                       min_size=1, max_size=2))
def test_any_compare_config_either_loads_or_lists_problems(tmp_path, spec, axes):
    import yaml

    from gradpruner.pipeline.compare import load_grid

    spec = {"base": {"model": "m", "task": "piqa"}, "out": "results/c", "axes": axes, **spec}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(spec, allow_unicode=True))
    try:
        out, cells = load_grid(path)
    except GradPrunerError as exc:
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems)
    else:
        assert ".." not in out.parts and all(".." not in Path(c.out).parts for _, c in cells)


plan_leaf = st.none() | st.booleans() | st.integers(-2, 10) | st.floats() | st.text(max_size=3)
plan_dicts = st.fixed_dictionaries(
    {}, optional={"num_layers": st.integers(-1, 10) | plan_leaf,
                  "keep": st.lists(st.integers(-1, 9) | plan_leaf, max_size=9) | plan_leaf,
                  "drop": st.lists(st.integers(-1, 9), max_size=9) | plan_leaf,
                  "merge": st.dictionaries(st.integers(-1, 9).map(str) | st.text(max_size=2), st.integers(-1, 9) | plan_leaf,
                                           max_size=3) | plan_leaf,
                  "layer_scores": st.lists(st.floats(), max_size=9) | plan_leaf})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(plan_dicts | st.lists(plan_leaf, max_size=3) | plan_leaf)
def test_any_plan_file_is_refused_in_words_or_reaches_the_model(tiny_llama, tmp_path, monkeypatch, plan):
    class Reached(Exception):
        pass

    def reached(*a, **k):
        raise Reached

    monkeypatch.setattr(api_pruning, "load_model", reached)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    try:
        api.prune(str(tiny_llama), path, tmp_path / "o", merge_rule="none", overwrite=True)
    except GradPrunerError as exc:
        assert exc.problems and all(isinstance(p, str) and p.strip() for p in exc.problems)
    except Reached:  # a valid plan for this 8-layer model
        from gradpruner.planning.plans import validate_plan

        assert sorted(validate_plan(plan, 8)["keep"] + validate_plan(plan, 8)["drop"]) == list(range(8))


# --- 8. loading never runs code from the model ----------------------------------------------------

def _with_custom_code(tiny_llama, tmp_path, model_type: str) -> Path:
    model = _copy_model(tiny_llama, tmp_path)
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(model_type=model_type, auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    write(model / "config.json", cfg)
    (model / "evil.py").write_text(
        f"open({str(tmp_path / 'RAN')!r}, 'w').write('code from the model ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        f"class EvilConfig(LlamaConfig):\n    model_type = {model_type!r}\n"
        "class EvilModel(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    return model


def test_custom_code_is_refused_without_trust_remote_code(capsys, tiny_llama, tmp_path):
    model = _with_custom_code(tiny_llama, tmp_path, "evilgpt")
    problems = fails(capsys, "prune", "--model", model, "--plan", write(tmp_path / "p.json", KEEP6), "--out", tmp_path / "o")
    assert "--trust-remote-code" in problems[0] and "never runs" in problems[0]
    assert not (tmp_path / "RAN").exists()


def test_a_known_architecture_loads_without_its_shipped_code(tiny_llama, tmp_path):
    model = _with_custom_code(tiny_llama, tmp_path, "llama")
    assert main(["prune", "--model", str(model), "--plan", str(write(tmp_path / "p.json", KEEP6)),
                 "--out", str(tmp_path / "o")]) == 0
    assert not (tmp_path / "RAN").exists() and layers_of(tmp_path / "o") == 6
