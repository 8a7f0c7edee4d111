"""Capture LoRA gradient factors once per optimizer step, inside any transformers ``Trainer``.

``IGIACallback`` reads grad(A) and grad(B) of every LoRA module right before the optimizer step
(after gradient accumulation and any all-reduce), streams them to ``igia.safetensors`` and keeps
the per-step squared norms ‖grad_B grad_A‖²_F (r×r trace identity). Memory held: one step's
factors, never the full-size F matrices of the authors' release. When the requested number of steps
is captured (or training ends), it writes ``igia.safetensors`` and ``scores.json`` atomically.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from gradpruner.errors import GradPrunerError
from gradpruner.models import experts
from gradpruner.scoring import igia as scoring
from gradpruner.util import distributed
from gradpruner.util.atomic import write_json

_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


class FactorWriter:
    """Streams [T, ...] tensors into a safetensors file, one step slice at a time.

    The header (names, shapes, offsets) is known up front, so each step's slice is written at its
    final offset with ``os.pwrite``; nothing accumulates in memory.
    """

    def __init__(self, path: Path, shapes: dict[str, tuple[int, ...]], steps: int, dtype=torch.float32, metadata=None):
        self.path, self.steps, self.dtype = Path(path), steps, dtype
        from gradpruner.models.loading import safetensors_preamble

        item = torch.empty((), dtype=dtype).element_size()
        entries = [(name, _DTYPES[dtype], (steps, *shapes[name]), math.prod((steps, *shapes[name])) * item)
                   for name in sorted(shapes)]
        preamble, offsets = safetensors_preamble(entries, metadata)
        self.slot = {name: (begin, (end - begin) // steps) for name, (begin, end) in offsets.items()}
        self.data_start = len(preamble)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.write(self.fd, preamble)
        os.ftruncate(self.fd, self.data_start + sum(e[3] for e in entries))

    def write(self, name: str, step: int, tensor: torch.Tensor) -> None:
        offset, step_bytes = self.slot[name]
        data = tensor.detach().to(dtype=self.dtype).cpu().contiguous()  # to the file, through host memory
        raw = data.view(torch.uint8).numpy().tobytes() if self.dtype != torch.float32 else data.numpy().tobytes()
        if len(raw) != step_bytes:
            raise ValueError(f"{name}: step slice has {len(raw)} bytes, expected {step_bytes}")
        os.pwrite(self.fd, raw, self.data_start + offset + step * step_bytes)

    def close(self) -> None:
        if self.fd is not None:
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None


def lora_modules(model, experts_out: dict[str, int] | None = None
                 ) -> dict[str, tuple[torch.nn.Module, torch.nn.Module]]:
    """Base-model module name -> (lora_A linear, lora_B linear) for every LoRA-wrapped module.

    LoRA on a fused expert parameter is named after the parameter; ``experts_out`` (when given)
    receives its number of experts (see ``experts.split_factors``)."""
    from peft.tuners.lora import LoraLayer

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and module.lora_A:
            adapter = module.active_adapters[0] if module.active_adapters else next(iter(module.lora_A))
            base = experts.lora_base_name(distributed.module_name(name), module)
            found[base] = (module.lora_A[adapter], module.lora_B[adapter])
            n_experts = experts.lora_experts(module)
            if experts_out is not None and n_experts:
                experts_out[base] = n_experts
    if not found:
        raise GradPrunerError("The model given to IGIACallback has no LoRA modules; wrap it with peft.get_peft_model first.")
    return found


class IGIACallback(distributed.GradientReader, TrainerCallback):
    """Record the first ``steps`` optimizer steps' LoRA gradients; write igia.safetensors + scores.json.

    Use it in your own ``Trainer`` (or TRL trainer) to score layers during your real fine-tuning run:
    ``trainer.add_callback(IGIACallback("scores_dir", steps=40, model=peft_model))``.
    ``module_layer`` maps base module names to decoder-layer indices; ``meta`` is merged into scores.json.
    """

    def __init__(self, out_dir, steps: int, model=None, module_layer: dict[str, int] | None = None,
                 num_layers: int | None = None, meta: dict | None = None, factor_dtype=torch.float32):
        if steps < 2:
            raise GradPrunerError(f"steps={steps} is too few: the first step carries no signal (LoRA B starts at zero); use at least 2.")
        self.out_dir, self.steps, self.model = Path(out_dir), steps, model
        self.module_layer, self.num_layers, self.meta = module_layer, num_layers, dict(meta or {})
        self.factor_dtype = factor_dtype
        self.captured, self.losses, self.writer, self.done, self.written = 0, [], None, False, False
        self.norms: dict[str, list[float]] = {}

    # --- Trainer events ---------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        args.logging_nan_inf_filter = False  # the Trainer would log a NaN loss as the mean of earlier ones
        self.model = self.model or model
        self.experts: dict[str, int] = {}
        self.modules = lora_modules(self.model, self.experts)
        if self.module_layer is None:
            self.module_layer = {n: _layer_of(n) for n in self.modules}
        self.num_layers = self.num_layers or (max(self.module_layer.values()) + 1)
        self.is_main = state.is_world_process_zero  # only process 0 writes; all capture (collectives)
        self.start_reading(args, model, kwargs.get("optimizer"))
        shapes = {}
        for name, (a, b) in self.modules.items():
            shape_a = distributed.full_shape(a.weight, self.backend)
            shape_b = distributed.full_shape(b.weight, self.backend)
            if name in self.experts:  # stored per expert: [E, r, in] and [E, out, r]
                shape_a, shape_b = experts.split_shapes(shape_a, shape_b, self.experts[name])
            shapes[f"{name}.grad_A"], shapes[f"{name}.grad_B"] = shape_a, shape_b
        self.shapes = shapes
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.partial = self.out_dir / ".igia.safetensors.partial"
            self.writer = FactorWriter(self.partial, shapes, self.steps, self.factor_dtype)
        self.norms = {n: [] for n in self.modules}

    def reading(self) -> bool:  # distributed.GradientReader calls read() once per optimizer step
        return not self.done

    def read(self) -> None:
        step = self.captured
        for name, (a, b) in self.modules.items():
            ga, gb = distributed.full_grad(a.weight, self.backend), distributed.full_grad(b.weight, self.backend)
            if name in self.experts:  # peft's stacked factors -> [E, r, in] and [E, out, r]
                ga, gb = experts.split_factors(ga, gb, self.experts[name])
            if ga is None or gb is None:
                ga = _zeros(self.shapes[f"{name}.grad_A"], a.weight) if ga is None else ga
                gb = _zeros(self.shapes[f"{name}.grad_B"], b.weight) if gb is None else gb
            sq = float(scoring.step_sq_norms(gb, ga).sum())  # one value per expert for fused experts
            if not math.isfinite(sq) or not bool(torch.isfinite(ga).all() and torch.isfinite(gb).all()):
                self._abort()
                raise GradPrunerError(
                    f"Non-finite gradient in {name} at optimizer step {step + 1}; lower the learning rate (--lr) "
                    "or check the data, nothing was written."
                )
            self.norms[name].append(sq)
            if self.writer is not None:
                self.writer.write(f"{name}.grad_A", step, ga)
                self.writer.write(f"{name}.grad_B", step, gb)
        self.captured += 1
        if self.captured == self.steps:
            self._finish()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.written or not logs or "loss" not in logs:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            self._abort()
            raise GradPrunerError(
                f"Non-finite training loss at optimizer step {state.global_step}; lower the learning rate (--lr) "
                "or check the data, nothing was written."
            )
        self.losses.append(loss)
        if self.done:  # the last captured step's loss is logged after its optimizer step
            self._write_scores()

    def on_train_end(self, args, state, control, **kwargs):
        if not self.done and self.captured > 0:
            self._finish()
        elif not self.done:
            self._abort()
        if self.done and not self.written and self.captured > 0:
            self._write_scores()

    # --- results ----------------------------------------------------------------------------
    def step_norms(self) -> dict[str, torch.Tensor]:
        return {n: torch.tensor(v, dtype=torch.float64) for n, v in self.norms.items()}

    def results(self) -> dict:
        """The scores.json content for what has been captured so far."""
        norms = self.step_norms()
        mod = scoring.module_scores(norms, "igia")
        layer_step = [[0.0] * self.num_layers for _ in range(self.captured)]
        for name, sq in norms.items():
            for i, v in enumerate(sq.tolist()):
                layer_step[i][self.module_layer[name]] += v
        return {
            **self.meta,
            "method": "igia",
            "num_layers": self.num_layers,
            "layer_scores": scoring.layer_scores(mod, self.module_layer, self.num_layers),
            "layer_scores_by_rule": {
                rule: scoring.layer_scores(scoring.module_scores(norms, rule), self.module_layer, self.num_layers)
                for rule in scoring.IGIA_SCORES
            },
            "module_scores": mod,
            "module_layer": self.module_layer,
            "steps": self.captured,
            "informative_steps": scoring.informative_steps(norms),
            "step_layer_sq_norms": layer_step,
            "losses": self.losses,
        }

    def _finish(self) -> None:
        self.done = True
        if not self.is_main:
            return
        self.writer.close()
        target = self.out_dir / "igia.safetensors"
        if self.captured < self.steps:
            _truncate_steps(self.partial, target, self.captured)
            self.partial.unlink()
        else:
            os.replace(self.partial, target)

    def _write_scores(self) -> None:
        self.written = True
        if self.is_main:
            write_json(self.out_dir / "scores.json", self.results())

    def _abort(self) -> None:
        self.done = self.written = True
        if self.writer is not None:
            self.writer.close()
            self.partial.unlink(missing_ok=True)


def _zeros(shape, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros(shape, dtype=like.dtype, device=like.device)


def _layer_of(name: str) -> int:
    """Decoder-layer index from a module name such as ``model.layers.3.self_attn.q_proj``."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return int(parts[i + 1])
    raise GradPrunerError(f"Cannot tell the decoder layer of module {name}; pass module_layer to IGIACallback.")


def _truncate_steps(src: Path, dst: Path, steps: int) -> None:
    """Rewrite a factor file keeping only its first ``steps`` steps (training ended early)."""
    from safetensors import safe_open

    with safe_open(str(src), "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()[1:]) for k in f.keys()}
        dtype = f.get_slice(next(iter(shapes))).get_dtype()
        writer = FactorWriter(dst, shapes, steps, {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype])
        for k in shapes:
            sl = f.get_slice(k)
            for i in range(steps):
                writer.write(k, i, sl[i])
        writer.close()
