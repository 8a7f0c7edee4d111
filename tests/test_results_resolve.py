"""Every committed result folder still resolves: the stage keys that today's code computes from the
config that produced a folder equal the keys recorded in that folder's stage records, so rerunning
the config reuses every finished stage instead of silently computing something else."""
import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from gradpruner.pipeline.compare import load_grid
from gradpruner.pipeline.config import load_config
from gradpruner.pipeline.run import Run

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for d in ("configs", "experiments") for p in (ROOT / d).rglob("*.yaml")
                 if "accelerate" not in p.parts)


def _recorded(folder: Path) -> dict[str, str]:
    return {p.stem: json.loads(p.read_text())["key"] for p in sorted((folder / "stages").glob("*.json"))
            if not p.name.endswith(".started.json") and "key" in json.loads(p.read_text())}


def _keys(cfg, tmp: Path) -> dict[str, str]:
    return Run(dataclasses.replace(cfg, out=str(tmp / "run")), echo=lambda *a: None).keys


def _runs(path: Path):
    """(result folder, config) of every run a config file describes whose folder is committed."""
    spec = yaml.safe_load(path.read_text()) or {}
    if "axes" in spec:
        _, cells = load_grid(path)
        return [(Path(cfg.out), cfg) for _, cfg in cells]
    cfg = load_config(path)
    return [(Path(cfg.out), cfg)]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_results_keep_their_stage_keys(path, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    checked = 0
    for folder, cfg in _runs(path):
        recorded = _recorded(folder) if folder.is_dir() and str(folder).startswith("results") else {}
        if not recorded:
            continue
        keys = _keys(cfg, tmp_path)
        for stage, key in recorded.items():
            assert keys.get(stage) == key, f"{folder}: stage {stage} now keys {keys.get(stage)}, recorded {key}"
        checked += 1
    if not checked:
        pytest.skip(f"{path.name} has no committed result folder")
