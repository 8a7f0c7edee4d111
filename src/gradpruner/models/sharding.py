"""FSDP2 (torch's ``fully_shard``) for ``gradpruner score --fsdp``: shard a LoRA-wrapped causal LM over
the processes of a ``torchrun`` launch, and gather a sharded model's whole state dict back.

``shard`` applies ``fully_shard`` to every decoder layer, then to the whole model (the embeddings,
the final norm and the head, tied weights in that one group), over one mesh of all processes: gloo
on CPU processes, NCCL on GPUs. Every parameter, the LoRA factors included, becomes a DTensor holding
1/W of it; a layer's weights are gathered for its forward and backward and freed after, and the
gradients are reduce-scattered (averaged) into shards. The capture reads whole gradients with
``full_tensor()`` (``util.distributed.full_grad``).

The training itself stays ``transformers.Trainer`` (``scoring.methods.train_steps``), so the batches,
the loss normalisation, clipping, logging and the callback events are those of a one-process or DDP
run. accelerate would wrap the sharded model in DDP, which it refuses for DTensor parameters
("Your model contains `DTensor` parameters, which is incompatible with DDP"); the Trainer skips that
wrapping for a model sharded before it (``is_distributed_loading_by_transformers``, the flag of
``from_pretrained(distributed_config=...)``), which ``shard`` sets on the model.
"""
from __future__ import annotations

import torch

from gradpruner.errors import GradPrunerError
from gradpruner.models import architectures
from gradpruner.util import distributed

KIND = "fsdp2"


def check_launch(fsdp: bool, lora_steps: bool = True, method: str = "igia") -> None:
    """Refuse ``--fsdp`` in one process, or for a method that runs no LoRA steps."""
    if not fsdp:
        return
    if distributed.world_size() < 2:
        raise GradPrunerError("--fsdp shards the model over the processes of a multi-process launch, but this is one "
                              "process; run the command under `torchrun --nproc-per-node N` (N ≥ 2) or drop --fsdp.")
    if not lora_steps:
        raise GradPrunerError(f"--fsdp shards the LoRA steps of the IGIA methods, and method {method} runs none; "
                              "drop --fsdp or use an IGIA method (igia, igia_norm, igia_guarded, …).")


def _fully_shard():
    try:
        from torch.distributed.fsdp import fully_shard
    except ImportError:
        raise GradPrunerError(f"--fsdp needs torch.distributed.fsdp.fully_shard (torch ≥ 2.6); this is torch "
                              f"{torch.__version__}.") from None
    return fully_shard


def shard(model) -> dict:
    """Shard ``model`` (a peft model or a plain causal LM) in place over all processes with
    ``fully_shard``: each decoder layer, then the whole model. Returns the record for scores.json.

    Every process must call it, with the same weights: the trainable ones (the LoRA factors, seeded
    alike on every process) are first broadcast from process 0, as DDP does; the frozen ones are read
    from the same checkpoint everywhere."""
    fully_shard = _fully_shard()
    from torch.distributed.device_mesh import init_device_mesh

    device = next(model.parameters()).device  # where the runtime put it
    distributed.group_on(cpu=device.type == "cpu")
    distributed.ensure_group()
    processes = distributed.world_size()
    _hand_to_trainer(model, processes)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:  # fully_shard keeps each process's own copy of its part: make them one
                torch.distributed.broadcast(p.data, src=0)
    mesh = init_device_mesh(device.type, (processes,))  # fully_shard keeps each layer on this device
    for layer in architectures.find_decoder_layers(model)[2]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return {"kind": KIND, "processes": processes}


def _hand_to_trainer(model, processes: int) -> None:
    """Make ``transformers.Trainer`` take ``model`` as it is: no DDP wrapping, no second sharding,
    no ``.to(device)`` (the path of a model sharded at load time). Its config says how it is sharded
    (FSDP over all processes, no replicas): with gradient accumulation the Trainer reads that to hold
    the reduce-scatter back until the last micro-batch (``set_requires_gradient_sync``)."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner._is_distributed_loading_by_transformers = True
    if not getattr(model, "is_distributed_loading_by_transformers", False):
        import transformers

        raise GradPrunerError("--fsdp needs a transformers whose Trainer trains a model sharded before it "
                              "(is_distributed_loading_by_transformers, transformers 5); this is "
                              f"{transformers.__version__}.")
    from transformers.distributed import DistributedConfig

    inner.config.distributed_config = DistributedConfig(fsdp_size=processes)


def full_state_dict(model) -> dict[str, torch.Tensor] | None:
    """The whole state dict of an FSDP2-sharded ``model`` on process 0 (on the CPU), None on the others.
    A collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return state if distributed.is_main() else None
