"""Several processes (``torchrun`` / ``accelerate launch``): who writes, how errors agree, full gradients.

Every process runs the same command. ``--batch-size`` is the global batch of one optimizer step,
split evenly over the processes; the Trainer averages the gradients (DDP all-reduce, FSDP2
reduce-scatter or DeepSpeed) and normalises the loss by the token count of the whole global batch.
Only process 0 writes the outputs: ``on_main`` runs the writing there and hands its result, or its
error, to every process, so all of them return the same value or fail with the same message.

Gradient capture reads the *full* averaged gradient of a parameter: ``.grad`` for one process and
DDP, the DTensor gradient's ``full_tensor()`` under FSDP2 (``fully_shard``: ``score --fsdp``, see
``gradpruner.models.sharding``, or accelerate's ``fsdp_version: 2``) and
``deepspeed.utils.safe_get_full_grad`` under DeepSpeed ZeRO. FSDP1 (``FullyShardedDataParallel``) is
refused: its flat-parameter gradients would need ``summon_full_params``, a path never run here.
"""
from __future__ import annotations

import os

import torch

from gradpruner.errors import GradPrunerError

PLAIN, FSDP, DEEPSPEED = "plain", "fsdp", "deepspeed"


# --- ranks ------------------------------------------------------------------------------------

def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def world_size() -> int:
    """Processes in this run (1 without a launcher); read from the launcher's environment until the
    process group exists."""
    if _initialized():
        return torch.distributed.get_world_size()
    return max(1, int(os.environ.get("WORLD_SIZE", "1") or 1))


def rank() -> int:
    if _initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0") or 0)


def is_main() -> bool:
    """Whether this is process 0, the only one that writes outputs."""
    return rank() == 0


def check_batch(batch_size: int, grad_accum: int = 1, processes: int | None = None) -> None:
    """Refuse a global batch that does not split evenly over processes × accumulation steps."""
    processes = world_size() if processes is None else processes
    if processes > 1 and isinstance(batch_size, int) and isinstance(grad_accum, int) and grad_accum >= 1 \
            and batch_size >= 1 and batch_size % (processes * grad_accum):
        raise GradPrunerError(
            f"--batch-size {batch_size} (the global batch per optimizer step) does not split over {processes} "
            f"processes × {grad_accum} accumulation steps; use a multiple of {processes * grad_accum}.")


def per_device_batch(batch_size: int, grad_accum: int = 1) -> int:
    """Examples per process and micro-batch for a global ``batch_size`` (checked by ``check_batch``)."""
    check_batch(batch_size, grad_accum)
    return batch_size // grad_accum // world_size()


_group_on_cpu: bool | None = None  # where this process's model runs, once a stage's runtime said (group_on)


def group_on(cpu: bool) -> None:
    """Record where this process's model runs (``Runtime.activate``, from ``load_model``), so that a process
    group started later is started for it: the first start decides for the whole process (the Trainer
    reuses it), and a NCCL group under a CPU runtime would break the Trainer's collectives."""
    global _group_on_cpu
    _group_on_cpu = cpu


def ensure_group() -> None:
    """Start the process group the way the Trainer does (accelerate's ``PartialState``: gloo on the CPU,
    NCCL on GPUs) if nothing has yet, for the device ``group_on`` recorded; before any stage recorded one
    (a command that holds no model), accelerate's own choice."""
    if not _initialized():
        from accelerate import PartialState

        PartialState() if _group_on_cpu is None else PartialState(cpu=_group_on_cpu)


def barrier() -> None:
    if world_size() > 1:
        ensure_group()
        torch.distributed.barrier()


# --- process 0 writes, everyone agrees --------------------------------------------------------

def _describe(exc: BaseException) -> str:
    if isinstance(exc, GradPrunerError):
        return str(exc)
    return f"Process 0 failed with {type(exc).__name__}: {exc}; see its traceback above."


def on_main(main, others=None, wait: bool = False):
    """``main()`` on process 0 and ``others()`` (default: nothing) on the rest, at the same time, so
    both may take part in the same collectives (training); then every process returns ``main``'s
    value or raises its error. ``wait``: all processes reach a barrier before ``main`` runs (use it
    when process 0 removes something the others may still be writing). One process: just ``main()``."""
    if world_size() == 1:
        return main()
    if wait:
        barrier()
    value, error = None, None
    try:
        value = main() if is_main() else (others() if others is not None else None)
    except BaseException as exc:  # noqa: BLE001 - handed to the other processes, then raised again
        error = exc
    ensure_group()
    payload = [(error is None, value if error is None else _describe(error))] if is_main() else [None]
    torch.distributed.broadcast_object_list(payload, src=0)
    ok, shared = payload[0]
    if error is not None:
        raise error
    if not ok:
        raise GradPrunerError(shared)
    return shared


def any_process(flag: bool) -> bool:
    """Whether ``flag`` is true on any process (an all-reduce; all processes must call it)."""
    if world_size() == 1 or not _initialized():
        return bool(flag)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" \
        else torch.device("cpu")
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


# --- full gradients ---------------------------------------------------------------------------

def grad_backend(args=None, model=None) -> str:
    """How gradients are laid out in this run: ``plain`` (one process, DDP), ``fsdp`` or ``deepspeed``.
    A ``model`` whose parameters are DTensors (sharded with ``fully_shard``, as ``score --fsdp`` does
    in ``gradpruner.models.sharding``) is ``fsdp`` whatever the Trainer was told."""
    kind = None
    state = getattr(args, "distributed_state", None) if args is not None else None
    if state is not None:
        kind = str(getattr(state, "distributed_type", "")).upper()
    if (kind and "DEEPSPEED" in kind) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true" \
            or (args is not None and getattr(args, "deepspeed", None)):
        return DEEPSPEED
    if (kind and "FSDP" in kind) or os.environ.get("ACCELERATE_USE_FSDP", "").lower() == "true" \
            or (args is not None and getattr(args, "fsdp", None)) or is_sharded(model):
        return FSDP
    return PLAIN


def is_sharded(model) -> bool:
    """Whether any parameter of ``model`` is a DTensor (FSDP2 ``fully_shard``)."""
    if model is None or not torch.distributed.is_available():
        return False
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5: no public DTensor, and no fully_shard either
        return False
    return any(isinstance(p, DTensor) for p in model.parameters())


def check_not_fsdp1(model, who: str) -> None:
    """Refuse a model wrapped in FSDP1 (``FullyShardedDataParallel``): its gradients are flat shards."""
    if model is None or not torch.distributed.is_available():
        return
    from torch.distributed.fsdp import FullyShardedDataParallel

    if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
        raise GradPrunerError(f"{who} cannot read whole gradients under FSDP1 (FullyShardedDataParallel); use FSDP2: "
                              "`gradpruner score --fsdp` under torchrun, or fsdp_version: 2 in the accelerate config.")


def full_grad(param: torch.Tensor, backend: str = PLAIN) -> torch.Tensor | None:
    """The whole (averaged) gradient of ``param``, or None when it has none.

    ``plain``: ``param.grad``. ``fsdp``: a DTensor gradient (FSDP2) is gathered with ``full_tensor()``
    (a collective: every process must call it for the same parameters). ``deepspeed``:
    ``deepspeed.utils.safe_get_full_grad`` (a collective under ZeRO-3: every process must call it for
    the same parameters, before DeepSpeed's optimizer step)."""
    if backend == DEEPSPEED:
        from deepspeed.utils import safe_get_full_grad

        return safe_get_full_grad(param)
    grad = param.grad
    if grad is not None and backend == FSDP and hasattr(grad, "full_tensor"):
        return grad.full_tensor()
    return grad


def full_shape(param: torch.Tensor, backend: str = PLAIN) -> tuple[int, ...]:
    """The unsharded shape of ``param`` (ZeRO-3 keeps it in ``ds_shape``; a DTensor's ``shape`` is the whole one)."""
    shape = getattr(param, "ds_shape", None) if backend == DEEPSPEED else None
    return tuple(shape if shape is not None else param.shape)


def call_before_step(optimizer, fn) -> bool:
    """Make DeepSpeed's optimizer run ``fn()`` first in every step.

    Under accelerate, DeepSpeed's ``engine.step()`` (clipping, update, zeroing the gradients) runs
    inside ``accelerator.backward`` at the end of the accumulation, before the Trainer's
    ``on_pre_optimizer_step``; wrapping the ZeRO optimizer's ``step`` is the last moment the
    reduced gradients exist. False when ``optimizer`` has no inner optimizer to wrap."""
    inner = getattr(optimizer, "optimizer", None)
    if inner is None or not callable(getattr(inner, "step", None)):
        return False
    step = inner.step

    def wrapped(*args, **kwargs):
        fn()
        return step(*args, **kwargs)

    inner.step = wrapped
    return True


class GradientReader:
    """Mixin for a ``TrainerCallback`` whose ``read()`` runs once per optimizer step while the whole
    averaged gradients exist: at ``on_pre_optimizer_step``, or under DeepSpeed (whose step runs
    earlier, inside the backward) first thing in its optimizer step. A subclass calls ``start_reading``
    from its ``on_train_begin`` and defines ``read`` (and ``reading``, False to skip a step)."""

    backend, grad_model = PLAIN, None

    def start_reading(self, args, model, optimizer) -> None:
        check_not_fsdp1(model, type(self).__name__)
        self.backend, self.grad_model = grad_backend(args, model), model
        if self.backend == DEEPSPEED and (getattr(args, "max_grad_norm", 0) or 0) > 0:
            # measured: a plain run reads the gradients after the Trainer has clipped them (it clips before
            # on_pre_optimizer_step), a DeepSpeed run before DeepSpeed clips them (inside its step), so the
            # captured gradients would differ by the clipping factor from the first step on
            raise GradPrunerError(
                f"{type(self).__name__} under DeepSpeed with gradient clipping (max_grad_norm {args.max_grad_norm}) would "
                "read the gradients before DeepSpeed clips them, while a run without DeepSpeed reads them after "
                "clipping, so the scores would not match; score with --max-grad-norm 0 (the default) under DeepSpeed.")
        if self.backend == DEEPSPEED and not call_before_step(optimizer, self._read):
            raise GradPrunerError(f"{type(self).__name__} cannot reach DeepSpeed's optimizer step to read the "
                                  "gradients; run without DeepSpeed (DDP or FSDP) or report this setup.")

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.backend != DEEPSPEED:  # DeepSpeed has stepped already; see start_reading
            self._read()

    def reading(self) -> bool:
        return True

    def read(self) -> None:
        raise NotImplementedError

    def _read(self) -> None:
        if self.reading():
            self.read()


def module_name(name: str) -> str:
    """A module name without the wrappers activation checkpointing and ``torch.compile`` insert (FSDP2
    renames nothing)."""
    for wrapper in ("_checkpoint_wrapped_module.", "_orig_mod."):
        name = name.replace(wrapper, "")
    return name
