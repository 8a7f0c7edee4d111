"""The report pages in a real browser: headless Chromium loads the run report and the compare page of a
tiny run, with no console errors, every image loaded and nothing wider than a 1280-px window."""
import pytest
import yaml
from browser import WIDTH, chromium, probe_page

from gradpruner.pipeline.compare import run_grid

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.needs_browser]


@pytest.fixture(scope="module")
def pages(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("pages")
    base = {"model": str(tiny_llama), "task": "arc_easy", "out": "unused", "seed": 0,
            "score": {"steps": 2, "batch_size": 4, "max_length": 64, "lr": 1e-3},
            "finetune": {"max_steps": 1, "batch_size": 4, "max_length": 64, "limit": 16},
            "eval": {"limit": 4, "batch_size": 4}}
    (d / "base.yaml").write_text(yaml.safe_dump(base))
    spec = {"base": "base.yaml", "out": str(d / "cmp"), "axes": {
        "removed": {"key": "plan.prune", "values": [2, 3]},
        "method": {"igia_guarded": {}, "block_influence": {"score.method": "block_influence"}}}}
    (d / "cmp.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    run_grid(d / "cmp.yaml", echo=lambda s: None, isolate=False)
    return {"run": d / "cmp" / "cells" / "removed=3,method=igia_guarded" / "report.html",
            "compare": d / "cmp" / "table.html"}


@pytest.mark.parametrize("which, images", [("run", 2), ("compare", 3)])
def test_report_page_in_chromium(pages, tmp_path, which, images):
    seen = probe_page(pages[which], tmp_path)
    assert seen["errors"] == []
    assert seen["images"] >= images and seen["broken"] == []
    assert seen["inner_width"] == WIDTH and seen["scroll_width"] <= WIDTH and seen["overflowing"] == []


def test_the_probe_sees_what_is_wrong(tmp_path):
    # a page with a broken image, a script error and a 2000-px box: the probe must report all three
    bad = tmp_path / "bad.html"
    bad.write_text("<!doctype html><html><head><meta charset='utf-8'></head><body>"
                   "<img alt='missing' src='nope.png'><div style='width:2000px'>wide</div>"
                   "<script>undefinedFunction()</script></body></html>")
    seen = probe_page(bad, tmp_path)
    assert seen["broken"] == ["missing"] and seen["scroll_width"] > WIDTH and "DIV" in seen["overflowing"]
    assert any("undefinedFunction" in e for e in seen["errors"])


def test_chromium_is_there():
    assert chromium() is not None
