"""Run by tests/test_distributed.py under ``torchrun --nproc_per_node 2`` (CPU, gloo): shard a tiny
LoRA model with FSDP2 (``models.sharding.shard``), change every shard, and gather it back the way
``finetune`` does (``finetune._whole``). Process 0 writes what it got and what it expected to OUT.

Usage: torchrun --nproc_per_node 2 tests/fsdp_gather.py MODEL_DIR OUT
"""
import sys
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

from gradpruner.finetuning import finetune
from gradpruner.finetuning.config import FinetuneConfig
from gradpruner.models import sharding
from gradpruner.models.loading import load_model
from gradpruner.util import distributed

model_dir, out = sys.argv[1:3]
cfg = FinetuneConfig(rank=4, lora_dropout=0.0)
torch.manual_seed(distributed.rank())  # different LoRA init per process: shard() must make them one (process 0's)
model = finetune._peft_model(load_model(model_dir), cfg)
with torch.no_grad():
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_()  # B starts at zero; give it values the check can see
plain = {k: v.clone() for k, v in model.state_dict().items()}
record = sharding.shard(model)
assert record == {"kind": "fsdp2", "processes": 2}, record
assert distributed.is_sharded(model) and distributed.grad_backend(None, model) == distributed.FSDP
with torch.no_grad():
    for p in model.parameters():
        p.mul_(2.0)  # on the DTensor shards only: the gathered model must show it everywhere
trainer = SimpleNamespace(args=SimpleNamespace(), model_wrapped=model)
whole = finetune._whole(trainer, model, cfg, reload=lambda: load_model(model_dir))
if distributed.is_main():
    # process 0's plain copy, doubled; a B that came from another process's init would differ
    expect = {k: 2.0 * v for k, v in plain.items()}
    got = {k: v.detach().clone() for k, v in whole.state_dict().items()}  # clone: tied weights share storage
    save_file({f"got.{k}": v for k, v in got.items()} | {f"expect.{k}": v for k, v in expect.items()}, out)
else:
    assert whole is None, "only process 0 gets the whole model"
torch.distributed.barrier()
