"""Out-of-core pruning: a safetensors checkpoint in, a sharded safetensors checkpoint out, without
ever loading the model.

The input shards are read through ``safe_open``, one tensor at a time; a merged module is built from
its target and source tensors alone (``merging.merge_module``, with F_W from the IGIA factors when the
rule needs it); output shards of at most ``max_shard_bytes`` are written tensor by tensor (the header
is known in advance: no tensor changes shape or dtype), with ``model.safetensors.index.json``. Peak
memory is the largest tensor plus the few tensors of one merge, whatever the size of the model.

The result is the same checkpoint the in-memory path (load, ``merge_layers``, ``remove_layers``,
``save_pretrained``) writes: the same tensors under the same names (layers renumbered 0..k-1), the
config of ``architectures.subset_config``; only the shard boundaries may differ. A test checks this
tensor by tensor.

Streaming applies when ``stream_problem`` finds nothing in the way: a local folder of safetensors
files whose tensor names are the model's own parameter names (transformers builds the model on the
meta device, from the config alone, to know them) and a plan without hidden-size pruning.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch

from gradpruner.errors import GradPrunerError
from gradpruner.models.loading import meta_model, safetensors_preamble, tensor_files

INDEX = "model.safetensors.index.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5")
SKIP_FILES = {"config.json", INDEX, "gradpruner.json", "pytorch_model.bin.index.json"}
DTYPE_BYTES = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
               "U16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I8": 1, "U8": 1, "BOOL": 1}


def parse_size(size: str | int) -> int:
    """Bytes from ``2GB``, ``500MB``, ``1GiB`` or an integer."""
    if isinstance(size, int) and not isinstance(size, bool) and size > 0:
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?I?B)?\s*", str(size).upper())
    if not m:
        raise GradPrunerError(f"--max-shard-size {size!r} is not a size; write e.g. 2GB, 500MB or 1GiB.")
    unit = m.group(2) or "B"
    base = 1024 if "I" in unit else 1000
    power = "BKMGT".index(unit[0]) if unit[0] in "KMGT" else 0
    value = int(float(m.group(1)) * base ** power)
    if value <= 0:
        raise GradPrunerError(f"--max-shard-size {size!r} must be positive; write e.g. 2GB.")
    return value


def stream_problem(source, config, plan: dict) -> str | None:
    """Why the checkpoint cannot be pruned out of core (None when it can)."""
    folder = Path(str(source))
    if not folder.is_dir():
        return f"{source} is not a local folder"
    if plan.get("hidden") is not None:
        return "the plan also prunes the hidden size"
    files = tensor_files(folder) if any(folder.glob("*.safetensors")) else {}
    if not files:
        return f"{folder} holds no safetensors weights"
    try:
        from gradpruner.models.experts import checkpoint_names

        names = checkpoint_names(meta_model(config))  # with the per-expert names of MoE checkpoints
    except Exception as exc:  # noqa: BLE001 - any failure only means: load it the usual way
        return f"transformers cannot build it from its config alone ({type(exc).__name__})"
    unknown = sorted(set(files) - names)
    if unknown:
        return f"its tensor names are not the model's parameter names (e.g. {unknown[0]!r})"
    return None


def _layer_of(prefix: str):
    pattern = re.compile(re.escape(prefix) + r"\.(\d+)\.(.+)$")

    def split(name: str) -> tuple[int, str] | None:
        m = pattern.match(name)
        return (int(m.group(1)), m.group(2)) if m else None

    return split


class _Reader:
    """Tensor specs of every input file (each header read once) and reads of one tensor at a time.
    ``get_tensor`` maps the file without copying; the mapping lives as long as the tensor, so once
    a tensor is written and dropped its pages leave the resident set."""

    def __init__(self, files: dict[str, Path]):
        from safetensors import safe_open

        self.files, self.specs = files, {}
        for path in sorted(set(files.values())):
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    self.specs[name] = (sl.get_dtype(), list(sl.get_shape()))

    def nbytes(self, name: str) -> int:
        dtype, shape = self.specs[name]
        return DTYPE_BYTES.get(dtype, 4) * torch.Size(shape).numel()

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(self.files[name]), "pt") as f:
            return f.get_tensor(name)  # memory-mapped: pages are read as the writer touches them


def _out_names(files: dict[str, Path], split, prefix: str, keep: list[int],
               mlp_from: dict | None = None) -> list[tuple[str, str]]:
    """(output name, input name) for every tensor kept, layers renumbered, in a stable order. With a block
    plan's ``mlp_from`` the MLP-side tensors of a kept layer come from the layer it names."""
    new_index = {old: new for new, old in enumerate(keep)}
    mlp_index = {old: new for new, old in enumerate(keep)}
    side = set()
    if mlp_from:
        from gradpruner.models.blocks import mlp_side

        side = mlp_side({where[1].split(".")[0] for where in map(split, files) if where is not None and where[0] == keep[0]})
        for dst, src in mlp_from.items():
            del mlp_index[int(dst)]
            mlp_index[int(src)] = new_index[int(dst)]
    pairs = []
    for name in files:
        where = split(name)
        index = mlp_index if where is not None and where[1].split(".")[0] in side else new_index
        if where is None:
            pairs.append((name, name))
        elif where[0] in index:
            pairs.append((f"{prefix}.{index[where[0]]}.{where[1]}", name))
    return sorted(pairs, key=lambda p: (split(p[0]) or (-1, ""), p[0]))


def _check_moved(pairs, reader: _Reader, split, prefix: str, keep: list[int]) -> None:
    """A block plan's moved MLP tensors must have the shapes of those they replace."""
    for out_name, in_name in pairs:
        where = split(out_name)
        if where is None or out_name == in_name:
            continue
        own = f"{prefix}.{keep[where[0]]}.{where[1]}"
        if own != in_name and reader.specs.get(own, (None, None))[1] != reader.specs[in_name][1]:
            raise GradPrunerError(f"{in_name} differs in shape from {own}, so it cannot take its place; use "
                                  "plan.granularity layer for this model.")


def _shard_groups(pairs, reader: _Reader, max_bytes: int) -> list[list[tuple[str, str]]]:
    groups, size = [[]], 0
    for out_name, in_name in pairs:
        n = reader.nbytes(in_name)
        if groups[-1] and size + n > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append((out_name, in_name))
        size += n
    return groups


def _merge_jobs(plan: dict, modules: dict[int, list[str]], prefix: str,
                units: dict[int, dict] | None = None) -> dict[str, list[str]]:
    """Input weight name of a kept module -> the input weight names merged into it. ``units`` are the
    expert tensors of MoE layers (``models.experts.checkpoint_units``, full tensor names inside the layer);
    gates (routers) are never merged."""
    from gradpruner.models.experts import is_gate

    jobs: dict[str, list[str]] = {}
    for src, dst in sorted(plan.get("merge", {}).items(), key=lambda kv: int(kv[0])):
        for rel in modules[int(dst)]:
            if rel in modules[int(src)] and not is_gate(rel):
                jobs.setdefault(f"{prefix}.{dst}.{rel}.weight", []).append(f"{prefix}.{src}.{rel}.weight")
        for rel in (units or {}).get(int(dst), {}):
            if rel in units.get(int(src), {}):
                jobs.setdefault(f"{prefix}.{dst}.{rel}", []).append(f"{prefix}.{src}.{rel}")
    return jobs


class _Merger:
    """The merged weight of a kept module, from the tensors and IGIA factors it needs alone."""

    def __init__(self, jobs: dict[str, list[str]], factors, rule: str, density: float, experts=None):
        from safetensors import safe_open

        from gradpruner.pruning.merging import TRIM, needs_igia

        self.jobs, self.factors, self.rule, self.density, self.stats = jobs, factors, rule, density, {}
        self.experts = experts  # merging.StreamedExperts for MoE checkpoints, else None
        self.trim_igia, self.fisher = TRIM[rule] == "igia", rule == "fisher"
        self.file = safe_open(str(factors), "pt") if factors is not None and needs_igia(rule) else None
        self.keys = set(self.file.keys()) if self.file is not None else set()

    def _igia(self, weight_name: str, w: torch.Tensor, wanted: bool):
        from gradpruner.scoring.igia import module_igia

        return module_igia(self.file, self.keys, weight_name[: -len(".weight")], tuple(w.shape),
                           self.factors) if wanted else None

    def __call__(self, name: str, w: torch.Tensor, read) -> torch.Tensor:
        from gradpruner.pruning.merging import merge_module

        if name not in self.jobs:
            return w
        if self.experts is not None and self.experts.owns(name):
            new, stats = self.experts.merge(name, w, self.jobs[name], read, self)
            self.stats.update(stats)
            return new
        pairs = [(read(s), s) for s in self.jobs[name]]
        pairs = [(ws, self._igia(s, ws, self.trim_igia)) for ws, s in pairs]
        new, st = merge_module(w, pairs, self.rule, self.density, self._igia(name, w, self.fisher))
        self.stats[name[: -len(".weight")]] = {"sources": [s[: -len(".weight")] for s in self.jobs[name]], **st}
        return new

    def close(self) -> None:
        if self.file is not None:
            self.file.__exit__(None, None, None)


def _write_safetensors(path: Path, group, reader: _Reader, produce) -> None:
    """Write one safetensors file tensor by tensor: the header (names, dtypes, shapes, offsets) is
    known before any data, since pruning and merging keep every tensor's dtype and shape, so only
    the tensor being written is ever in memory. ``safe_open`` reads the result (tests check)."""
    entries = [(o, *reader.specs[i], reader.nbytes(i)) for o, i in group]
    preamble, offsets = safetensors_preamble(entries, {"format": "pt"})
    with open(path, "wb") as f:
        f.write(preamble)
        for out_name, in_name in group:
            t = produce(in_name)
            if list(t.shape) != reader.specs[in_name][1] or t.numel() * t.element_size() != reader.nbytes(in_name):
                raise RuntimeError(f"{in_name} changed shape or dtype while pruning")  # a bug, never the input
            f.write(memoryview(t.contiguous().reshape(-1).view(torch.uint8).numpy()))
            del t
        f.flush()
        os.fsync(f.fileno())


def _write_shards(groups, reader: _Reader, merger: _Merger, out: Path) -> None:
    from tqdm.auto import tqdm

    names = (["model.safetensors"] if len(groups) == 1 else
             [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))])
    weight_map = {o: fname for fname, group in zip(names, groups) for o, _ in group}
    with tqdm(total=sum(len(g) for g in groups), desc="writing", unit="tensor") as bar:
        def produce(in_name: str) -> torch.Tensor:
            bar.update()
            return merger(in_name, reader.get(in_name), reader.get)

        for fname, group in zip(names, groups):
            _write_safetensors(out / fname, group, reader, produce)
    if len(groups) > 1:
        total = sum(reader.nbytes(i) for group in groups for _, i in group)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def prune_streaming(source, config, plan: dict, out: Path, factors, density: float, rule: str,
                    max_shard_bytes: int) -> dict:
    """Write the pruned checkpoint into the (empty, temporary) folder ``out``; return merge stats."""
    from gradpruner.models.architectures import (
        decoder_layer_prefix,
        layer_linear_modules,
        subset_config,
    )
    from gradpruner.pruning.merging import StreamedExperts

    folder = Path(str(source))
    skeleton = meta_model(config)
    prefix = decoder_layer_prefix(skeleton)
    modules = {i: sorted(mods) for i, mods in layer_linear_modules(skeleton).items()}
    files = tensor_files(folder)
    moe = StreamedExperts(skeleton, files) if plan.get("merge") else None  # None: no merge, or no experts
    moe = moe if moe is not None and moe.units else None
    del skeleton
    reader = _Reader(files)
    merger = _Merger(_merge_jobs(plan, modules, prefix, moe.units if moe else None), factors, rule, density, moe)
    try:
        pairs = _out_names(files, _layer_of(prefix), prefix, plan["keep"], plan.get("mlp_from"))
        _check_moved(pairs, reader, _layer_of(prefix), prefix, plan["keep"])
        _write_shards(_shard_groups(pairs, reader, max_shard_bytes), reader, merger, out)
    finally:
        merger.close()
    _write_config(subset_config(config, plan["keep"]), out)
    _copy_side_files(folder, out)
    return merger.stats


def _write_config(config, out: Path) -> None:
    vars(config).pop("quantization_config", None)
    config.save_pretrained(out)


def _copy_side_files(folder: Path, out: Path) -> None:
    """Tokenizer, generation config, chat template...: every top-level file that is not weights."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and path.name not in SKIP_FILES and not path.name.endswith(WEIGHT_SUFFIXES) \
                and not path.name.startswith("."):
            shutil.copy2(path, out / path.name)
