"""Teacher logits computed once: the top-k logits of every completion token of the training examples.

Before training, the teacher runs over the tokenised training examples and keeps, for each position
that predicts a completion token (labels[i + 1] ≠ -100, the positions the KD term uses), its ``k``
largest logits and their token ids. They are stored in ``teacher_topk.safetensors`` in the run's
checkpoints folder, so a resumed run reads them back and the teacher is never loaded during training;
the file goes when the checkpoints go. Rows are stored example by example, positions in order:

    values   [rows, k] float32 — the raw logits (the temperature is applied in the loss)
    indices  [rows, k] int32   — their token ids
    offsets  [examples + 1] int64 — example e owns rows offsets[e]:offsets[e + 1]

The file's metadata holds a fingerprint of the teacher, k and the tokenised examples; a file whose
fingerprint differs is rebuilt, never used.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

from gradpruner.data.examples import IGNORE_INDEX, PadCollator
from gradpruner.errors import GradPrunerError
from gradpruner.util.atomic import atomic_file

log = logging.getLogger(__name__)

CACHE_FILE = "teacher_topk.safetensors"
ROW_KEY = "teacher_row"  # the feature field naming an example's rows in the cache


def cache_path(checkpoints: str | Path) -> Path:
    """Where the cache of a run with checkpoints folder ``checkpoints`` lives."""
    return Path(checkpoints) / CACHE_FILE


def fingerprint(teacher: str | Path, top_k: int, features: list[dict]) -> str:
    """A hash of what the cache depends on: the teacher (its path and weight files' sizes and times),
    k, and every example's input ids and labels."""
    h = hashlib.sha256(json.dumps({"teacher": str(teacher), "top_k": top_k}).encode())
    folder = Path(teacher)
    if folder.is_dir():
        for f in sorted(folder.iterdir()):
            if f.suffix in (".safetensors", ".bin", ".json") and f.is_file():
                st = f.stat()
                h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    for f in features:
        h.update(json.dumps([f["input_ids"], f["labels"]]).encode())
    return h.hexdigest()


def completion_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, seq - 1] mask of the positions whose next token is a completion token."""
    return labels[:, 1:] != IGNORE_INDEX


@torch.no_grad()
def teacher_topk(teacher, features: list[dict], top_k: int, batch_size: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """{"values", "indices", "offsets"} of ``teacher`` over ``features`` (see the module docstring), run where
    the teacher was loaded (the runtime's device and dtype)."""
    teacher.eval()
    device = next(teacher.parameters()).device
    collate = PadCollator(pad_token_id)
    values, indices, offsets = [], [], [0]
    for start in range(0, len(features), batch_size):
        batch = collate(features[start:start + batch_size])
        logits = teacher(input_ids=batch["input_ids"].to(device),
                         attention_mask=batch["attention_mask"].to(device)).logits
        mask = completion_positions(batch["labels"]).to(device)
        k = min(top_k, logits.shape[-1])
        for b in range(logits.shape[0]):
            rows = logits[b, :-1][mask[b]].float()
            v, i = rows.topk(k, dim=-1)
            values.append(v.cpu())
            indices.append(i.to(torch.int32).cpu())
            offsets.append(offsets[-1] + rows.shape[0])
    return {"values": torch.cat(values), "indices": torch.cat(indices),
            "offsets": torch.tensor(offsets, dtype=torch.int64)}


def write_cache(path: Path, cache: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    with atomic_file(path, "wb") as fh:
        fh.write(save({k: v.contiguous() for k, v in cache.items()}, metadata=metadata))


def read_cache(path: Path, expected: str) -> dict[str, torch.Tensor] | None:
    """The cache at ``path`` if it exists and was made for ``expected`` (a fingerprint), else None."""
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            made_for = (f.metadata() or {}).get("fingerprint")
        if made_for != expected:
            log.warning("The teacher cache %s was made for other data, teacher or top-k; rebuilding it.", path)
            return None
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged cache is rebuilt, not trusted
        log.warning("The teacher cache %s could not be read (%s); rebuilding it.", path, exc)
        return None


def load_or_build(path: Path, teacher_spec: str | Path, load_teacher, features: list[dict], top_k: int,
                  batch_size: int, pad_token_id: int) -> tuple[dict[str, torch.Tensor], dict]:
    """(cache, record) for ``features``: read from ``path`` when it was made for the same teacher, k and
    examples, else built with ``load_teacher()`` (loaded only then) and written to ``path``."""
    expected = fingerprint(teacher_spec, top_k, features)
    start = time.monotonic()
    cache = read_cache(path, expected)
    reused = cache is not None
    if cache is None:
        teacher = load_teacher()  # on the runtime's device, in its dtype
        cache = teacher_topk(teacher, features, top_k, batch_size, pad_token_id)
        del teacher
        write_cache(path, cache, {"fingerprint": expected, "teacher": str(teacher_spec), "top_k": str(top_k)})
    check_cache(cache, features)
    record = {"file": str(path), "top_k": int(cache["values"].shape[1]), "rows": int(cache["values"].shape[0]),
              "reused": reused, "seconds": round(time.monotonic() - start, 3)}
    return cache, record


def check_cache(cache: dict[str, torch.Tensor], features: list[dict]) -> None:
    """Every example's row count is its number of completion positions."""
    offsets = cache["offsets"]
    counts = [sum(1 for x in f["labels"][1:] if x != IGNORE_INDEX) for f in features]
    if offsets.numel() != len(features) + 1 or (offsets[1:] - offsets[:-1]).tolist() != counts:
        raise GradPrunerError("The teacher cache does not match the training examples; delete "
                              f"{CACHE_FILE} in the checkpoints folder and rerun.")


class CachedTeacherCollator:
    """Batches features that carry ``teacher_row`` (an example's index in the cache): the batch of
    ``collate`` plus the cached rows of its examples in batch order, as ``teacher_values`` and
    ``teacher_indices`` — the order in which ``logits[:, :-1][mask]`` lists the completion positions."""

    def __init__(self, collate, cache: dict[str, torch.Tensor]):
        self.collate, self.cache = collate, cache
        self.offsets = cache["offsets"].tolist()

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        rows = [f[ROW_KEY] for f in features]
        batch = self.collate([{k: v for k, v in f.items() if k != ROW_KEY} for f in features])
        spans = [torch.arange(self.offsets[r], self.offsets[r + 1]) for r in rows]
        at = torch.cat(spans) if spans else torch.zeros(0, dtype=torch.long)
        batch["teacher_values"] = self.cache["values"][at]
        batch["teacher_indices"] = self.cache["indices"][at].long()
        return batch


def with_rows(features: list[dict]) -> list[dict]:
    """``features`` with each example's index in the cache."""
    return [{**f, ROW_KEY: i} for i, f in enumerate(features)]
