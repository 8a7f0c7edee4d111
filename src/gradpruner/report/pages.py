"""A page as a list of blocks, rendered to Markdown and to one self-contained HTML file.

Blocks: ("h1", text), ("h2", text), ("p", text), ("pre", text), ("img", png path, alt), ("table", rows)
with rows[0] the header. The HTML page embeds its images (data: URIs) so it travels alone, fits a
1280-px window (images scale down, wide tables scroll inside their own box) and runs no script.
"""
from __future__ import annotations

import base64
import html
import os
from pathlib import Path

from gradpruner.util.atomic import atomic_file
from gradpruner.util.tables import markdown_table

STYLE = ("body{font-family:sans-serif;max-width:70em;margin:2em auto;padding:0 1em}"
         "td,th{padding:.2em .6em;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}"
         "th{background:#f3f3f3}.wide{overflow-x:auto;max-width:100%}img{max-width:100%;height:auto}"
         "pre{background:#f6f6f6;padding:1em;overflow-x:auto;white-space:pre-wrap}")


def blocks_markdown(blocks, base: Path) -> str:
    out = []
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2"):
            out.append(("# " if kind == "h1" else "## ") + b[1])
        elif kind == "p":
            out.append(b[1])
        elif kind == "pre":
            out.append("```\n" + b[1].rstrip() + "\n```")
        elif kind == "img":
            out.append(f"![{b[2]}]({Path(os.path.relpath(b[1], base)).as_posix()})")
        elif kind == "table":
            out.append(markdown_table(b[1][0], b[1][1:]))
        out.append("")
    return "\n".join(out)


def blocks_html(blocks, title: str) -> str:
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             "<meta name='viewport' content='width=device-width, initial-scale=1'>",
             f"<style>{STYLE}</style></head><body>"]
    for b in blocks:
        kind = b[0]
        if kind in ("h1", "h2", "p"):
            parts.append(f"<{kind}>{html.escape(b[1])}</{kind}>")
        elif kind == "pre":
            parts.append(f"<pre>{html.escape(b[1])}</pre>")
        elif kind == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            parts.append(f"<p><img alt='{html.escape(b[2])}' src='data:image/png;base64,{data}'></p>")
        elif kind == "table":
            head = "".join(f"<th>{html.escape(str(c))}</th>" for c in b[1][0])
            body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in b[1][1:])
            parts.append(f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(blocks, folder: Path, name: str, title: str) -> tuple[Path, Path]:
    """``folder/name.md`` and the self-contained ``folder/name.html``, each written atomically."""
    folder = Path(folder)
    md, page = folder / f"{name}.md", folder / f"{name}.html"
    with atomic_file(md) as fh:
        fh.write(blocks_markdown(blocks, folder))
    with atomic_file(page) as fh:
        fh.write(blocks_html(blocks, title))
    return md, page
