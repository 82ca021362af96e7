"""Figures and page of a surfacing run: per question type, the readout's kind ("similarity", "matched", "probe")
and its accuracy per representation beside the answer's and chance, and the share "present, not surfaced"
(readout right, answer wrong), the paper's 33.3% for Art Style as a line. Reads plain data (a surfacing run's
results.json parts)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sightline.report.files import save_figure


def _order(rep: str) -> tuple:
    m = re.match(r"^(\w+)(?:\.(\d+))?", rep)
    kinds = ("projector", "values", "keys", "resid")
    kind = m.group(1) if m else rep
    return (kinds.index(kind) if kind in kinds else 9, int(m.group(2)) if m and m.group(2) else -1, rep)


_KIND_TEXT = {
    "similarity": "Readout: the candidate image whose pooled features are most cosine-similar to the reference's.",
    "matched": "Readout: the drawn point whose token's features match the reference point's token (correspondence), "
               "or the direction of the median shift of mutually nearest tokens between the two views (multi-view).",
    "probe": "Readout: a logistic probe on the images' pooled features, cross-fitted (each question scored by a probe "
             "fitted on the other folds), picking the most probable of the question's choices.",
}


def plot_surfacing(title: str, per_rep: Mapping[str, Mapping[str, Any]], answer_accuracy: float,
                   path: str | os.PathLike, reference: float | None = None, chance: float | None = None) -> Path:
    """Readout accuracy and "present, not surfaced" per representation (x axis, in layer order), the answer's
    accuracy, chance and the paper's not-surfaced share (`reference`) as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    reps = sorted(per_rep, key=_order)
    x = range(len(reps))
    fig, ax = plt.subplots(figsize=(max(4.8, 0.7 * len(reps) + 2.5), 3.6))
    ax.plot(x, [per_rep[r]["readout_accuracy"] for r in reps], "-o", color="#7b2cbf", label="readout accuracy")
    ax.plot(x, [per_rep[r]["present_not_surfaced"] for r in reps], "-s", color="#e07a1f",
            label="present, not surfaced")
    ax.axhline(answer_accuracy, color="#2a7ab0", lw=1.6, label="answer accuracy")
    if chance is not None:
        ax.axhline(chance, color="grey", ls=":", lw=1.2, label="chance")
    if reference is not None:
        ax.axhline(reference, color="#e07a1f", ls="--", lw=1.2, label=f"paper: not surfaced {reference:.1%}")
    ax.set_xticks(list(x), reps, rotation=45, ha="right", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel("share of questions")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return save_figure(fig, path)


def write_surfacing_page(folder: str | os.PathLike, summary: Mapping[str, Any], blink: Mapping[str, Any],
                         study: Mapping[str, Any] | None) -> Path:
    """index.html and figures/ of a surfacing run."""
    from sightline.report.html import Section, bullets, write_page

    folder = Path(folder)
    (folder / "figures").mkdir(parents=True, exist_ok=True)

    def f3(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = []
    for subtask, s in summary["subtasks"].items():
        line = (f"{subtask}: answer accuracy {f3(s.get('answer_accuracy'))} over {s['n']} questions (chance "
                f"{f3(s.get('chance'))})")
        if s.get("best_rep"):
            line += (f"; {s.get('readout_kind') or ''} readout ({s['best_rep']}) {f3(s['readout_accuracy'])}, present "
                     f"but not surfaced {f3(s['present_not_surfaced'])}")
        elif s.get("readout_kind"):
            line += f"; no {s['readout_kind']} readout"
        if s.get("paper_not_surfaced") is not None:
            line += f" (paper: {s['paper_not_surfaced']:.1%})"
        lines.append(line + ".")
    for kind, s in (summary.get("organism") or {}).items():
        lines.append(f"organism {kind}: answer {f3(s['answer_accuracy'])}, probe ({s['best_rep']}) "
                     f"{f3(s['readout_accuracy'])}, training majority {f3(s['majority'])}; present but not surfaced "
                     f"{f3(s['present_not_surfaced'])} of {s['n']} questions.")
    sections = [Section("What the run found",
                        "Present, not surfaced: the share of questions a readout of the image representations gets "
                        "right and the model's own answer gets wrong.", html=bullets(lines), anchor="findings")]
    if summary.get("warnings"):
        sections.append(Section("Warnings", html=bullets([f"Warning: {w}" for w in summary["warnings"]], cls="note"),
                                anchor="warnings"))
    for subtask, e in blink.items():
        images, tables = [], []
        if e.get("readout"):
            p = plot_surfacing(f"{subtask}: {e.get('readout_kind', 'similarity')} readout vs answer", e["readout"],
                               e["answer_accuracy"],
                               folder / "figures" / f"blink_{subtask}.png",
                               summary["subtasks"][subtask].get("paper_not_surfaced"), e.get("chance"))
            images.append((p.relative_to(folder).as_posix(), (f"{subtask}: readout accuracy and present-not-surfaced "
                                                             "share per representation; the answer's accuracy")))
            tables.append(("", ["representation", "readout accuracy", "present, not surfaced", "surfaced, not present"],
                           [[r, v["readout_accuracy"], v["present_not_surfaced"], v["surfaced_not_present"]]
                            for r, v in sorted(e["readout"].items(), key=lambda kv: _order(kv[0]))]))
        best = summary["subtasks"][subtask].get("best_rep")

        def letter(k):
            return "-" if k is None else "ABCDEFGHIJ"[k]

        ex = [[it["id"], letter(it["answer"]), it["generated"][:80], letter(it["parsed"]),
               letter((it.get("readout") or {}).get(best)) if best else "-"] for it in e.get("items", [])[:5]]
        if ex:
            tables.append(("First questions", ["question", "answer", "generated", "parsed",
                                               f"readout ({best})" if best else "readout"], ex))
        sections.append(Section(f"BLINK {subtask}", (_KIND_TEXT.get(e.get("readout_kind"), "") + " "
                                                     + (e.get("note") or "")).strip(), anchor=f"blink-{subtask}",
                                figures={"readout": e.get("readout_kind"), "questions": e["n"],
                                         "questions read": e.get("n_readout", 0),
                                         "answer accuracy": e.get("answer_accuracy"),
                                         "unparsed answers": e.get("unparsed"), "chance": e.get("chance")},
                                images=images, tables=tables))
    if study:
        for kind, k in study["kinds"].items():
            p = plot_surfacing(f"organism {kind}: probe vs answer", k["reps"], k["answer_accuracy"],
                               folder / "figures" / f"organism_{kind}.png", chance=k["majority"])
            sections.append(Section(
                f"Organism: {kind}", "The probe is fitted on training scenes and read on held-out ones; the dotted "
                "line is always answering the training majority.", anchor=f"organism-{kind}",
                figures={"questions": k["n"], "answer accuracy": k["answer_accuracy"], "majority": k["majority"]},
                images=[(p.relative_to(folder).as_posix(), f"{kind}: probe accuracy and present-not-surfaced share")],
                tables=[("", ["representation", "probe accuracy", "present, not surfaced", "surfaced, not present"],
                         [[r, v["readout_accuracy"], v["present_not_surfaced"], v["surfaced_not_present"]]
                          for r, v in sorted(k["reps"].items(), key=lambda kv: _order(kv[0]))]),
                        ("Answers", ["question", "answer", "generated"],
                         [[x["question"], x["answer"], x["generated"]] for x in k["examples"]])]))
    return write_page(folder / "index.html", "Present, not surfaced", f"{summary['model']} · {summary['blink_source']}",
                      sections)
