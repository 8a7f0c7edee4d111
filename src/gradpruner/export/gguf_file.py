"""``gradpruner export --format gguf``: a model folder (a pruned one, typically) as one GGUF file for llama.cpp.

The file holds the config as ``{arch}.*`` keys (``gguf_arch``), the tokenizer (``gguf_vocab``), and every
weight under llama.cpp's tensor name (``gguf.get_tensor_name_map``), converted one tensor at a time from
the folder's safetensors, so memory holds one tensor, not the model. Types, as llama.cpp's converter
chooses them: ``f32`` keeps everything in float32; ``f16`` stores matrices in float16 and vectors (norms,
biases) in float32; ``q8_0`` stores matrices whose rows are whole 32-value blocks in Q8_0 (gguf's own
quantizer), other matrices in float16, vectors in float32. Tied embeddings get no ``output`` tensor:
llama.cpp then reuses ``token_embd``. The file is written beside ``out`` and renamed into place when
complete; the input folder is only read.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np

from gradpruner.errors import Collect, GradPrunerError, did_you_mean
from gradpruner.export.gguf_arch import (
    Arch,
    arch_for,
    convert_values,
    layer_types,
    problems,
    rope_factors,
    write_hparams,
)
from gradpruner.export.gguf_vocab import Vocab, read_vocab, write_vocab
from gradpruner.models.loading import check_model, tensor_files
from gradpruner.util.atomic import atomic_path, check_output
from gradpruner.util.versions import __version__

Q = gguf.GGMLQuantizationType
TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_BLOCK = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class Planned:
    """One tensor of the file: where it comes from and how it is stored."""
    source: str  # the folder's tensor name
    file: Path
    name: str  # llama.cpp's tensor name
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType
    values: np.ndarray | None = field(default=None, compare=False)  # a tensor computed here, not read

    def add_info(self, writer: gguf.GGUFWriter) -> None:
        """Declare the tensor (name, shape, type, size) before any data is written."""
        if self.qtype == Q.Q8_0:
            raw = gguf.quants.quant_shape_to_byte_shape(self.shape, Q.Q8_0)
            writer.add_tensor_info(self.name, raw, np.dtype(np.uint8), int(np.prod(raw)), raw_dtype=Q.Q8_0)
        else:
            dtype = np.dtype(np.float32 if self.qtype == Q.F32 else np.float16)
            writer.add_tensor_info(self.name, self.shape, dtype, int(np.prod(self.shape)) * dtype.itemsize,
                                   raw_dtype=self.qtype)


def storage_type(name: str, shape: tuple[int, ...], fmt: str) -> gguf.GGMLQuantizationType:
    """How llama.cpp's converter stores tensor ``name`` for file type ``fmt``: vectors, norms and anything
    but a weight in float32; matrices in the chosen type, Q8_0 falling back to float16 for rows that are
    not whole blocks of 32."""
    if len(shape) <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight") or fmt == "f32":
        return Q.F32
    if fmt == "q8_0" and shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return Q.Q8_0
    return Q.F16


def _check_type(fmt) -> None:
    if fmt not in TYPES:
        raise did_you_mean(str(fmt), TYPES, "GGUF tensor type")


def _check_llama_cpp(arch: Arch, config) -> None:
    found = problems(arch, config)
    if found:
        raise GradPrunerError(*found)


def _model_folder(model) -> Path:
    folder = Path(str(model)).expanduser()
    if not folder.exists():
        raise GradPrunerError(f"Model folder {folder} does not exist; check the path.")
    if not folder.is_dir():
        raise GradPrunerError(f"Model {folder} is a file, not a model folder; point --model at the folder with config.json.")
    if not (folder / "config.json").is_file():
        raise GradPrunerError(f"Model folder {folder} has no config.json; point --model at a Hugging Face model folder.")
    if not any(folder.glob("*.safetensors")):
        raise GradPrunerError(f"Model folder {folder} has no safetensors weights, which export reads; save the model "
                              "with save_pretrained (safetensors) first.")
    return folder.resolve()


def _check_out(out, overwrite: bool, folder: Path | None) -> Path:
    out = Path(out)
    if out.is_dir():
        raise GradPrunerError(f"Output {out} is a folder; give a file path such as {out / 'model.gguf'}.")
    return check_output(out, overwrite, inputs=(folder,))


def _shapes(files: dict[str, Path]) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    out = {}
    for path in sorted(set(files.values())):
        with safe_open(str(path), "pt") as handle:
            names = [k for k in handle.keys() if files.get(k) == path]  # noqa: SIM118 - a safe_open handle, no dict
            out.update({k: tuple(handle.get_slice(k).get_shape()) for k in names})
    return out


def plan_tensors(folder: Path, arch: Arch, config, fmt: str) -> list[Planned]:
    """Every tensor of the file, in llama.cpp's order (embeddings, blocks in order, output), or one error."""
    files = tensor_files(folder)
    names = gguf.get_tensor_name_map(arch.gguf_arch, config.num_hidden_layers)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    shapes, planned, unknown = _shapes(files), [], []
    for source in sorted(files):
        if tied and source == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when the file has no output tensor
        name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if name is None:
            unknown.append(source)
            continue
        planned.append(Planned(source, files[source], name, shapes[source], storage_type(name, shapes[source], fmt)))
    if unknown:
        raise GradPrunerError(f"Model folder {folder} has tensors llama.cpp's {arch.name} has no place for "
                              f"({', '.join(unknown[:3])}{', ...' if len(unknown) > 3 else ''}); it cannot be exported.")
    blocks = {int(m.group(1)) for p in planned if (m := _BLOCK.match(p.name))}
    if blocks != set(range(config.num_hidden_layers)):
        raise GradPrunerError(f"Model folder {folder} has weights for {len(blocks)} decoder layers but its config.json says "
                              f"{config.num_hidden_layers}; the folder is incomplete, save it again.")

    def order(p: Planned):
        m = _BLOCK.match(p.name)
        return (1, int(m.group(1)), p.name) if m else (0 if p.name.startswith("token_embd") else 2, 0, p.name)

    planned = sorted(planned, key=order)
    factors = rope_factors(config)
    if factors is not None:  # llama.cpp's converter puts it first
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        planned.insert(0, Planned("", folder, name, tuple(factors.shape), Q.F32, factors))
    return planned


def _kept_layers(folder: Path, n: int) -> tuple[list[int], int, list[int] | None] | None:
    """The original indices of the kept layers, the original layer count and, for a block plan, the original
    layer of every kept layer's MLP block, from gradpruner.json."""
    try:
        plan = json.loads((folder / "gradpruner.json").read_text(encoding="utf-8"))["plan"]
        keep, total = [int(i) for i in plan["keep"]], int(plan["num_layers"])
        moved = {int(k): int(v) for k, v in (plan.get("mlp_from") or {}).items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return (keep, total, [moved.get(i, i) for i in keep] if moved else None) if len(keep) == n else None


def _write_metadata(writer: gguf.GGUFWriter, folder: Path, arch: Arch, config, vocab: Vocab, fmt: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    writer.add_file_type(int(TYPES[fmt]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    write_hparams(writer, arch, config)
    write_vocab(writer, vocab)
    writer.add_string("gradpruner.version", __version__)
    kept = _kept_layers(folder, config.num_hidden_layers)
    if kept is not None:
        writer.add_array("gradpruner.kept_layers", kept[0])
        writer.add_uint32("gradpruner.source_block_count", kept[1])
        if kept[2] is not None:
            writer.add_array("gradpruner.kept_mlp_layers", kept[2])


def _values(p: Planned, handle, arch: Arch, config) -> np.ndarray:
    if p.values is not None:
        return np.ascontiguousarray(p.values, dtype=np.float32)
    w = handle.get_tensor(p.source).float().numpy()
    w = np.ascontiguousarray(convert_values(arch, config, p.name, w), dtype=np.float32)
    return gguf.quants.quantize(w, p.qtype)


def _write_tensors(writer: gguf.GGUFWriter, planned: list[Planned], arch: Arch, config) -> None:
    from safetensors import SafetensorError, safe_open
    from tqdm.auto import tqdm

    handles: dict[Path, object] = {}
    try:
        for p in tqdm(planned, desc="writing GGUF", unit="tensor"):
            if p.values is None and p.file not in handles:
                handles[p.file] = safe_open(str(p.file), "pt")
            writer.write_tensor_data(_values(p, handles.get(p.file), arch, config))
    except SafetensorError as exc:
        raise GradPrunerError(f"Could not read the weights of {planned[0].file.parent} ({exc}); the checkpoint is corrupt, "
                              "save it again.") from None


def export_gguf(model_dir, out_path, fmt: str = "f16", overwrite: bool = False) -> dict:
    """Write the model folder ``model_dir`` as the GGUF file ``out_path`` with tensor type ``fmt`` (``f32``,
    ``f16`` or ``q8_0``: the CLI's ``--type``); return what was written. Every problem with the inputs is
    reported at once, before any file is touched."""
    with Collect() as check:
        check(_check_type, fmt)
        folder = check(_model_folder, model_dir)
        check(_check_out, out_path, overwrite, folder)
        config = check(check_model, folder) if folder is not None else None
        arch = check(arch_for, config) if config is not None else None
        if arch is not None:
            check(_check_llama_cpp, arch, config)
        vocab = check(read_vocab, folder, config.vocab_size) if arch is not None else None
        planned = check(plan_tensors, folder, arch, config, fmt) if arch is not None and fmt in TYPES else None
    writer = gguf.GGUFWriter(None, arch.name)
    _write_metadata(writer, folder, arch, config, vocab, fmt)
    for p in planned:
        p.add_info(writer)
    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        try:
            writer.write_header_to_file(path=tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            _write_tensors(writer, planned, arch, config)
        finally:
            writer.close()
    return {"out": str(out_path), "architecture": arch.name, "type": fmt, "layers": config.num_hidden_layers,
            "layer_types": layer_types(config), "tensors": len(planned), "bytes": out_path.stat().st_size,
            "tokenizer": vocab.model, "pre": vocab.pre}
