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


_NO_LLAMA_CPP = ("llama-cpp-python is not installed (make test builds it when cmake and a C/C++ compiler are on PATH; "
                 "or pip install llama-cpp-python)")
_NO_BROWSER = "chromium is not on PATH (install Debian's chromium: apt-get install chromium; make test does under CI=true)"


def _missing(item, known: dict | None = None) -> str | None:
    """Why ``item`` cannot run on this machine (a ``needs_*`` marker whose need is missing), or None.
    ``known`` keeps each need's answer over a whole collection."""
    import importlib.util

    checks = {"needs_data": (lambda: offline_data_dir() is not None, _NO_DATA),
              "needs_llama_cpp": (lambda: importlib.util.find_spec("llama_cpp") is not None, _NO_LLAMA_CPP),
              "needs_browser": (lambda: bool(shutil.which("chromium") or shutil.which("chromium-browser")), _NO_BROWSER)}
    known = {} if known is None else known
    for marker, (there, why) in checks.items():
        if item.get_closest_marker(marker):
            if marker not in known:
                known[marker] = there()
            if not known[marker]:
                return why
    return None


def pytest_collection_modifyitems(config, items):
    """Tests marked ``needs_data``, ``needs_llama_cpp`` or ``needs_browser`` skip without what they need
    (a skip mark, so pytest's -ra summary names each test and the reason in one line)..."""
    if _in_ci():
        return
    known: dict = {}
    for item in items:
        why = _missing(item, known)
        if why:
            item.add_marker(pytest.mark.skip(reason=why))


def pytest_runtest_setup(item):
    """... except under CI, where the datasets, llama-cpp-python and chromium are part of the set-up and
    their absence must fail the run, not hide the tests that need them."""
    if _in_ci():
        why = _missing(item)
        if why:
            pytest.fail(f"CI is set but {why}", pytrace=False)


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
