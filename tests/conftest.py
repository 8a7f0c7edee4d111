import os
import shutil
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))

# The offline copies of the paper's eight task datasets lie beside the repository in the project's
# checkout (../shared/data). The library never looks there (a user's clone has no such folder), so the
# tests point it there; a GRADPRUNER_DATA_DIR set by the caller wins.
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
if SHARED_DATA.is_dir():
    os.environ.setdefault("GRADPRUNER_DATA_DIR", str(SHARED_DATA))

from helpers import offline_data_dir, qa_rows, save_tiny_model_dir, write_jsonl  # noqa: E402

_NO_DATA = (f"the offline task datasets were not found (GRADPRUNER_DATA_DIR={os.environ.get('GRADPRUNER_DATA_DIR')!r}): "
            f"put them in {SHARED_DATA} or set GRADPRUNER_DATA_DIR to their folder")


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def pytest_runtest_setup(item):
    """Tests marked ``needs_data`` skip without the offline datasets, except under CI, where the
    datasets are part of the set-up and their absence must fail the run, not hide the tests that read them."""
    if item.get_closest_marker("needs_data") and offline_data_dir() is None:
        if _in_ci():
            pytest.fail(f"CI is set but {_NO_DATA}", pytrace=False)
        pytest.skip(_NO_DATA)
    if item.get_closest_marker("needs_llama_cpp"):
        import importlib.util

        if importlib.util.find_spec("llama_cpp") is None:
            why = "llama-cpp-python is not installed (make test builds it: see the Makefile)"
            if _in_ci():
                pytest.fail(f"CI is set but {why}", pytrace=False)
            pytest.skip(why)
    if item.get_closest_marker("needs_browser") and not (shutil.which("chromium") or shutil.which("chromium-browser")):
        why = "Debian's chromium is not installed (make test installs it: apt-get install chromium)"
        if _in_ci():
            pytest.fail(f"CI is set but {why}", pytrace=False)
        pytest.skip(why)


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
    api.score(str(tiny_llama), out, data=qa_file, method="igia", steps=4, batch_size=4, lr=1e-3)
    return out


@pytest.fixture
def one_thread(request):
    """Tiny models gain nothing from intra-op threads, and on a loaded 2-core machine OpenMP's spin-waiting
    threads made a 1 s run take over a minute; test files of tiny models use one thread (``pytestmark``).
    Tests marked slow (the real models) keep torch's default."""
    import torch

    if request.node.get_closest_marker("slow"):
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
