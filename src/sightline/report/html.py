"""The one page builder and stylesheet of every sightline report: sections of headline figures, tables, images, links.

Pages are plain HTML with inline CSS, images linked by relative path, no JavaScript: a report folder
can be zipped, mailed or served as is. Every analysis's index.html (docs/outputs.md), the SAE feature
pages and the demo page are built here.
"""

from __future__ import annotations

import html
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sightline.report.files import write_text_atomic

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #1d2330; }
h1 { font-size: 1.7em; margin-bottom: .2em; } h2 { margin-top: 2em; border-bottom: 1px solid #d6dae3; }
h3 { margin: 1.6em 0 .3em; }
.sub { color: #5b6478; } .note { color: #5b6478; font-size: .92em; }
.tag { background: #eef0f6; border-radius: 3px; padding: 0 .4em; margin-right: .4em; font-size: .9em; }
table { border-collapse: collapse; margin: .8em 0; } td, th { padding: .25em .8em; border-bottom: 1px solid #e5e8ef;
       text-align: left; vertical-align: top; } th { background: #f4f6fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.figs { display: flex; flex-wrap: wrap; gap: 1.2em; align-items: flex-start; }
figure { margin: 0; max-width: 100%; }
figure img { max-width: 100%; height: auto; border: 1px solid #e5e8ef; }  /* natural size: legends stay legible */
figcaption { font-size: .9em; color: #5b6478; max-width: 40em; }
.findings { background: #f6f8fc; border-left: 4px solid #7b2cbf; padding: .6em 1.2em; }
.findings li { margin: .35em 0; }
img { max-width: 100%; }
code { background: #f4f6fa; padding: 0 .25em; border-radius: 3px; }
.ctx { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; white-space: pre-wrap;
       margin: .15em 0; } .ctx .top { outline: 1.5px solid #7b2cbf; } .ctx .img { color: #8a91a3; }
"""


@dataclass
class Section:
    """One part of a report: a title, a paragraph, key figures, tables, figures, links, and any
    ready-made HTML (`html`, placed last, not escaped)."""

    title: str
    text: str = ""
    figures: dict[str, Any] = field(default_factory=dict)  # label -> value (the headline numbers)
    # (caption, header, rows)
    tables: list[tuple[str, Sequence[str], Sequence[Sequence[Any]]]] = field(default_factory=list)
    images: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the page, caption)
    links: list[tuple[str, str]] = field(default_factory=list)  # (path relative to the page, label)
    html: str = ""  # trusted HTML built by the caller (e.g. a latent's top text contexts)
    anchor: str | None = None  # id of the section's heading; None: s<i>


@dataclass(frozen=True)
class Thumb:
    """A table cell that shows an image (path relative to the page), linked to itself."""

    src: str
    alt: str = ""
    height: int = 56


@dataclass(frozen=True)
class Link:
    """A table cell that links to another page or file (path relative to the page)."""

    href: str
    text: str


def fmt(v: Any, digits: int = 4) -> str:
    """A value as table text: floats to `digits` significant digits, None and NaN as a dash."""
    if isinstance(v, Thumb):
        src = html.escape(v.src, quote=True)
        return f"<a href='{src}'><img src='{src}' alt='{html.escape(v.alt, quote=True)}' height='{v.height}'></a>"
    if isinstance(v, Link):
        return f"<a href='{html.escape(v.href, quote=True)}'>{html.escape(v.text)}</a>"
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if math.isfinite(v) else "–"
    if isinstance(v, (dict, list)):
        return html.escape(json.dumps(v))
    return html.escape(str(v))


def frac_count(frac: float | None, count: int | None, digits: int = 3) -> str:
    """A share with its count in brackets, '0.023 (6)': how the reports show dead latents and the like."""
    if frac is None or (isinstance(frac, float) and not math.isfinite(frac)):
        return "n/a" if count is None else f"n/a ({count})"
    return f"{frac:.{digits}g}" + ("" if count is None else f" ({count})")


def loss_recovered_text(value: float | None, note: str | None = None) -> str:
    """Loss recovered as reports show it: 3 decimals; above 1 clipped to 1.000 with the measured value and why
    (the spliced reconstruction scored a lower answer loss than the model itself, within noise); unmeasured as
    'n/a (not measured: reason)', never 'None' or a dash."""
    if value is None or math.isnan(value):
        return f"n/a (not measured: {note or 'no answer tokens'})"
    if value > 1:
        return f"1.000 (measured {value:.4f}: the reconstruction's answer loss is slightly below the clean one)"
    return f"{value:.3f}"


def bullets(items: Sequence[str], cls: str = "findings") -> str:
    """A list of plain-text sentences as escaped HTML (a report's findings)."""
    return f"<ul class='{cls}'>" + "".join(f"<li>{html.escape(t)}</li>" for t in items) + "</ul>"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """An HTML table; numbers right-aligned."""
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f'<td class="num">{fmt(c, digits)}</td>'
                         if isinstance(c, (int, float)) and not isinstance(c, bool) else f"<td>{fmt(c, digits)}</td>"
                         for c in r) + "</tr>"
        for r in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def render_page(title: str, subtitle: str, sections: Sequence[Section], nav: Sequence[tuple[str, str]] = (),
                toc: bool | None = None) -> str:
    """The page's HTML text. `nav`: (href, label) links shown under the title; `toc`: a contents line
    (default: when there is more than one section)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1>",
             f"<p class='sub'>{html.escape(subtitle)}</p>"]
    if nav:
        parts.append("<p>" + " &middot; ".join(f"<a href='{html.escape(h, quote=True)}'>{html.escape(t)}</a>"
                                                for h, t in nav) + "</p>")
    anchors = [s.anchor or f"s{i}" for i, s in enumerate(sections)]
    if (len(sections) > 1) if toc is None else toc:
        parts.append("<p>" + " &middot; ".join(f"<a href='#{a}'>{html.escape(s.title)}</a>"
                                                for a, s in zip(anchors, sections)) + "</p>")
    for a, s in zip(anchors, sections):
        parts.append(f"<h2 id='{html.escape(a, quote=True)}'>{html.escape(s.title)}</h2>")
        if s.text:
            parts.append(f"<p>{html.escape(s.text)}</p>")
        if s.figures:
            parts.append(table(["figure", "value"], list(s.figures.items())))
        for caption, header, rows in s.tables:
            parts.append((f"<p class='note'>{html.escape(caption)}</p>" if caption else "") + table(header, rows))
        if s.images:
            parts.append("<div class='figs'>")
            for src, caption in s.images:
                src_q = html.escape(src, quote=True)
                alt = html.escape(caption, quote=True)
                parts.append(f"<figure><a href='{src_q}'><img src='{src_q}' alt='{alt}'></a>"
                             f"<figcaption>{html.escape(caption)}</figcaption></figure>")
            parts.append("</div>")
        if s.links:
            parts.append("<p>" + " &middot; ".join(f"<a href='{html.escape(h, quote=True)}'>{html.escape(t)}</a>"
                                                    for h, t in s.links) + "</p>")
        if s.html:
            parts.append(s.html)
    parts.append("</body></html>")
    return "\n".join(parts)


def write_page(path: str | os.PathLike, title: str, subtitle: str, sections: Sequence[Section],
               nav: Sequence[tuple[str, str]] = (), toc: bool | None = None) -> Path:
    """Write the page atomically; image and link paths are taken relative to its folder."""
    return write_text_atomic(path, render_page(title, subtitle, sections, nav, toc))


def figure_images(folder: str | os.PathLike, sub: str = "figures") -> list[tuple[str, str]]:
    """(path relative to `folder`, caption) of every PNG under folder/sub, sorted: a section of all figures."""
    root = Path(folder)
    return [(p.relative_to(root).as_posix(), p.stem.replace("_", " "))
            for p in sorted((root / sub).rglob("*.png"))]
