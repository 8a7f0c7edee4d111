"""Several processes: `torchrun --nproc_per_node 2` (CPU, gloo) gives the 1-process results, plainly (DDP)
and sharded with FSDP2 (`score --fsdp`: torch's fully_shard, real DTensors); the full-gradient accessor
picks the right way per backend. DeepSpeed is a stand-in here (a stub `deepspeed` module, stub accelerate
states): those tests prove which API our code calls and when, not that real DeepSpeed runs agree
(bench/deepspeed_cpu.py runs real DeepSpeed)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import types
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from gradpruner.cli import main
from gradpruner.errors import GradPrunerError
from gradpruner.util import distributed

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

BIN = Path(sys.executable).parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, procs: int = 2, timeout: int = 240, script: Path = BIN / "gradpruner") -> subprocess.CompletedProcess:
    cmd = [str(BIN / "torchrun"), "--nproc_per_node", str(procs), "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(script), *map(str, args)]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout)


def _close(a: torch.Tensor, b: torch.Tensor, rtol=1e-4):
    """Each step slice equal to ``rtol`` relative to its norm: the all-reduce sums in another order, so
    entries that nearly cancel differ more than elementwise tolerance allows."""
    a, b = a.double().reshape(a.shape[0], -1), b.double().reshape(b.shape[0], -1)
    err = (a - b).norm(dim=1) / a.norm(dim=1).clamp_min(1e-30)
    assert float(err.max()) <= rtol, f"relative error {float(err.max()):.2e}"


# --- end to end: 1 process vs 2 --------------------------------------------------------------

SCORE = ["--method", "igia", "--steps", "4", "--batch-size", "4", "--lr", "1e-3", "--seed", "0", "--max-length", "64"]


def test_score_on_two_processes_matches_one(tiny_llama, qa_file, tmp_path):
    two = torchrun("score", "--model", tiny_llama, "--data", qa_file, *SCORE, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(["score", "--model", str(tiny_llama), "--data", str(qa_file), *SCORE, "--out", str(tmp_path / "one")]) == 0
    assert two.stdout.count("method igia; wrote") == 1  # process 0 speaks, once
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # no stray temporaries
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["igia.safetensors", "layer_scores.png", "scores.json"]
    s1, s2 = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("one", "two"))
    assert (s2["processes"], s2["steps"], s2["batch_size"]) == (2, 4, 4) and "processes" not in s1
    assert s2["layer_scores"] == pytest.approx(s1["layer_scores"], rel=1e-4)
    assert s2["losses"] == pytest.approx(s1["losses"], rel=1e-5)  # the same global batches, token-weighted mean
    f1, f2 = (load_file(str(tmp_path / d / "igia.safetensors")) for d in ("one", "two"))
    assert f1.keys() == f2.keys()
    for k in f1:
        _close(f2[k], f1[k])


def test_score_sharded_with_fsdp2_on_two_processes_matches_one(tiny_llama, qa_file, tmp_path):
    """`score --fsdp`: every decoder layer and then the whole LoRA-wrapped model fully_shard-ed over 2 CPU
    processes (gloo), the Trainer's steps on DTensors, whole gradients read with full_tensor(). The
    method igia_saliency also reads the model after the steps (a whole copy, as the sharded one
    cannot run on process 0 alone); its IGIA rules are those of igia and igia_norm. Two micro-batches
    per step: the Trainer holds the reduce-scatter back until the last one."""
    flags = [*SCORE[2:], "--method", "igia_saliency", "--grad-accum", "2"]
    two = torchrun("score", "--model", tiny_llama, "--data", qa_file, *flags, "--fsdp", "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(["score", "--model", str(tiny_llama), "--data", str(qa_file), *flags, "--out", str(tmp_path / "one")]) == 0
    assert two.stdout.count("method igia_saliency; wrote") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["igia.safetensors", "layer_scores.png", "scores.json"]
    s1, s2 = (json.loads((tmp_path / d / "scores.json").read_text()) for d in ("one", "two"))
    assert s2["sharding"] == {"kind": "fsdp2", "processes": 2} and "sharding" not in s1
    assert (s2["processes"], s2["steps"], s2["method"]) == (2, 4, "igia_saliency")
    assert s2["layer_scores"] == pytest.approx(s1["layer_scores"], rel=1e-4)
    for rule in ("igia", "igia_norm"):
        assert s2["layer_scores_by_rule"][rule] == pytest.approx(s1["layer_scores_by_rule"][rule], rel=1e-4)
    assert s2["losses"] == pytest.approx(s1["losses"], rel=1e-5)
    f1, f2 = (load_file(str(tmp_path / d / "igia.safetensors")) for d in ("one", "two"))
    assert f1.keys() == f2.keys()
    for k in f1:
        _close(f2[k], f1[k])


def test_fsdp2_sharded_model_is_gathered_whole_on_process_0(tiny_llama, tmp_path):
    """finetune's gathering (`_whole` -> `sharding.full_state_dict`) on a fully_shard-ed LoRA model: every
    tensor whole on process 0, with the values of the shards (doubled there) and process 0's LoRA init
    (the processes start from different ones; shard() broadcasts process 0's)."""
    res = torchrun(tiny_llama, tmp_path / "gathered.safetensors", script=Path(__file__).with_name("fsdp_gather.py"))
    assert res.returncode == 0, res.stderr[-3000:]
    saved = load_file(str(tmp_path / "gathered.safetensors"))
    got = {k.removeprefix("got."): v for k, v in saved.items() if k.startswith("got.")}
    expect = {k.removeprefix("expect."): v for k, v in saved.items() if k.startswith("expect.")}
    assert got.keys() == expect.keys() and any("lora_B" in k for k in got)
    for k in got:
        torch.testing.assert_close(got[k], expect[k], rtol=0, atol=0)


def test_fsdp_needs_several_processes_and_an_igia_method(tiny_llama, qa_file, tmp_path, capsys, monkeypatch):
    from gradpruner.models import sharding

    assert main(["score", "--model", str(tiny_llama), "--data", str(qa_file), "--steps", "2", "--fsdp",
                 "--out", str(tmp_path / "s")]) == 2
    assert "--fsdp shards the model over the processes of a multi-process launch, but this is one process" \
        in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(GradPrunerError, match="method block_influence runs none"):
        sharding.check_launch(True, lora_steps=False, method="block_influence")
    sharding.check_launch(True, lora_steps=True)
    sharding.check_launch(False, lora_steps=False)


def test_capture_refuses_fsdp1(tmp_path):
    """FSDP1's flat-parameter gradients are not read (no summon_full_params path): one sentence instead."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    from gradpruner.scoring.capture import IGIACallback

    wrapped = FullyShardedDataParallel.__new__(FullyShardedDataParallel)
    torch.nn.Module.__init__(wrapped)  # a stand-in: only its class matters
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    model.add_module("fsdp", wrapped)
    with pytest.raises(GradPrunerError, match=r"under FSDP1 \(FullyShardedDataParallel\); use FSDP2"):
        IGIACallback(tmp_path / "s", steps=2).start_reading(SimpleNamespace(max_grad_norm=0.0), model, None)


def test_finetune_on_two_processes_matches_one(tiny_llama, qa_file, tmp_path):
    flags = ["--max-steps", "3", "--batch-size", "4", "--lr", "1e-2", "--lora-dropout", "0", "--seed", "0",
             "--save-steps", "2", "--max-length", "64"]
    two = torchrun("finetune", "--model", tiny_llama, "--data", qa_file, *flags, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(["finetune", "--model", str(tiny_llama), "--data", str(qa_file), *flags, "--out", str(tmp_path / "one")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one", "two"]  # checkpoints removed, nothing else
    w1, w2 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert w1.keys() == w2.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-6)
    r2 = json.loads((tmp_path / "two" / "finetune.json").read_text())
    assert r2["optimizer_steps"] == 3


def test_a_batch_that_does_not_split_fails_on_every_process_without_hanging(tiny_llama, qa_file, tmp_path):
    res = torchrun("score", "--model", tiny_llama, "--data", qa_file, "--steps", "2", "--batch-size", "5",
                   "--out", tmp_path / "s", timeout=120)
    assert res.returncode != 0
    assert res.stderr.count("does not split over 2 processes") == 1  # said once, by process 0
    assert not (tmp_path / "s").exists()


# --- process 0 writes, errors agree (one process) ---------------------------------------------

def test_check_batch_and_per_device_batch(monkeypatch):
    distributed.check_batch(8, 2, processes=4)
    with pytest.raises(GradPrunerError, match="use a multiple of 4"):
        distributed.check_batch(6, 2, processes=2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert distributed.per_device_batch(8, 2) == 2
    monkeypatch.delenv("WORLD_SIZE")
    assert distributed.per_device_batch(8, 2) == 4 and distributed.is_main()


def test_on_main_in_one_process_is_a_plain_call():
    assert distributed.on_main(lambda: 3, lambda: pytest.fail("others run only on other processes")) == 3
    with pytest.raises(GradPrunerError, match="boom"):
        distributed.on_main(lambda: (_ for _ in ()).throw(GradPrunerError("boom")))


# --- the full-gradient accessor ---------------------------------------------------------------

@pytest.fixture
def stub_deepspeed(monkeypatch):
    """A stand-in `deepspeed` package whose safe_get_full_grad records each parameter it is given."""
    calls = []

    def safe_get_full_grad(param):
        calls.append(param)
        return param.grad * 1  # the real one gathers the ZeRO partitions into the whole fp32 gradient

    utils = types.ModuleType("deepspeed.utils")
    utils.safe_get_full_grad = safe_get_full_grad
    pkg = types.ModuleType("deepspeed")
    pkg.utils = utils
    monkeypatch.setitem(sys.modules, "deepspeed", pkg)
    monkeypatch.setitem(sys.modules, "deepspeed.utils", utils)
    return calls


def test_backend_is_chosen_from_stub_accelerate_states_and_env(monkeypatch):
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP"):
        monkeypatch.delenv(var, raising=False)
    assert distributed.grad_backend(None) == "plain"
    state = SimpleNamespace(distributed_type="DistributedType.MULTI_CPU")
    assert distributed.grad_backend(SimpleNamespace(distributed_state=state, deepspeed=None, fsdp=None)) == "plain"
    state = SimpleNamespace(distributed_type="DistributedType.FSDP")
    assert distributed.grad_backend(SimpleNamespace(distributed_state=state, deepspeed=None, fsdp=None)) == "fsdp"
    from torch.distributed.tensor import DTensor

    dtensor = torch.Tensor._make_subclass(DTensor, torch.zeros(2))  # a stand-in: FSDP2 makes parameters DTensors
    whole, sharded = (SimpleNamespace(parameters=lambda t=t: iter([t])) for t in (torch.zeros(2), dtensor))
    assert distributed.grad_backend(None, whole) == "plain" and distributed.grad_backend(None, sharded) == "fsdp"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert distributed.grad_backend(None) == "deepspeed"


def test_accessor_calls_the_deepspeed_and_fsdp_apis_on_stubs(stub_deepspeed):
    p = torch.nn.Parameter(torch.ones(2, 3))
    p.grad = torch.full((2, 3), 2.0)
    assert distributed.full_grad(p) is p.grad and not stub_deepspeed
    torch.testing.assert_close(distributed.full_grad(p, "deepspeed"), p.grad)
    assert stub_deepspeed == [p]
    whole = torch.arange(6.0)
    sharded = SimpleNamespace(grad=SimpleNamespace(full_tensor=lambda: whole))  # an FSDP2 DTensor gradient
    assert distributed.full_grad(sharded, "fsdp") is whole
    p.ds_shape = torch.Size([4, 3])  # ZeRO-3 keeps the whole shape there; .shape is the partition's
    assert distributed.full_shape(p, "deepspeed") == (4, 3) and distributed.full_shape(p) == (2, 3)
    assert distributed.module_name("_orig_mod.base_model.model.model.layers.0."
                                   "_checkpoint_wrapped_module.self_attn.q_proj") == "base_model.model.model.layers.0.self_attn.q_proj"


def test_capture_with_stub_deepspeed_reads_full_grads_inside_the_optimizer_step(stub_deepspeed, monkeypatch, tiny_llama, tmp_path):
    """DeepSpeed steps inside accelerator.backward, before on_pre_optimizer_step: the capture must
    run first thing in its optimizer step and read the gradients through safe_get_full_grad."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from gradpruner.scoring.capture import IGIACallback

    monkeypatch.setattr(distributed, "grad_backend", lambda args=None, model=None: "deepspeed")
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama), LoraConfig(r=2, target_modules=["q_proj"]))
    seen = []
    inner = SimpleNamespace(step=lambda: seen.append(len(stub_deepspeed)))
    cb = IGIACallback(tmp_path / "s", steps=2)
    args, state = SimpleNamespace(logging_nan_inf_filter=True), SimpleNamespace(is_world_process_zero=True, global_step=0)
    cb.on_train_begin(args, state, None, model=model, optimizer=SimpleNamespace(optimizer=inner))
    for step in range(2):
        model.zero_grad()
        model(input_ids=torch.tensor([[1, 5, 9, 4]]), labels=torch.tensor([[1, 5, 9, 4]])).loss.backward()
        cb.on_pre_optimizer_step(args, state, None, model=model)  # too late under DeepSpeed: ignored
        assert cb.captured == step
        inner.step()  # DeepSpeed's engine.step -> optimizer.step: the capture runs first
        assert cb.captured == step + 1
    assert seen == [16, 32]  # 8 modules × (A, B) read through safe_get_full_grad before each step
    cb.on_log(args, state, None, logs={"loss": 1.0})
    assert json.loads((tmp_path / "s" / "scores.json").read_text())["steps"] == 2
    fac = load_file(str(tmp_path / "s" / "igia.safetensors"))
    q = model.base_model.model.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(fac["model.layers.0.self_attn.q_proj.grad_B"][1], q.lora_B["default"].weight.grad)


def test_capture_under_deepspeed_refuses_gradient_clipping(monkeypatch, tmp_path):
    """Under DeepSpeed the capture reads before DeepSpeed clips, a plain run after the Trainer clips: with
    clipping on the two would capture different gradients, so the capture refuses and names the cause."""
    from gradpruner.errors import GradPrunerError
    from gradpruner.scoring.capture import IGIACallback

    monkeypatch.setattr(distributed, "grad_backend", lambda args=None, model=None: "deepspeed")
    cb = IGIACallback(tmp_path / "s", steps=2)
    with pytest.raises(GradPrunerError, match="before DeepSpeed clips them.*--max-grad-norm 0"):
        cb.start_reading(SimpleNamespace(max_grad_norm=1.0), None, SimpleNamespace(optimizer=SimpleNamespace(step=print)))
    cb.start_reading(SimpleNamespace(max_grad_norm=0.0), None, SimpleNamespace(optimizer=SimpleNamespace(step=print)))


def test_full_grad_method_with_deepspeed_backend_forced_reads_through_the_accessor(monkeypatch, tiny_llama, qa_file):
    """The full_grad scoring method under DeepSpeed: whole gradients through the accessor, read first
    thing in the optimizer step (DeepSpeed's step runs before on_pre_optimizer_step); same scores as
    the plain run. (A fake `deepspeed` module would confuse transformers' import checks here, so the
    accessor itself is recorded instead; test_accessor_calls_the_deepspeed_and_fsdp_apis_on_stubs
    covers what it calls.)"""
    from gradpruner.data.examples import load_examples, tokenize
    from gradpruner.models.loading import load_model, load_tokenizer
    from gradpruner.scoring.methods import Context, full_grad

    def scores():
        model, tok = load_model(tiny_llama), load_tokenizer(tiny_llama)
        feats = tokenize(load_examples(data=qa_file, split="train"), tok, max_length=64)
        return full_grad(Context(model, tok, feats, seed=0, batch_size=4, steps=2, lr=1e-4))["layer_scores"]

    plain = scores()
    calls, real = [], distributed.full_grad
    monkeypatch.setattr(distributed, "full_grad", lambda p, backend="plain": calls.append(backend) or real(p))
    monkeypatch.setattr(distributed, "grad_backend", lambda args=None, model=None: "deepspeed")
    assert scores() == pytest.approx(plain, rel=1e-6)
    assert calls == ["deepspeed"] * (2 * 8 * 7)  # 2 steps x 8 layers x 7 linear modules, inside the step
