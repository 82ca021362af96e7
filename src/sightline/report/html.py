"""A static HTML report: sections of headline figures, tables, images and links, opened from disk.

Pages are plain HTML with inline CSS, images linked by relative path, no JavaScript: a report folder
can be zipped, mailed or served as is.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1100px;
       padding: 0 1em; color: #1d2330; }
h1 { font-size: 1.7em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #d6dae3; }
.sub { color: #5b6478; } .note { color: #5b6478; font-size: .92em; }
table { border-collapse: collapse; margin: .8em 0; } td, th { padding: .25em .8em; border-bottom: 1px solid #e5e8ef;
       text-align: left; vertical-align: top; } th { background: #f4f6fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figs { display: flex; flex-wrap: wrap; gap: 1em; } figure { margin: 0; max-width: 100%; }
figure img { max-width: 520px; width: 100%; border: 1px solid #e5e8ef; }
figcaption { font-size: .9em; color: #5b6478; max-width: 520px; }
code { background: #f4f6fa; padding: 0 .25em; border-radius: 3px; }
"""


@dataclass
class Section:
    """One part of a report: a title, a paragraph, key figures, tables, figures and links."""

    title: str
    text: str = ""
    figures: dict[str, Any] = field(default_factory=dict)  # label -> value (the headline numbers)
    tables: list[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = field(default_factory=list)  # caption, header, rows
    images: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the page, caption)
    links: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the page, label)


@dataclass(frozen=True)
class Thumb:
    """A table cell that shows an image (path relative to the page), linked to itself."""

    src: str
    alt: str = ""
    height: int = 56


def _fmt(v: Any) -> str:
    if isinstance(v, Thumb):
        src = html.escape(v.src, quote=True)
        return f"<a href='{src}'><img src='{src}' alt='{html.escape(v.alt, quote=True)}' height='{v.height}'></a>"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{_fmt(c)}</td>' if isinstance(c, (int, float)) else f"<td>{_fmt(c)}</td>"
                         for c in r) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_page(title: str, subtitle: str, sections: Sequence[Section]) -> str:
    """The page's HTML text."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='sub'>{html.escape(subtitle)}</p>"]
    if len(sections) > 1:
        parts.append("<p>" + " &middot; ".join(f"<a href='#s{i}'>{html.escape(s.title)}</a>"
                                                for i, s in enumerate(sections)) + "</p>")
    for i, s in enumerate(sections):
        parts.append(f"<h2 id='s{i}'>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.figures:
            parts.append(_table(["figure", "value"], list(s.figures.items())))
        for caption, header, rows in s.tables:
            parts.append(f"<p class='note'>{html.escape(caption)}</p>" + _table(header, rows))
        if s.images:
            parts.append("<div class='figs'>")
            for src, caption in s.images:
                src_q = html.escape(src, quote=True)
                parts.append(f"<figure><a href='{src_q}'><img src='{src_q}' alt='{html.escape(caption, quote=True)}'></a>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            parts.append("</div>")
        if s.links:
            parts.append("<p>" + " &middot; ".join(f"<a href='{html.escape(h, quote=True)}'>{html.escape(t)}</a>"
                                                    for h, t in s.links) + "</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(path: str | os.PathLike, title: str, subtitle: str, sections: Sequence[Section]) -> Path:
    """Write the page atomically; image and link paths are taken relative to its folder."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(render_page(title, subtitle, sections), encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """JSON, indented, written atomically."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
