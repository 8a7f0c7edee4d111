"""The runtime: where and how a model runs — device, dtype, attention kernel, what loading may trust.

Every stage that holds a model takes one ``Runtime``, resolved once from a ``RuntimeConfig`` (the
``--device``/``--dtype``/… flags, the run config's ``runtime:`` section, or the API's ``runtime=``),
and no stage chooses a device or a precision on its own::

    rt = resolve(RuntimeConfig(device="cuda", dtype="auto"))   # bfloat16 on a GPU that has it
    model = load_model(source, rt)                              # on rt.device, in rt.dtype
    batch = rt.inputs(batch)                                    # input tensors follow the model

``auto`` means the first CUDA GPU when there is one (under ``torchrun``, this process's local GPU),
else the CPU; and bfloat16 on a CUDA GPU that supports it, else float32. The resolved runtime's
``record()`` goes into every stage's output file. This module imports torch only when resolving,
so the CLI can build its flags from ``RuntimeConfig`` without it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from gradpruner.errors import GradPrunerError, did_you_mean
from gradpruner.util.options import opt

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTENTION = ("eager", "sdpa", "flash_attention_2", "flash_attention_3", "flex_attention")


@dataclass
class RuntimeConfig:
    """Where every stage runs its model. One definition, shared by the CLI, the YAML and the API."""

    device: str = opt("auto", "where models run: auto (the first CUDA GPU if there is one, else the CPU), cpu, "
                      "cuda, cuda:N or mps")
    dtype: str = opt("auto", "precision of the weights in use: auto (bfloat16 on a CUDA GPU that supports it, "
                     "else float32), float32, bfloat16 or float16")
    attn_implementation: str | None = opt(None, "attention kernel: eager, sdpa, flash_attention_2, ... "
                                          "(default: transformers' own choice)")
    trust_remote_code: bool = opt(False, "allow code shipped with the model to run (off by default)",
                                  action="store_true")
    allow_pickle: bool = opt(False, "accept pickled .bin weights, which can run code (safetensors only by default)",
                             action="store_true")


@dataclass(frozen=True)
class Runtime:
    """A resolved runtime: a concrete ``torch.device`` and ``torch.dtype``."""

    device: object          # torch.device
    dtype: object           # torch.dtype
    attn_implementation: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    @property
    def on_cpu(self) -> bool:
        return self.device.type == "cpu"

    @property
    def on_cuda(self) -> bool:
        return self.device.type == "cuda"

    def record(self) -> dict:
        """What a stage's output file says about where it ran."""
        out = {"device": str(self.device), "dtype": self.dtype_name}
        if self.on_cuda:
            import torch

            out["device_name"] = torch.cuda.get_device_name(self.device)
        if self.attn_implementation:
            out["attn_implementation"] = self.attn_implementation
        return out

    def place(self, model, dtype=None):
        """``model`` on this device in ``dtype`` (default: this runtime's) — the one way a stage moves a model."""
        return model.to(device=self.device, dtype=self.dtype if dtype is None else dtype)

    def inputs(self, batch):
        """A tensor, or a dict of tensors, on this device (integer ids stay integers)."""
        if isinstance(batch, dict):
            return {k: (v.to(self.device) if hasattr(v, "to") else v) for k, v in batch.items()}
        return batch.to(self.device)

    def activate(self) -> None:
        """Make this runtime the process's: its GPU the current one (``cuda:N``) for code that asks torch for
        "the" GPU (the Trainer), and the device a process group of a launch is to be started for
        (``util.distributed.group_on``). ``load_model`` calls it."""
        from gradpruner.util import distributed

        if self.on_cuda and self.device.index is not None:
            import torch

            torch.cuda.set_device(self.device)
        distributed.group_on(cpu=self.on_cpu)

    def training_precision(self) -> dict:
        """TrainingArguments' precision flags for this runtime: autocast in bfloat16 / float16 when the
        runtime says so (trainable weights stay float32), none in float32."""
        return {"bf16": self.dtype_name == "bfloat16", "fp16": self.dtype_name == "float16",
                "use_cpu": self.on_cpu}


def describe(model) -> dict:
    """Where a loaded ``model`` actually is: the device and dtype of its first parameter (for the record of
    a stage that was handed a model rather than a runtime)."""
    p = next(model.parameters())
    return {"device": str(p.device), "dtype": str(p.dtype).removeprefix("torch.")}


def runtime_config(value=None) -> RuntimeConfig:
    """A ``RuntimeConfig`` from None (defaults), a config, a resolved ``Runtime`` or a dict."""
    if isinstance(value, Runtime):
        value = RuntimeConfig(device=str(value.device), dtype=value.dtype_name,
                              attn_implementation=value.attn_implementation,
                              trust_remote_code=value.trust_remote_code, allow_pickle=value.allow_pickle)
    elif isinstance(value, dict):
        value = RuntimeConfig(**value)
    elif value is None:
        value = RuntimeConfig()
    elif not isinstance(value, RuntimeConfig):
        raise GradPrunerError(f"runtime must be a RuntimeConfig, a Runtime or a dict, not a {type(value).__name__}.")
    return value


def resolve(value=None) -> Runtime:
    """The concrete runtime for ``value`` (see ``runtime_config``); a device that is not there, or a dtype
    it cannot run, is one clear error. A resolved ``Runtime`` is returned as it is."""
    if isinstance(value, Runtime):
        return value
    cfg = runtime_config(value)
    device = _device(cfg.device)
    dtype = _dtype(cfg.dtype, device)
    if cfg.attn_implementation is not None and cfg.attn_implementation not in ATTENTION:
        raise did_you_mean(cfg.attn_implementation, ATTENTION, "attention implementation (--attn-implementation)")
    return Runtime(device, dtype, cfg.attn_implementation, bool(cfg.trust_remote_code), bool(cfg.allow_pickle))


def _device(spec: str):
    import torch

    spec = str(spec).strip().lower()
    if spec == "auto":
        if not torch.cuda.is_available():
            return torch.device("cpu")
        local = int(os.environ.get("LOCAL_RANK", "0") or 0)  # torchrun: one GPU per process
        return torch.device("cuda", local % torch.cuda.device_count())
    unknown = GradPrunerError(f"Unknown --device {spec!r}; use {', '.join(DEVICES[:-1])} or {DEVICES[-1]}.")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise unknown from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GradPrunerError(f"--device {spec} was asked for but no CUDA GPU is visible; use --device cpu "
                                  "(or auto).")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise GradPrunerError(f"--device {spec} asks for GPU {device.index} but {count} "
                                  f"{'is' if count == 1 else 'are'} visible; use cuda:0 to cuda:{count - 1}.")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise GradPrunerError("--device mps was asked for but this machine has no Apple GPU; use --device cpu.")
    elif device.type not in ("cpu", "meta"):  # meta: shapes only, the tests' stand-in accelerator (nothing runs)
        raise unknown
    return device


def _dtype(spec: str, device):
    import torch

    spec = str(spec).strip().lower()
    if spec == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    aliases = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if spec not in aliases:
        raise did_you_mean(spec, DTYPES, "dtype (--dtype)")
    dtype = aliases[spec]
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GradPrunerError(f"--dtype bfloat16 was asked for but GPU {device} does not support it; use --dtype "
                              "float16 or float32.")
    return dtype
