import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

from helpers import qa_rows, save_tiny_model_dir, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    return save_tiny_model_dir(tmp_path_factory.mktemp("models") / "tiny-llama", "llama")


@pytest.fixture(scope="session")
def qa_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "qa.jsonl", qa_rows())


@pytest.fixture(scope="session")
def tiny_scores(tiny_llama, qa_file, tmp_path_factory) -> Path:
    """One real scoring run on the tiny model, shared by the plan/prune tests."""
    from gradpruner import api

    out = tmp_path_factory.mktemp("runs") / "scores"
    api.score(str(tiny_llama), out, data=qa_file, steps=4, batch_size=4, lr=1e-3)
    return out
