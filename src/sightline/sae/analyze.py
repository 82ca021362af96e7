"""The SAE analysis job: SAEs + an ActivationStore (image and text tokens) -> metrics by modality, loss recovered,
the modality split and its curve across layers, concept latents, and a static HTML page of latents.

One streamed pass over the store per SAE feeds every accumulator (reconstruction, modality mass, top
activations, concept scores), so memory does not grow with the store. Output (docs/outputs.md; written
under OUT.partial, then renamed into place):

    OUT/config.json            the SAEAnalyzeConfig it ran with
    OUT/results.json           summary; metrics (per SAE: reconstruction by modality, loss recovered, answer
                               accuracy per question type with the SAE spliced in);
                               modality (per SAE: sharing, concept probing, cross-modal latents; the
                               shared-fraction curve across layers)
    OUT/figures/shared_by_layer.png   the curve (the Line of Sight headline figure)
    OUT/figures/<name>/        each SAE's image-share histogram and its latents' top images
    OUT/index.html             what the run found, links to each SAE's page
    OUT/<name>/features.html   latents: top images as heatmaps over the originals, top text contexts
    OUT/<name>/latents.safetensors  per-latent image share, frequencies, mean activations
"""

from __future__ import annotations

import html
import json
import re
import time
from dataclasses import asdict, dataclass, field, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.config import ConfigIO, to_dict
from sightline.errors import UserError
from sightline.report.files import RunFolder, RunResult, check_output, to_jsonable, write_json
from sightline.report.html import fmt
from sightline.runtime import resolve_device, resolve_placement
from sightline.sae.features import (
    IMAGE_CODES,
    StoreTokens,
    TopActivations,
    check_sae_store,
    iter_latents,
    latent_heatmap,
    load_tokenizer,
    per_example_max,
)
from sightline.sae.metrics import (
    DENSE_THRESHOLD,
    ReconStats,
    answer_items,
    answer_nll,
    loss_recovered,
    task_accuracy,
    task_answers,
    task_items,
)
from sightline.sae.modality import (
    CONCEPT_AUROC,
    SHARE_THRESHOLD,
    ConceptCollector,
    ModalityStats,
    example_concepts,
    shared_by_layer,
    sharing,
)


@dataclass(frozen=True)
class SAEAnalyzeConfig(ConfigIO):
    """Everything an SAE analysis depends on (saved as OUT/config.json)."""

    saes: tuple[str, ...] = field(metadata={"flags": ("--sae", "--saes")})
    """SAE folders (cfg.json + sae_weights.safetensors), or folders of them such as an `sae train` run."""
    store: str
    """ActivationStore holding the SAEs' sites, ideally extracted with --positions all."""
    out: str = "sae-analysis"
    """Output folder (config.json, results.json, figures/, index.html, one feature page per SAE)."""
    loss: bool = True
    """Measure loss recovered (runs the model; --no-loss skips it)."""
    model: str | None = None
    """Model for loss recovered; None: the model the store was extracted from."""
    data: str | None = None
    """JSONL of (image, prompt, label[, qtype, choices]) for loss recovered and task accuracy; None: the store's own
    examples with a prompt and label."""
    n_loss: int = 64
    """Sequences scored for loss recovered."""
    loss_batch_size: int = 8
    """Sequences per forward for loss recovered and task accuracy."""
    tasks: bool = True
    """Measure answer accuracy per question type clean, with the SAE spliced in at the image positions and with
    zeros there (runs the model; --no-tasks skips it)."""
    n_task: int = 32
    """Questions per question type for task accuracy (the first ones of each type)."""
    task_qtypes: tuple[str, ...] = ()
    """Question types asked for task accuracy (the data's qtype field); empty: every type."""
    max_new_tokens: int = 8
    """Tokens generated per answer at most (task accuracy by exact match)."""
    model_dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, float16 or bfloat16."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda:0."""
    batch_size: int = 4096
    """Stored tokens per SAE batch."""
    share_threshold: float = SHARE_THRESHOLD
    """A latent is image-only (text-only) when its image share is >= 1 - t (<= t); shared in between."""
    dense_threshold: float = DENSE_THRESHOLD
    """A latent firing on more than this share of tokens is dense."""
    concepts: str = "auto"
    """Concepts scored: auto, facts, label or none (see sightline.sae.modality)."""
    concept_auroc: float = CONCEPT_AUROC
    """AUROC a latent needs to count for a concept."""
    max_fvu: float = 0.9
    """An SAE whose FVU on the tokens it was trained on is >= this is flagged as untrained (a warning; its
    latents and sharing say little)."""
    max_dead_frac: float = 0.5
    """An SAE with more than this share of dead latents (never active on the store) is flagged as untrained."""
    max_probe_images: int = 4096
    """Images used for concept probing at most."""
    n_features: int = 24
    """Latents on each feature page (concept latents first, then a mix)."""
    features: tuple[int, ...] = ()
    """Latents always shown."""
    top_images: int = 6
    """Top images shown per latent."""
    top_texts: int = 8
    """Top text contexts shown per latent."""
    context: int = 10
    """Text tokens shown before a top text token."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show progress bars."""



# ------------------------------------------------------------------------------------------ helpers
def find_sae_folders(paths) -> list[Path]:
    """SAE folders: each path that holds cfg.json, or the subfolders of a path that hold one (natural order)."""
    out: list[Path] = []
    for p in paths:
        p = Path(p).expanduser()
        if (p / "cfg.json").is_file():
            out.append(p)
        elif p.is_dir():
            subs = [q for q in p.iterdir() if (q / "cfg.json").is_file()]
            key = (lambda q: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", q.name)])
            if not subs:
                raise UserError(f"{p} holds no SAE (no cfg.json in it or its subfolders); pass SAE folders "
                                "written by `sightline sae train`")
            out += sorted(subs, key=key)
        else:
            raise UserError(f"SAE folder {p} does not exist")
    if not out:
        raise UserError("no SAE given: pass one or more SAE folders")
    return out


def _sae_cfg(sae) -> dict:
    cfg = getattr(sae, "cfg", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))


def sae_labels(saes: list, sites: list[str]) -> list[str]:
    """A distinct label per SAE: its site, or, where several SAEs share a site, the site plus the SAE's name
    (its `sae train` folder name, e.g. resid.2-topk-w1024-k32) or architecture, width and k; a counter last."""
    out = []
    for sae, site in zip(saes, sites):
        if sites.count(site) == 1:
            out.append(site)
            continue
        c = _sae_cfg(sae)
        width = c.get("width") or getattr(sae, "W_dec", torch.empty(0, 0)).shape[0]
        second = f"l1_{c['l1_coeff']:g}" if c.get("arch") == "relu" and c.get("l1_coeff") is not None else (
            f"k{c['k']}" if c.get("k") else "")
        tag = c.get("name") or "-".join(str(t) for t in (c.get("arch") or "sae", f"w{width}", second) if t)
        out.append(f"{site}-{tag}")
    counts = {label: out.count(label) for label in out}
    seen: dict[str, int] = {}
    for i, label in enumerate(out):
        if counts[label] > 1:
            seen[label] = seen.get(label, 0) + 1
            out[i] = f"{label}-{seen[label]}"
    return out


def training_record(folder: str | Path) -> dict | None:
    """What the `sae train` run that wrote an SAE folder says about it ({steps, tokens, batch_size, too_short,
    warnings}), from the run's results.json beside the folder; None when there is none."""
    folder = Path(folder)
    path = folder.parent / "results.json"
    if not path.is_file():
        return None
    try:
        summary = json.loads(path.read_text()).get("summary") or {}
    except (ValueError, AttributeError):
        return None
    if not any(s.get("name") == folder.name for s in summary.get("saes", [])):
        return None
    steps, batch = summary.get("steps"), summary.get("batch_size")
    return {"run": str(folder.parent), "steps": steps, "tokens": summary.get("tokens"), "batch_size": batch,
            "too_short": summary.get("too_short", bool(steps is not None and steps < 200)),
            "warnings": [w for w in summary.get("warnings", []) if w.startswith(("too short", "only "))]}


def quality_flags(rec: dict, modality: str | None, training: dict | None, max_fvu: float,
                  max_dead_frac: float) -> list[str]:
    """Why an SAE looks untrained or too briefly trained to analyse: its training run said so, its FVU on the
    tokens it was trained on is >= max_fvu, or more than max_dead_frac of its latents are dead. [] when fine."""
    why = []
    if training is not None and training.get("too_short"):
        why.append(f"its training run was too short ({training.get('steps')} steps, {training.get('tokens')} tokens)")
    m = rec["metrics"]
    groups = {"image": ("image",), "text": ("text",)}.get(modality or "", ("image", "text"))
    fvus = [(g, m[g]["fvu"]) for g in groups if m[g]["n_tokens"] and m[g]["fvu"] == m[g]["fvu"]]
    worst = max(fvus, key=lambda t: t[1], default=None)
    if worst is not None and worst[1] >= max_fvu:
        why.append(f"{worst[0]} FVU {worst[1]:.2f} >= {max_fvu:g}")
    dead = m["all"]["frac_dead"]
    if dead == dead and dead > max_dead_frac:
        why.append(f"{dead:.0%} of latents dead (> {max_dead_frac:.0%})")
    return why


def _name_of(site: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9_.\-]", "_", site) or "sae"
    name, k = base, 1
    while name in taken:
        k += 1
        name = f"{base}-{k}"
    taken.add(name)
    return name


# ----------------------------------------------------------------------------------- one SAE's pass
@dataclass
class SAEPass:
    """What one streamed pass over the store gathers for one SAE."""

    recon: ReconStats
    modality: ModalityStats
    top: TopActivations
    concepts: ConceptCollector | None


def run_pass(sae, store, site: str, cfg: SAEAnalyzeConfig, names: list[str], concepts: dict[int, set[str]],
             tokens: StoreTokens | None) -> SAEPass:
    """Stream the store once through the SAE, feeding every accumulator."""
    width, d = sae.W_dec.shape
    p = SAEPass(ReconStats(width, d), ModalityStats(width), TopActivations(width, 2 * cfg.top_images, cfg.top_texts),
                ConceptCollector(width, names, concepts, store, tokens, cfg.max_probe_images) if names else None)
    for batch in iter_latents(sae, store, site, cfg.batch_size, cfg.progress, desc=f"sae {site}"):
        imax = per_example_max(batch.f_nw, batch.index)
        p.recon.update(batch)
        p.modality.update(batch)
        p.top.update(batch, imax)
        if p.concepts is not None:
            p.concepts.update(batch, imax)
    return p


def choose_latents(share: np.ndarray, freq_all: np.ndarray, concept_res: dict, n: int, forced=(),
                   threshold: float = SHARE_THRESHOLD) -> list[tuple[int, str]]:
    """Latents for the page, with why: forced ones, concept latents (cross-modal, then probe winners),
    then the most frequent shared, image-only and text-only latents in turn."""
    out: list[tuple[int, str]] = []
    seen: set[int] = set()
    cap = n + len(set(forced))

    def add(j, why):
        if j is not None and 0 <= int(j) < len(share) and int(j) not in seen and len(out) < cap:
            seen.add(int(j))
            out.append((int(j), why))

    for j in forced:
        add(j, "asked for")
    for rec in concept_res.get("cross_modal", []):
        add(rec["latent"], f"cross-modal: {rec['concept']}")
    probing = concept_res.get("probing") or {}
    for name, rec in (probing.get("per_label") or {}).items():
        add(rec.get("latent"), f"image probe: {name}")
    order = np.argsort(-np.nan_to_num(freq_all, nan=0.0), kind="stable")
    classes = {
        "shared": [j for j in order if not np.isnan(share[j]) and threshold < share[j] < 1 - threshold],
        "image-only": [j for j in order if not np.isnan(share[j]) and share[j] >= 1 - threshold],
        "text-only": [j for j in order if not np.isnan(share[j]) and share[j] <= threshold],
    }
    k = 0
    while len(out) < cap and any(k < len(v) for v in classes.values()):
        for cls, lst in classes.items():
            if k < len(lst):
                add(lst[k], f"frequent {cls}")
        k += 1
    return out


@torch.no_grad()
def encode_examples(sae, store, site: str, example_ids, latents: list[int],
                    chunk_tokens: int = 8192) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """example id -> (activations of the chosen latents at its stored tokens [n, len(latents)], index rows);
    each example read and encoded once, in chunks of about chunk_tokens tokens."""
    from sightline.sae.features import sae_device

    dev = sae_device(sae)
    cols = torch.as_tensor(latents, dtype=torch.long, device=dev)
    out: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    pending: list[tuple[int, torch.Tensor, np.ndarray]] = []

    def flush():
        if not pending:
            return
        x = torch.cat([p[1] for p in pending]).to(device=dev, dtype=torch.float32)
        f = sae.encode(x).index_select(1, cols).cpu().numpy()
        k = 0
        for e, xe, idx in pending:
            out[e] = (f[k : k + len(xe)], idx)
            k += len(xe)
        pending.clear()

    n = 0
    for e in sorted({int(e) for e in example_ids}):
        ex = store.example(e, [site])
        pending.append((e, ex[site], ex["index"]))
        n += len(ex[site])
        if n >= chunk_tokens:
            flush()
            n = 0
    flush()
    return out


# -------------------------------------------------------------------------------------- HTML page
def _unique_images(images: list[tuple[int, float]], by_id: dict[int, dict], n: int) -> list[tuple[int, float]]:
    """The first n of (example, value) whose image file differs from those before (an image asked several
    questions is stored once per question, with the same image tokens)."""
    out, seen = [], set()
    for e, v in images:
        key = by_id[e].get("path") or f"#{e}"
        if key not in seen:
            seen.add(key)
            out.append((e, v))
        if len(out) >= n:
            break
    return out


def _context_html(tok_texts: list[str], acts: np.ndarray, is_image: np.ndarray, top: int, vmax: float) -> str:
    parts, in_image = [], False
    for k, (t, a) in enumerate(zip(tok_texts, acts)):
        if is_image[k]:
            if not in_image:
                parts.append("<span class='img'>[image]</span>")
            in_image = True
            continue
        in_image = False
        alpha = 0.0 if not (a > 0 and vmax > 0) else min(1.0, float(a) / vmax) * 0.75
        cls = " class='top'" if k == top else ""
        text = html.escape(t.replace("\n", "⏎"))
        parts.append(f"<span{cls} style='background: rgba(123,44,191,{alpha:.2f})' title='{float(a):.3g}'>{text}</span>")
    return "".join(parts)


def _latent_section(j: int, why: str, rec: dict, top: TopActivations, tokens: StoreTokens | None, figdir: Path,
                    fig_rel: str, cfg: SAEAnalyzeConfig, by_id: dict[int, dict], acts: dict[int, tuple[np.ndarray, np.ndarray]],
                    col: int) -> str:
    """One latent: tags, its top images as heatmaps (one PNG), its top text contexts."""
    from sightline.data import load_image
    from sightline.report.sae import plot_feature_images

    share = rec["image_share"][j]
    cls = ("dead" if np.isnan(share) else "image-only" if share >= 1 - cfg.share_threshold
           else "text-only" if share <= cfg.share_threshold else "shared")
    tags = [why, cls, f"image share {fmt(float(share), 3)}", f"fires on {100 * rec['freq_image'][j]:.2g}% of image "
            f"tokens, {100 * rec['freq_text'][j]:.2g}% of text tokens"]
    parts = [f"<h3 id='latent{j}'>latent {j}</h3><p>" + "".join(f"<span class='tag'>{html.escape(t)}</span>" for t in tags) + "</p>"]
    imgs = _unique_images(top.images(j), by_id, cfg.top_images)
    if imgs:
        pics, heats, titles = [], [], []
        for ex_id, v in imgs:
            ex = by_id[ex_id]
            a, idx = acts[ex_id]
            hm = latent_heatmap(ex, a[:, col], idx)
            if hm is None or not ex.get("path"):
                continue
            try:
                pics.append(np.asarray(load_image(ex["path"])))
            except UserError:
                continue
            heats.append(hm[0])
            titles.append(f"ex {ex_id}: {v:.3g}")
        if pics:
            name = f"latent_{j:06d}.png"
            plot_feature_images(pics, heats, figdir / name, vmax=max(v for _, v in imgs))
            parts.append(f"<p><img src='{fig_rel}/{name}' alt='top images of latent {j}'><br><span class='note'>"
                         f"max activation per image, left to right: {html.escape(', '.join(titles))}</span></p>")
    else:
        parts.append("<p class='note'>no image token activates it</p>")
    texts = top.texts(j)
    if texts and tokens is not None:
        vmax = max(v for _, _, v in texts)
        for ex_id, pos, v in texts:
            ids = tokens.ids(ex_id)
            lo, hi = max(0, pos - cfg.context), min(len(ids), pos + 3)
            a, idx = acts[ex_id]
            act_s = np.zeros(len(ids), np.float32)
            act_s[idx["position"]] = a[:, col]
            modality = np.full(len(ids), 0)
            modality[idx["position"]] = idx["modality"]
            is_img = np.isin(modality, IMAGE_CODES) | (ids == tokens.image_token_id)
            ctx = _context_html(tokens.token_texts(ids[lo:hi]), act_s[lo:hi], is_img[lo:hi], pos - lo, vmax)
            parts.append(f"<div class='ctx'><span class='note'>{v:.3g} (ex {ex_id})</span>  {ctx}</div>")
    elif texts:
        parts.append("<p class='note'>top text tokens at " + ", ".join(f"ex {e} pos {p} ({v:.3g})" for e, p, v in texts)
                     + " (no tokenizer to show them)</p>")
    else:
        parts.append("<p class='note'>no text token activates it</p>")
    return "\n".join(parts)


def _share_of(share: float | None, n: int) -> str:
    """'3 of 16 (0.19)' for a share of n items: a sentence never shows a bare fraction as a count."""
    if share is None or np.isnan(share):
        return f"none of {n}"
    return f"{round(share * n)} of {n} ({share:.2f})"


def _write_sae_page(folder: Path, figdir: Path, sae, store, site: str, rec: dict, top: TopActivations,
                    tokens: StoreTokens | None, cfg: SAEAnalyzeConfig) -> None:
    """OUT/<name>/features.html: one SAE's reconstruction, modality split, concepts and chosen latents; its
    figures go to OUT/figures/<name>/."""
    from sightline.report.html import Section, frac_count, table, write_page
    from sightline.report.sae import plot_modality_hist

    fig_rel = f"../figures/{figdir.name}"
    plot_modality_hist(rec["image_share"], figdir / "modality_hist.png", cfg.share_threshold,
                       title=f"{site}: image share of live latents")
    m = rec["metrics"]
    rows = [[g, m[g]["n_tokens"], m[g]["mse"], m[g]["fvu"], m[g]["l0"], frac_count(m[g]["frac_dead"], m[g]["n_dead"]),
             frac_count(m[g]["frac_dense"], m[g]["n_dense"])] for g in ("image", "text", "special", "all")]
    s = rec["sharing"]
    lr = rec.get("loss_recovered") or {}
    conc = rec["concepts"]
    recon = Section("Reconstruction by modality", tables=[
        ("", ["tokens", "n", "MSE", "FVU", "L0", "dead (count)", f"dense (>{cfg.dense_threshold:g}) (count)"], rows)])
    if lr:
        recon.tables.append(("", ["answer NLL", "clean", "SAE at image positions", "zero at image positions",
                                  "loss recovered", "answer tokens"],
                             [["", lr.get("nll_clean"), lr.get("nll_sae"), lr.get("nll_zero"),
                               lr.get("loss_recovered"), lr.get("n_answer_tokens")]]))
    elif rec.get("loss_note"):
        recon.html = f"<p class='note'>{html.escape(rec['loss_note'])}</p>"
    ta = rec.get("task_accuracy")
    if ta:
        recon.tables.append((f"answer accuracy, {ta['scoring']} scoring ({ta['n_answers_changed_by_sae']} of "
                             f"{ta['n_questions']} answers changed by the SAE)", TASK_HEADER, task_rows(ta)))
    elif rec.get("task_note"):
        recon.html += f"<p class='note'>{html.escape(rec['task_note'])}</p>"
    sections = [recon, Section(
        "Modality",
        f"{s['n_alive']} live latents: {fmt(s['image_only'], 3)} image-only, {fmt(s['text_only'], 3)} text-only, "
        f"{fmt(s['shared'], 3)} shared (image share of per-token activation mass outside "
        f"[{s['threshold']:g}, {1 - s['threshold']:g}] is single-modality).",
        images=[(f"{fig_rel}/modality_hist.png", "image share of live latents")])]
    probing = conc.get("probing")
    if probing:
        prow = [[n, r.get("latent"), r.get("auroc_train"), r.get("auroc_test"), r.get("n_pos_test")]
                for n, r in probing["per_label"].items()]
        sec = Section("Concepts",
                      f"Sparse probing: the best single latent per concept chosen on half of the images, scored on "
                      f"the other half; {_share_of(probing['coverage'], len(probing['per_label']))} concepts reach "
                      f"AUROC >= {probing['threshold']:g}.",
                      tables=[("", ["concept", "latent", "AUROC (choose)", "AUROC (held out)", "positives held out"],
                               prow)])
        pc = conc.get("per_concept") or {}
        if pc:
            crow = [[n, r.get("latent"), r.get("auroc_image"), r.get("auroc_text"), r.get("n_word_tokens"),
                     r.get("image_share")] for n, r in pc.items()]
            sec.html = (f"<p>Cross-modal: the latent that best fires both on images showing the concept and on its "
                        f"word (max of min(AUROC image, AUROC text)); {len(conc.get('cross_modal', []))} concepts "
                        f"have one with both &ge; {conc.get('threshold', cfg.concept_auroc):g}.</p>"
                        + table(["concept", "latent", "AUROC image", "AUROC word token", "word tokens",
                                 "image share"], crow))
        sections.append(sec)
    chosen = choose_latents(rec["image_share"], rec["freq_all"], conc, cfg.n_features, cfg.features, cfg.share_threshold)
    by_id = {e["example"]: e for e in store.examples}
    latents = [j for j, _ in chosen]
    needed = [e for j in latents for e, _ in _unique_images(top.images(j), by_id, cfg.top_images)]
    needed += [e for j in latents for e, _, _ in top.texts(j)]
    acts = encode_examples(sae, store, site, needed, latents) if latents else {}
    body = ["<p>" + " ".join(f"<a href='#latent{j}'>{j}</a>" for j, _ in chosen) + "</p>"]
    body += [_latent_section(j, why, rec, top, tokens, figdir, fig_rel, cfg, by_id, acts, col)
             for col, (j, why) in enumerate(chosen)]
    sections.append(Section(
        "Latents", "Top images: each original image lit by the latent's activation at its image tokens (bright "
        "where it fires, dimmed where it does not). Top text: the tokens before each top-activating text token, "
        "shaded by the latent's activation (the top token outlined).", html="\n".join(body)))
    if rec["quality"]["flagged"]:
        sections.insert(0, Section("Warning", "This SAE looks untrained: " + "; ".join(rec["quality"]["reasons"])
                                   + ". Its latents and modality split say little."))
    title = f"SAE at {site}" if rec["name"] == site else f"SAE {rec['name']} (at {site})"
    write_page(folder / "features.html", title, json.dumps(to_jsonable(rec["sae_cfg"])), sections,
               nav=[("../index.html", "all SAEs")], toc=False)


TASK_HEADER = ["question type", "questions", "clean", "SAE spliced in", "zero at image positions", "chance",
               "majority answer"]


def task_rows(ta: dict) -> list[list]:
    """Table rows of a task-accuracy record: per question type (then all) n, clean, SAE, zero, chance, majority."""
    return [[q, r["n"], r["clean"], r["sae"], r["zero"], r["chance"] if r["chance"] is not None else "n/a",
             r["majority"]] for q, r in ta["per_qtype"].items()]


def _accuracy_text(all_row: dict) -> str:
    if not all_row or all_row.get("sae") is None:
        return "n/a"
    return f"{all_row['sae']:.3f} ({all_row['clean']:.3f}, {all_row['zero']:.3f})"


def _write_index(tmp: Path, results: list[dict], curve: list[dict], cfg: SAEAnalyzeConfig) -> None:
    """OUT/index.html: what the analysis found, one row per SAE (linked to its feature page), the figures."""
    from sightline.report.html import Link, Section, figure_images, frac_count, loss_recovered_text, write_page

    rows = []
    for r in results:
        m, s, lr = r["metrics"], r["sharing"], r.get("loss_recovered") or {}
        cov = ((r["concepts"].get("probing") or {}).get("coverage"))
        ta = ((r.get("task_accuracy") or {}).get("per_qtype") or {}).get("all") or {}
        rows.append([Link(f"{r['name']}/features.html", r["name"] + (" (untrained?)" if r["quality"]["flagged"] else "")),
                     m["image"]["fvu"], m["text"]["fvu"], m["image"]["l0"], m["text"]["l0"],
                     frac_count(m["all"]["frac_dead"], m["all"]["n_dead"]),
                     loss_recovered_text(lr.get("loss_recovered"), lr.get("note") or r.get("loss_note")),
                     _accuracy_text(ta),
                     s["image_only"], s["text_only"], s["shared"], cov,
                     len(r["concepts"].get("cross_modal", []))])
    header = ["SAE", "FVU image", "FVU text", "L0 image", "L0 text", "dead (count)", "loss recovered",
              "accuracy spliced (clean, zero)", "image-only",
              "text-only", "shared", "probe coverage", "cross-modal concepts"]
    if curve:
        lo, hi = curve[0], curve[-1]
        found = (f"Shared latents (image share of activation mass in ({cfg.share_threshold:g}, "
                 f"{1 - cfg.share_threshold:g})) go from {fmt(lo['shared'], 3)} of live latents at layer {lo['layer']} "
                 f"to {fmt(hi['shared'], 3)} at layer {hi['layer']}.")
    else:
        r = results[0]
        found = (f"At {r['site']}, {fmt(r['sharing']['shared'], 3)} of live latents are shared between image and "
                 f"text, {fmt(r['sharing']['image_only'], 3)} image-only, {fmt(r['sharing']['text_only'], 3)} "
                 "text-only.")
    found = f"{len(results)} SAE(s) over store {cfg.store}. " + found
    flagged = [r for r in results if r["quality"]["flagged"]]
    warn = [Section("Warnings", html="".join(
        f"<p><b>Warning:</b> SAE {html.escape(r['name'])} looks untrained: "
        f"{html.escape('; '.join(r['quality']['reasons']))}.</p>" for r in flagged))] if flagged else []
    head = Section("What this run found", found, tables=[("per SAE (each links to its feature page)", header, rows)],
                   images=[("figures/shared_by_layer.png", "shared fraction of live latents by layer")] if curve else [])
    write_page(tmp / "index.html", "SAE analysis", f"store {cfg.store}", [
        *warn, head, Section("Figures", images=figure_images(tmp)),
        Section("Files", links=[("results.json", "results.json"), ("config.json", "config.json")])])


# ------------------------------------------------------------------------------------------- job
def _loss_items(cfg: SAEAnalyzeConfig, store) -> tuple[list, str | None]:
    if cfg.data:
        return answer_items(cfg.data, cfg.n_loss), None
    run = (store.manifest.get("config") or {})
    if run.get("raw_prompt"):
        return [], "loss recovered skipped: the store was extracted with a raw prompt; pass --data (a JSONL of image, prompt, label)"
    items = [(e["path"], e["prompt"], e["label"]) for e in store.examples if e.get("prompt") and e.get("label")]
    if not items:
        return [], "loss recovered skipped: the store's examples have no question and answer; pass --data"
    return items[: cfg.n_loss], None


def _task_items(cfg: SAEAnalyzeConfig, store) -> tuple[list, str | None]:
    if cfg.n_task < 1:
        raise UserError(f"--n-task must be at least 1, not {cfg.n_task}")
    if not cfg.data and (store.manifest.get("config") or {}).get("raw_prompt"):
        return [], ("task accuracy skipped: the store was extracted with a raw prompt; pass --data (a JSONL of "
                    "image, prompt, label)")
    items = task_items(cfg.data or None, None if cfg.data else store, cfg.n_task, cfg.task_qtypes)
    if not items:
        return [], "task accuracy skipped: no example has a question and an answer; pass --data"
    return items, None


def analyze_saes(saes: list, store, cfg: SAEAnalyzeConfig, adapter=None, tokenizer=None,
                 training: list[dict | None] | None = None) -> RunResult:
    """Analyse loaded SAEs over an open store (see the module docstring); writes the run folder cfg.out
    (docs/outputs.md), whole or not at all. `training`: per SAE what its training run said (`training_record`),
    or None; an SAE too briefly trained, or measured as untrained, is flagged (`quality_flags`)."""
    from sightline.report.files import save_safetensors as save_file  # mode like every other file

    from sightline.report.sae import plot_shared_by_layer

    if not 0 <= cfg.share_threshold < 0.5:
        raise UserError(f"share threshold must be in [0, 0.5), got {cfg.share_threshold}")
    sites = [check_sae_store(s, store) for s in saes]
    for sae, site in zip(saes, sites):
        bad = [j for j in cfg.features if not 0 <= int(j) < sae.W_dec.shape[0]]
        if bad:
            raise UserError(f"latent {bad[0]} is out of range for the SAE at {site} (0..{sae.W_dec.shape[0] - 1}); "
                            "pass latents that exist")
    out = check_output(Path(cfg.out).expanduser(), cfg.overwrite, UserError)
    t0 = time.time()
    names, concepts = example_concepts(store, cfg.concepts)
    if tokenizer is None:
        tokenizer = load_tokenizer(store, cfg.model, adapter)
    tokens = StoreTokens(store, tokenizer) if tokenizer is not None else None
    items, loss_note = ([], "loss recovered not asked for") if not cfg.loss else _loss_items(cfg, store)
    tasks, task_note = ([], "task accuracy not asked for") if not cfg.tasks else _task_items(cfg, store)
    if (items or tasks) and adapter is None:
        from sightline.models import load_model

        model = cfg.model or ((store.manifest.get("config") or {}).get("model"))
        if not model:
            raise UserError(f"store {store.path} does not name its model; pass --model for loss recovered and task "
                            "accuracy (or --no-loss --no-tasks)")
        dev, dtype = resolve_placement(cfg.device, cfg.model_dtype)
        adapter = load_model(model, dtype=dtype, device=dev, progress=cfg.progress)
        if tokens is None:
            tokens = StoreTokens(store, adapter.tokenizer)

    results: list[dict[str, Any]] = []
    taken: set[str] = set()
    labels = sae_labels(saes, sites)
    training = list(training) if training is not None else [None] * len(saes)
    warnings: list[str] = []
    clean_nll: tuple[float, int] | None = None
    task_clean = None  # answers without an edit: once per run
    task_zero: dict[str, tuple] = {}  # answers with zeros at a site's image positions: once per site
    with RunFolder(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(cfg))
        for sae, site, label, trained in zip(saes, sites, labels, training):
            name = _name_of(label, taken)
            folder = tmp / name
            folder.mkdir()
            figdir = tmp / "figures" / name
            figdir.mkdir()
            p = run_pass(sae, store, site, cfg, names, concepts, tokens)
            share = p.modality.image_share()
            freq = p.recon.frequencies()
            rec: dict[str, Any] = {
                "name": name, "site": site, "sae_cfg": _sae_cfg(sae),
                "metrics": p.recon.result(cfg.dense_threshold),
                "sharing": sharing(share, cfg.share_threshold),
                "image_share": share, "freq_image": freq["image"], "freq_text": freq["text"], "freq_all": freq["all"],
                "concepts": (p.concepts.results(cfg.concept_auroc, share) if p.concepts is not None
                             else {"concepts": [], "probing": None, "cross_modal": []}),
            }
            try:
                from sightline.capture.sites import Site

                rec["layer"] = Site.parse(site).layer
            except (UserError, ValueError):
                rec["layer"] = None
            rec["series"] = name[len(site) + 1:] if name.startswith(site + "-") else ""
            flags = quality_flags(rec, rec["sae_cfg"].get("modality"), trained, cfg.max_fvu, cfg.max_dead_frac)
            rec["quality"] = {"flagged": bool(flags), "reasons": flags, "training": trained}
            if flags:
                warnings.append(f"SAE {name} looks untrained: {'; '.join(flags)}; its latents and modality split "
                                "say little (train longer: see `sae train --min-steps`)")
            if items:
                if clean_nll is None:  # the clean pass does not depend on the SAE: once per run
                    clean_nll = answer_nll(adapter, items, None, cfg.loss_batch_size, cfg.progress,
                                           desc="answer nll (clean)")
                rec["loss_recovered"] = loss_recovered(adapter, sae, items, site, cfg.loss_batch_size, cfg.progress,
                                                       clean=clean_nll)
            else:
                rec["loss_note"] = loss_note
            if tasks:
                kw = dict(batch_size=cfg.loss_batch_size, max_new_tokens=cfg.max_new_tokens, progress=cfg.progress)
                if task_clean is None:
                    task_clean = task_answers(adapter, tasks, desc="tasks (clean)", **kw)
                if site not in task_zero:
                    task_zero[site] = task_answers(adapter, tasks, torch.zeros_like, site, desc="tasks (zero)", **kw)
                rec["task_accuracy"] = task_accuracy(adapter, sae, tasks, site, clean=task_clean,
                                                     zero=task_zero[site], **kw)
            else:
                rec["task_note"] = task_note
            mean = p.modality.mean_activation()
            save_file({"image_share": torch.as_tensor(share, dtype=torch.float32),
                       "freq_image": torch.as_tensor(freq["image"], dtype=torch.float32),
                       "freq_text": torch.as_tensor(freq["text"], dtype=torch.float32),
                       "mean_image": torch.as_tensor(mean["image"], dtype=torch.float32),
                       "mean_text": torch.as_tensor(mean["text"], dtype=torch.float32)},
                      str(folder / "latents.safetensors"))
            _write_sae_page(folder, figdir, sae, store, site, rec, p.top, tokens, cfg)
            results.append(rec)
        curve = shared_by_layer([{"site": r["site"], "sharing": r["sharing"], "name": r["name"], "series": r["series"]}
                                 for r in results if r.get("layer") is not None and r["sharing"]["n_alive"]])
        if curve:
            plot_shared_by_layer(curve, tmp / "figures" / "shared_by_layer.png")
        summary = to_jsonable({
            "out": str(out),
            "html": str(out / "index.html"),
            "seconds": round(time.time() - t0, 2),
            "shared_by_layer": curve,
            "saes": [{
                "name": r["name"], "site": r["site"], "layer": r["layer"],
                "fvu_image": r["metrics"]["image"]["fvu"], "fvu_text": r["metrics"]["text"]["fvu"],
                "l0_image": r["metrics"]["image"]["l0"], "l0_text": r["metrics"]["text"]["l0"],
                "frac_dead": r["metrics"]["all"]["frac_dead"],
                "loss_recovered": (r.get("loss_recovered") or {}).get("loss_recovered"),
                "task_accuracy": {q: {k: v[k] for k in ("n", "clean", "sae", "zero", "chance")}
                                  for q, v in ((r.get("task_accuracy") or {}).get("per_qtype") or {}).items()} or None,
                "image_only": r["sharing"]["image_only"], "text_only": r["sharing"]["text_only"],
                "shared": r["sharing"]["shared"],
                "probe_coverage": (r["concepts"].get("probing") or {}).get("coverage"),
                "cross_modal_concepts": [c["concept"] for c in r["concepts"].get("cross_modal", [])],
                "flagged": r["quality"]["flagged"], "flags": r["quality"]["reasons"],
            } for r in results],
            "warnings": warnings,
        })
        write_json(tmp / "results.json", {
            "summary": summary,
            "metrics": {"store": str(store.path), "saes": {
                r["name"]: {"site": r["site"], "layer": r["layer"], "sae": r["sae_cfg"],
                            "reconstruction": r["metrics"], "loss_recovered": r.get("loss_recovered"),
                            "task_accuracy": r.get("task_accuracy"), "task_note": r.get("task_note"),
                            "quality": r["quality"],
                            "loss_note": r.get("loss_note"), "definitions": "see sightline.sae.metrics"}
                for r in results}},
            "modality": {
                "share_threshold": cfg.share_threshold,
                "reading": "image share = mean activation per image token / (that + mean per text token); "
                           "image-only >= 1 - t, text-only <= t, shared between; dead latents left out "
                           "(see sightline.sae.modality)",
                "shared_by_layer": curve,
                "saes": {r["name"]: {"site": r["site"], "layer": r["layer"], "sharing": r["sharing"],
                                     "concepts": r["concepts"]} for r in results}},
        })
        _write_index(tmp, results, curve, cfg)
    return RunResult(out, summary)


def analyze_sae(config: SAEAnalyzeConfig, adapter=None) -> dict[str, Any]:
    """Load the SAEs and the store named by the config and analyse them (see the module docstring).
    `adapter`: the store's model already loaded (for loss recovered); None loads it when needed."""
    from sightline.sae.models import SAE
    from sightline.store import ActivationStore

    folders = find_sae_folders(config.saes)
    store = ActivationStore.open(config.store)
    dev = resolve_device(config.device)
    saes = [SAE.from_pretrained(str(f)).to(dev).eval() for f in folders]
    return analyze_saes(saes, store, config, adapter=adapter, training=[training_record(f) for f in folders])
