"""Open a report page in headless Chromium (Debian's package) as a person would, and say what went wrong:
console errors, images that did not load, anything wider than the window."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

WIDTH = 1280
# Injected first into a copy of the page: records errors (script errors, failed loads, console.error) and,
# once the page has loaded, writes what it saw into the DOM, which --dump-dom prints.
PROBE = """<script>
window.__errors = [];
window.addEventListener('error', e => window.__errors.push(String(e.message || (e.target && e.target.tagName) || e.type)), true);
const __ce = console.error; console.error = (...a) => { window.__errors.push(a.join(' ')); __ce(...a); };
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !i.complete || i.naturalWidth === 0).map(i => i.alt);
  // an element past the window's right edge, not inside a box that scrolls it (a wide table in its own scroller is fine)
  const clipped = e => { for (let p = e.parentElement; p && p !== document.body; p = p.parentElement) {
    if (['auto', 'scroll', 'hidden'].includes(getComputedStyle(p).overflowX)) return true; } return false; };
  const over = [...document.querySelectorAll('body *')]
    .filter(e => e.getBoundingClientRect().right > innerWidth + 1 && !clipped(e)).map(e => e.tagName);
  const out = document.createElement('pre'); out.id = '__probe';
  out.textContent = JSON.stringify({errors: window.__errors, images: imgs.length, broken,
    scroll_width: document.documentElement.scrollWidth, inner_width: innerWidth, overflowing: over});
  document.body.appendChild(out);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _run(args: list[str], timeout: int = 120) -> subprocess.CompletedProcess:
    exe = chromium()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
             f"--window-size={WIDTH},900", "--virtual-time-budget=10000"]
    env = {**os.environ, "HOME": os.environ.get("HOME", "/tmp")}
    return subprocess.run([exe, *flags, *args], capture_output=True, text=True, timeout=timeout, env=env)


def probe_page(page: Path, work: Path) -> dict:
    """Load a copy of ``page`` (with the probe) in a 1280-px window; what the probe saw."""
    text = Path(page).read_text(encoding="utf-8")
    head = re.search(r"<head[^>]*>", text)
    at = head.end() if head else 0
    copy = Path(work) / f"probed_{Path(page).name}"
    copy.write_text(text[:at] + PROBE + text[at:], encoding="utf-8")
    res = _run(["--dump-dom", copy.resolve().as_uri()])
    found = re.search(r'<pre id="__probe">(.*?)</pre>', res.stdout, re.S)
    if found is None:
        raise AssertionError(f"the page did not finish loading in Chromium: {res.stderr[-2000:]}")
    import html

    return json.loads(html.unescape(found.group(1)))


def screenshot(page: Path, png: Path, height: int = 1600) -> Path:
    exe = chromium()
    subprocess.run([exe, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--window-size={WIDTH},{height}",
                    f"--screenshot={Path(png).resolve()}", Path(page).resolve().as_uri()],
                   capture_output=True, text=True, timeout=120, check=True)
    return Path(png)
