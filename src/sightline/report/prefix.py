"""Figures and page of a prefix study: per task, the change of the primary readout (prefix kind minus no prefix) per
layer, one line per prefix kind with its paired 95% interval as a band, one panel per representation kind. Reads
plain data (a prefix run's results.json parts)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from sightline.report.files import save_figure

KIND_COLOURS = {"neutral": "#7f7f7f", "task": "#2a7ab0", "class": "#e07a1f", "expression": "#7b2cbf"}


def plot_prefix_changes(task: str, metric: str, rows: Sequence[Mapping[str, Any]],
                        path: str | os.PathLike) -> Path | None:
    """Change of `metric` against layer, a line and interval band per prefix kind, a panel per layered rep kind
    (the concatenated heads; single heads and layerless reps are in the table only). None when nothing is layered."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    mine = [r for r in rows if r["task"] == task and r["metric"] == metric and r["layer"] is not None
            and r["head"] is None]
    rep_kinds = list(dict.fromkeys(r["rep_kind"] for r in mine))
    if not rep_kinds:
        return None
    fig, axes = plt.subplots(1, len(rep_kinds), figsize=(4.4 * len(rep_kinds) + 0.6, 3.4), squeeze=False)
    for ax, rk in zip(axes[0], rep_kinds):
        for kind in dict.fromkeys(r["kind"] for r in mine):
            pts = sorted((r for r in mine if r["rep_kind"] == rk and r["kind"] == kind), key=lambda r: r["layer"])
            if not pts:
                continue
            x = [r["layer"] for r in pts]
            colour = KIND_COLOURS.get(kind)
            ax.plot(x, [r["change"] for r in pts], "-o", ms=3, color=colour, label=kind)
            if all(r["ci_low"] is not None for r in pts):
                ax.fill_between(x, [r["ci_low"] for r in pts], [r["ci_high"] for r in pts], color=colour, alpha=0.18,
                                lw=0)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel(f"{rk} layer")
        ax.set_ylabel(f"change of {metric} (prefix - none)")
        ax.set_title(f"{task}: {rk}", fontsize=10)
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def finding_lines(summary: Mapping[str, Any]) -> list[str]:
    """One sentence per task and prefix kind: the largest change of the primary readout and how many
    representations' intervals exclude 0 on either side."""
    lines = []
    for task, t in summary["tasks"].items():
        for kind, k in t["kinds"].items():
            big = k["largest_change"]
            if big is None:
                continue
            ci = "" if big["ci_low"] is None else f" (95% interval {big['ci_low']:+.3f} to {big['ci_high']:+.3f})"
            lines.append(f"{task}, prefix {kind} ({k['prefix_example']!r} for the first unit): {t['primary_metric']} "
                         f"changes by {k['mean_change']:+.3f} on average over {k['n_reps']} representations, most at "
                         f"{big['rep']}: {big['change']:+.3f}{ci}; the interval lies above 0 for {k['n_above_zero']} "
                         f"and below 0 for {k['n_below_zero']} of them ({t['n_units']} units, paired).")
    return lines


def write_prefix_page(folder: str | os.PathLike, summary: Mapping[str, Any], rows: Sequence[Mapping[str, Any]]) -> Path:
    """index.html and figures/ of a prefix study."""
    from sightline.report.html import Section, bullets, write_page

    folder = Path(folder)
    (folder / "figures").mkdir(parents=True, exist_ok=True)
    sections = [Section(
        "What the run found",
        "Each prefix kind's readouts against the same units read without a prefix: the change is prefix minus none, "
        f"its 95% interval from {summary['bootstrap']} paired bootstrap resamples of the units. An interval that "
        "excludes 0 is a change the units support; one that holds 0 is not.",
        html=bullets(finding_lines(summary) or ["No prefix kind could be compared (see the warnings)."]),
        anchor="findings")]
    if summary.get("warnings"):
        sections.append(Section("Warnings", html=bullets([f"Warning: {w}" for w in summary["warnings"]], cls="note"),
                                anchor="warnings"))
    for task, t in summary["tasks"].items():
        metric = t["primary_metric"]
        p = plot_prefix_changes(task, metric, rows, folder / "figures" / f"prefix_{task}.png")
        images = [] if p is None else [(p.relative_to(folder).as_posix(),
                                        f"{task}: change of {metric} per layer, prefix minus none, 95% bands")]
        mine = [r for r in rows if r["task"] == task and r["primary"]]
        table_rows = [[r["kind"], r["rep"], r["none_value"], r["value"], r["change"], r["ci_low"], r["ci_high"],
                       "yes" if r["excludes_zero"] else "no"] for r in mine]
        figures: dict[str, Any] = {"units": t["n_units"], "metric": metric}
        figures.update({f"prefix {k}": repr(v["prefix_example"]) for k, v in t["kinds"].items()})
        text = f"Data: {t['source']}."
        if t["skipped_kinds"]:
            text += " Skipped: " + "; ".join(f"{k} ({why})" for k, why in t["skipped_kinds"].items()) + "."
        sections.append(Section(task, text, figures=figures, images=images, anchor=f"task-{task}",
                                tables=[("", ["prefix", "representation", f"{metric} without", f"{metric} with",
                                              "change", "95% low", "95% high", "excludes 0"], table_rows)]))
    return write_page(folder / "index.html", "Text prefix before the image",
                      f"{summary['model'].get('name', '')} · {', '.join(summary['tasks'])}", sections)
