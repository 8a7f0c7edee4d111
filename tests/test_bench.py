"""`gradpruner bench`: analytic costs against the real model and FlopCounterMode, and the side-by-side run."""
from __future__ import annotations

import json
import math
import statistics

import pytest
import torch
from helpers import TINY_CONFIGS, make_tiny_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import AutoModelForCausalLM

from gradpruner.cli import main
from gradpruner.models.runtime import RuntimeConfig
from gradpruner.measure.bench import alternate, bench_models
from gradpruner.measure.costs import analytic_costs, flops_per_token, param_counts
from gradpruner.models.loading import (
    load_config,
    load_model,
    load_tokenizer,
    save_model,
)
from gradpruner.pruning.surgery import remove_layers

KEEP = [1, 4, 5]  # 3 of the tiny model's 8 layers


@pytest.fixture(scope="module")
def pruned_dir(tiny_llama, tmp_path_factory):
    model = remove_layers(load_model(tiny_llama), KEEP)
    out = tmp_path_factory.mktemp("models") / "tiny-llama-pruned"
    out.mkdir()
    save_model(model, load_tokenizer(tiny_llama), out)
    return out


@pytest.mark.parametrize("arch", sorted(TINY_CONFIGS))
def test_analytic_params_equal_the_models(arch):
    model = make_tiny_model(arch)
    costs, real = analytic_costs(model.config, 32), param_counts(model)
    assert costs["params"]["total"] == real["total"]  # a tied head counted once
    assert costs["params"]["decoder_layers"] == real["decoder_layers"]
    assert costs["params"]["embedding"] == model.get_input_embeddings().weight.numel()
    assert costs["macs_per_token"] == flops_per_token(model, 32)["macs"]  # the module-walking count agrees


def test_forward_flops_match_flop_counter():
    # FlopCounterMode counts matrix products only (mm, bmm, addmm, convolutions, SDPA kernels it
    # knows). Eager attention is two matmuls per layer (QKᵀ over all S keys, then AV), which it sees;
    # CPU SDPA's fused kernel it does not count in torch 2.13, hence eager here. Norms, rotary,
    # SiLU, softmax and residual adds are uncounted by both, so the two totals agree exactly.
    S = 32
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(TINY_CONFIGS["llama"](8), attn_implementation="eager").eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids=torch.randint(0, 300, (1, S)))
    counted = counter.get_total_flops()
    assert {str(op).split(".")[-1] for op in counter.get_flop_counts()["Global"]} <= {"mm", "bmm", "addmm"}
    analytic = analytic_costs(model.config, S)["flops_per_token"] * S
    assert abs(counted - analytic) / analytic < 0.02, (counted, analytic)


def test_pruned_flops_ratio_is_the_hand_computed_one(tiny_llama, pruned_dir):
    dense, pruned = (analytic_costs(load_config(p), 16) for p in (tiny_llama, pruned_dir))
    # h=64, 4 query / 2 kv heads of 16, MLP 128, vocab 300, S=16: per layer 64·64 (q) + 2·64·32 (k, v)
    # + 64·64 (o) + 3·64·128 = 36864 linear MACs and 2·16·4·16 = 2048 attention MACs; head 300·64.
    layer, head = 36864 + 2048, 300 * 64
    assert dense["macs_per_token"] == 8 * layer + head and pruned["macs_per_token"] == 3 * layer + head
    assert pruned["flops_per_token"] / dense["flops_per_token"] == pytest.approx((3 * layer + head) / (8 * layer + head))
    assert pruned["params"]["decoder_layers"] * 8 == dense["params"]["decoder_layers"] * 3


def test_lora_step_uses_the_finetune_defaults():
    from gradpruner.finetuning.config import FinetuneConfig
    from gradpruner.measure import bench

    cfg = FinetuneConfig()
    assert (bench.LORA_ALPHA, bench.LORA_DROPOUT) == (cfg.alpha, cfg.lora_dropout)


def test_table_layout():
    from gradpruner.measure.bench import format_table
    from gradpruner.util.tables import markdown_table

    rows = [{"group": "size", "metric": "parameters, total", "unit": "", "shape": "", "dense": 2.5e6, "pruned": 1.5e6,
             "ratio": 0.6, "predicted": None, "basis": None},
            {"group": "inference", "metric": "prefill latency", "unit": "s", "shape": "b1 s16", "dense": 0.2,
             "pruned": 0.1, "ratio": 0.5, "predicted": 0.4, "basis": "flops"}]
    assert format_table({"rows": rows}) == (
        "| group | metric | shape | dense | pruned | pruned/dense | predicted |\n"
        "|---|---|---|---:|---:|---:|---:|\n"
        "| size | parameters, total |  | 2.50M | 1.50M | 0.600 |  |\n"
        "| inference | prefill latency (s) | b1 s16 | 0.2000 | 0.1000 | 0.500 | 0.400 (FLOPs) |")
    assert markdown_table(["a", "b"], [["1", "2"]]) == "| a | b |\n|---|---|\n| 1 | 2 |"
    with pytest.raises(ValueError):
        markdown_table(["a", "b"], [], align="r")


def test_latency_is_the_bench_measurement(tiny_llama):
    from gradpruner.measure.costs import latency

    lat = latency(load_model(tiny_llama), seq=8, batch=2, new_tokens=2, reps=1)
    assert {k: lat[k] for k in ("seq", "batch", "new_tokens")} == {"seq": 8, "batch": 2, "new_tokens": 2}
    assert lat["prefill_s"] > 0 and lat["decode_tokens_per_s"] > 0


def test_alternate_interleaves_after_warmup():
    calls = []
    runs = alternate({"dense": lambda: calls.append("d") or 1.0, "pruned": lambda: calls.append("p") or 2.0}, 3, 1)
    assert calls == ["d", "p"] + ["d", "p"] * 3 and runs == {"dense": [1.0] * 3, "pruned": [2.0] * 3}


def test_bench_models_reports_every_field(tiny_llama, pruned_dir):
    res = bench_models(tiny_llama, pruned_dir, seqs=[16], batches=[1, 2], reps=1, warmup=1, new_tokens=2,
                       train_batch=2, train_seq=16, runtime=RuntimeConfig(device="cpu"))
    rows = res["rows"]
    expected = {("size", "parameters, total"), ("size", "parameters, decoder layers"), ("size", "parameters, embedding"),
                ("compute", "MACs per token (forward)"), ("compute", "FLOPs per token (forward)"),
                ("inference", "prefill latency"), ("inference", "prefill throughput"),
                ("inference", "decode throughput (+2 tok, KV cache)"), ("train", "lora step time"),
                ("train", "full step time"), ("memory", "inference peak"), ("memory", "lora step peak"),
                ("memory", "full step peak")}
    assert {(r["group"], r["metric"]) for r in rows} == expected
    assert sum(r["metric"] == "prefill latency" for r in rows) == 2  # one per (batch, seq)
    for r in rows:
        for key in ("dense", "pruned", "ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, r
        assert r["ratio"] == pytest.approx(statistics.median(r["pruned_runs"]) / statistics.median(r["dense_runs"]))
        if r["group"] in ("inference", "train", "memory"):
            assert r["predicted"] > 0 and r["basis"] == ("params" if r["group"] == "memory" else "flops")
    by = {(r["group"], r["metric"], r["shape"]): r for r in rows}
    total = by["size", "parameters, total", ""]
    assert total["dense"] == sum(p.numel() for p in load_model(tiny_llama).parameters())  # a tied head once
    assert by["memory", "inference peak", "b1 s16"]["predicted"] == total["ratio"]
    assert by["train", "full step time", "b2 s16"]["predicted"] == pytest.approx(
        by["compute", "FLOPs per token (forward)", "s16"]["ratio"])
    assert res["settings"]["device"] == "cpu" and res["settings"]["dtype"] == "float32"
    assert res["runtime"] == {"device": "cpu", "dtype": "float32"}


def test_cli_writes_json_and_table(tiny_llama, pruned_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    rc = main(["bench", "--model", str(tiny_llama), "--pruned", str(pruned_dir), "--seq", "8", "16", "--batch", "1",
               "--reps", "1", "--new-tokens", "2", "--skip-memory", "--skip-train", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| pruned/dense |" in printed and "prefill latency" in printed
    saved = json.loads((out / "bench.json").read_text())
    assert {r["group"] for r in saved["rows"]} == {"size", "compute", "inference"}
    assert saved["settings"]["seqs"] == [8, 16]
    assert "| pruned/dense |" in (out / "bench.md").read_text()


@pytest.mark.parametrize("swap", [False, True])
def test_cli_missing_model_is_one_sentence(tiny_llama, tmp_path, capsys, swap):
    missing = str(tmp_path / "no-such-model")
    models = [missing, str(tiny_llama)] if swap else [str(tiny_llama), missing]
    out = tmp_path / "bench"
    rc = main(["bench", "--model", models[0], "--pruned", models[1], "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert ("--model" if swap else "--pruned") in err and "does not exist" in err
    assert not out.exists()


def test_bad_options_are_named(tiny_llama, pruned_dir, capsys):
    rc = main(["bench", "--model", str(tiny_llama), "--pruned", str(pruned_dir), "--reps", "0", "--seq", "0"])
    err = capsys.readouterr().err
    assert rc == 2 and "--reps" in err and "--seq" in err
