"""The SAE analysis job: SAEs + an ActivationStore (image and text tokens) -> metrics by modality, loss recovered,
the modality split and its curve across layers, concept latents, and a static HTML page of latents.

One streamed pass over the store per SAE feeds every accumulator (reconstruction, modality mass, top
activations, concept scores), so memory does not grow with the store. Output (written under a
temporary name, then renamed into place):

    out/config.json            the SAEAnalyzeConfig it ran with
    out/metrics.json           per SAE: reconstruction metrics by modality, loss recovered
    out/modality.json          per SAE: sharing fractions, concept probing, cross-modal latents;
                               the shared-fraction curve across layers
    out/shared_by_layer.png    the curve (the Line of Sight headline figure)
    out/index.html             overview, links to each SAE's page
    out/<site>/features.html   latents: top images as heatmaps over the originals, top text contexts
    out/<site>/*.png, out/<site>/latents.safetensors (per-latent image share, frequencies, mean activations)
"""

from __future__ import annotations

import html
import json
import math
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.errors import UserError
from sightline.sae.features import (
    IMAGE,
    StoreTokens,
    TopActivations,
    check_sae_store,
    iter_latents,
    latent_heatmap,
    load_tokenizer,
    per_example_max,
)
from sightline.sae.metrics import DENSE_THRESHOLD, ReconStats, answer_items, loss_recovered
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
class SAEAnalyzeConfig:
    """Everything an SAE analysis depends on (saved as out/config.json)."""

    saes: tuple[str, ...]  # SAE folders (cfg.json + sae_weights.safetensors) or folders of them
    store: str  # ActivationStore holding the SAEs' sites, ideally extracted with positions "all"
    out: str = "sae-analysis"
    # loss recovered: the model, and (image, question, answer) items from `data` (a JSONL of image,
    # prompt, label) or, when data is None, from the store's own examples with a prompt and a label
    loss: bool = True
    model: str | None = None  # None: the model the store was extracted from
    data: str | None = None
    n_loss: int = 64  # sequences scored for loss recovered
    loss_batch_size: int = 8
    model_dtype: str = "auto"  # auto: bfloat16 on GPU, float32 on CPU
    device: str = "auto"
    batch_size: int = 4096  # stored tokens per SAE batch
    share_threshold: float = SHARE_THRESHOLD
    dense_threshold: float = DENSE_THRESHOLD
    concepts: str = "auto"  # auto | facts | label | none (see sightline.sae.modality)
    concept_auroc: float = CONCEPT_AUROC
    max_probe_images: int = 4096
    n_features: int = 24  # latents on each HTML page (concept latents first, then a mix)
    features: tuple[int, ...] = ()  # latents always shown
    top_images: int = 6
    top_texts: int = 8
    context: int = 10  # text tokens shown before a top text token
    overwrite: bool = False
    progress: bool = True

    def to_dict(self) -> dict:
        d = asdict(self)
        d["saes"], d["features"] = list(self.saes), list(self.features)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SAEAnalyzeConfig:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["saes"] = tuple(d.get("saes", ()))
        d["features"] = tuple(d.get("features", ()))
        return cls(**d)


# ------------------------------------------------------------------------------------------ helpers
def _clean(v: Any) -> Any:
    """JSON-safe: NaN/inf -> None, numpy -> Python, dataclasses -> dicts."""
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, np.ndarray):
        return _clean(v.tolist())
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        return None if not math.isfinite(float(v)) else float(v)
    if is_dataclass(v) and not isinstance(v, type):
        return _clean(asdict(v))
    return v


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(_clean(data), indent=2) + "\n", encoding="utf-8")


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


def _device(device: str) -> str:
    from sightline.extract import _resolve_device

    return _resolve_device(device)


def _sae_cfg(sae) -> dict:
    cfg = getattr(sae, "cfg", None)
    if cfg is None:
        return {}
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return asdict(cfg) if is_dataclass(cfg) else dict(vars(cfg))


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
PAGE_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1150px;
       padding: 0 1em; color: #1d2330; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { margin-top: 1.8em; border-bottom: 1px solid #d6dae3; }
h3 { margin: 1.6em 0 .3em; } .sub, .note { color: #5b6478; } .tag { background: #eef0f6; border-radius: 3px;
       padding: 0 .4em; margin-right: .4em; font-size: .9em; }
table { border-collapse: collapse; margin: .6em 0; } td, th { padding: .2em .7em; border-bottom: 1px solid #e5e8ef;
       text-align: right; font-variant-numeric: tabular-nums; } th { background: #f4f6fa; } td:first-child,
th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #e5e8ef; }
.ctx { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12.5px; white-space: pre-wrap;
       margin: .15em 0; } .ctx .top { outline: 1.5px solid #7b2cbf; } .ctx .img { color: #8a91a3; }
"""


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return "–" if not math.isfinite(v) else f"{v:.{digits}g}"
    return html.escape(str(v))


def _table(header, rows) -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    b = "".join("<tr>" + "".join(f"<td>{_fmt(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{h}</tr>{b}</table>"


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


def _latent_section(j: int, why: str, rec: dict, top: TopActivations, tokens: StoreTokens | None, folder: Path,
                    cfg: SAEAnalyzeConfig, by_id: dict[int, dict], acts: dict[int, tuple[np.ndarray, np.ndarray]],
                    col: int) -> str:
    """One latent: tags, its top images as heatmaps (one PNG), its top text contexts."""
    from sightline.data import load_image
    from sightline.report.sae import plot_feature_images

    share = rec["image_share"][j]
    cls = ("dead" if np.isnan(share) else "image-only" if share >= 1 - cfg.share_threshold
           else "text-only" if share <= cfg.share_threshold else "shared")
    tags = [why, cls, f"image share {_fmt(float(share), 3)}", f"fires on {100 * rec['freq_image'][j]:.2g}% of image "
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
            plot_feature_images(pics, heats, folder / name, vmax=max(v for _, v in imgs))
            parts.append(f"<p><img src='{name}' alt='top images of latent {j}'><br><span class='note'>"
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
            is_img = np.isin(modality, (IMAGE, 2)) | (ids == tokens.image_token_id)
            ctx = _context_html(tokens.token_texts(ids[lo:hi]), act_s[lo:hi], is_img[lo:hi], pos - lo, vmax)
            parts.append(f"<div class='ctx'><span class='note'>{v:.3g} (ex {ex_id})</span>  {ctx}</div>")
    elif texts:
        parts.append("<p class='note'>top text tokens at " + ", ".join(f"ex {e} pos {p} ({v:.3g})" for e, p, v in texts)
                     + " (no tokenizer to show them)</p>")
    else:
        parts.append("<p class='note'>no text token activates it</p>")
    return "\n".join(parts)


def _write_sae_page(folder: Path, name: str, sae, store, site: str, rec: dict, top: TopActivations,
                    tokens: StoreTokens | None, cfg: SAEAnalyzeConfig) -> None:
    from sightline.report.sae import plot_modality_hist

    plot_modality_hist(rec["image_share"], folder / "modality_hist.png", cfg.share_threshold,
                       title=f"{site}: image share of live latents")
    m = rec["metrics"]
    rows = [[g, m[g]["n_tokens"], m[g]["mse"], m[g]["fvu"], m[g]["l0"], m[g]["n_dead"], m[g]["n_dense"]]
            for g in ("image", "text", "special", "all")]
    s = rec["sharing"]
    lr = rec.get("loss_recovered") or {}
    conc = rec["concepts"]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>SAE {html.escape(site)}</title>",
             f"<style>{PAGE_CSS}</style></head><body>",
             f"<h1>SAE at {html.escape(site)}</h1><p class='sub'>{html.escape(json.dumps(_clean(rec['sae_cfg'])))}</p>",
             "<p><a href='../index.html'>all SAEs</a></p>",
             "<h2>Reconstruction by modality</h2>",
             _table(["tokens", "n", "MSE", "FVU", "L0", "dead", f"dense (>{cfg.dense_threshold:g})"], rows)]
    if lr:
        parts.append(_table(["answer NLL", "clean", "SAE at image positions", "zero at image positions",
                             "loss recovered", "answer tokens"],
                            [["", lr.get("nll_clean"), lr.get("nll_sae"), lr.get("nll_zero"), lr.get("loss_recovered"),
                              lr.get("n_answer_tokens")]]))
    elif rec.get("loss_note"):
        parts.append(f"<p class='note'>{html.escape(rec['loss_note'])}</p>")
    parts += ["<h2>Modality</h2>",
              f"<p>{s['n_alive']} live latents: {_fmt(s['image_only'], 3)} image-only, {_fmt(s['text_only'], 3)} "
              f"text-only, {_fmt(s['shared'], 3)} shared (image share of per-token activation mass outside "
              f"[{s['threshold']:g}, {1 - s['threshold']:g}] is single-modality).</p>",
              "<p><img src='modality_hist.png' alt='image share histogram'></p>"]
    probing = conc.get("probing")
    if probing:
        prow = [[n, r.get("latent"), r.get("auroc_train"), r.get("auroc_test"), r.get("n_pos_test")]
                for n, r in probing["per_label"].items()]
        parts += ["<h2>Concepts</h2>",
                  f"<p>Sparse probing: the best single latent per concept chosen on half of the images, scored on "
                  f"the other half; {_fmt(probing['coverage'], 3)} of concepts reach AUROC &ge; "
                  f"{probing['threshold']:g}.</p>",
                  _table(["concept", "latent", "AUROC (choose)", "AUROC (held out)", "positives held out"], prow)]
        pc = conc.get("per_concept") or {}
        if pc:
            crow = [[n, r.get("latent"), r.get("auroc_image"), r.get("auroc_text"), r.get("n_word_tokens"),
                     r.get("image_share")] for n, r in pc.items()]
            parts += [f"<p>Cross-modal: the latent that best fires both on images showing the concept and on its "
                      f"word (max of min(AUROC image, AUROC text)); {len(conc.get('cross_modal', []))} concepts have "
                      f"one with both &ge; {conc.get('threshold', cfg.concept_auroc):g}.</p>",
                      _table(["concept", "latent", "AUROC image", "AUROC word token", "word tokens", "image share"],
                             crow)]
    parts.append("<h2>Latents</h2><p class='note'>Top images: each original image lit by the latent's activation "
                 "at its image tokens (bright where it fires, dimmed where it does not). Top text: the tokens before each top-activating text token, shaded by "
                 "the latent's activation (the top token outlined).</p>")
    chosen = choose_latents(rec["image_share"], rec["freq_all"], conc, cfg.n_features, cfg.features, cfg.share_threshold)
    parts.append("<p>" + " ".join(f"<a href='#latent{j}'>{j}</a>" for j, _ in chosen) + "</p>")
    by_id = {e["example"]: e for e in store.examples}
    latents = [j for j, _ in chosen]
    needed = [e for j in latents for e, _ in _unique_images(top.images(j), by_id, cfg.top_images)]
    needed += [e for j in latents for e, _, _ in top.texts(j)]
    acts = encode_examples(sae, store, site, needed, latents) if latents else {}
    for col, (j, why) in enumerate(chosen):
        parts.append(_latent_section(j, why, rec, top, tokens, folder, cfg, by_id, acts, col))
    parts.append("</body></html>")
    (folder / "features.html").write_text("\n".join(parts), encoding="utf-8")


def _write_index(tmp: Path, results: list[dict], curve: list[dict], cfg: SAEAnalyzeConfig) -> None:
    rows = []
    for r in results:
        m, s, lr = r["metrics"], r["sharing"], r.get("loss_recovered") or {}
        cov = ((r["concepts"].get("probing") or {}).get("coverage"))
        rows.append([f"<a href='{html.escape(r['name'])}/features.html'>{html.escape(r['site'])}</a>",
                     m["image"]["fvu"], m["text"]["fvu"], m["image"]["l0"], m["text"]["l0"], m["all"]["n_dead"],
                     lr.get("loss_recovered"), s["image_only"], s["text_only"], s["shared"], cov,
                     len(r["concepts"].get("cross_modal", []))])
    header = ["SAE", "FVU image", "FVU text", "L0 image", "L0 text", "dead", "loss recovered", "image-only",
              "text-only", "shared", "probe coverage", "cross-modal concepts"]
    h = "".join(f"<th>{html.escape(c)}</th>" for c in header)
    b = "".join("<tr>" + "".join(f"<td>{c if isinstance(c, str) and c.startswith('<a') else _fmt(c, 3)}</td>"
                                 for c in row) + "</tr>" for row in rows)
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>SAE analysis</title><style>{PAGE_CSS}</style>",
            "</head><body><h1>SAE analysis</h1>",
            f"<p class='sub'>store {html.escape(str(cfg.store))}; shared: a latent's image share of per-token "
            f"activation mass in ({cfg.share_threshold:g}, {1 - cfg.share_threshold:g})</p>",
            f"<table><tr>{h}</tr>{b}</table>"]
    if curve:
        page.append("<h2>Shared latents by layer</h2><p><img src='shared_by_layer.png' alt='shared fraction by layer'></p>")
    page.append("</body></html>")
    (tmp / "index.html").write_text("\n".join(page), encoding="utf-8")


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


def analyze_saes(saes: list, store, cfg: SAEAnalyzeConfig, adapter=None, tokenizer=None) -> dict[str, Any]:
    """Analyse loaded SAEs over an open store (see the module docstring); writes cfg.out atomically."""
    from safetensors.torch import save_file

    from sightline.report.sae import plot_shared_by_layer

    if not 0 <= cfg.share_threshold < 0.5:
        raise UserError(f"share threshold must be in [0, 0.5), got {cfg.share_threshold}")
    sites = [check_sae_store(s, store) for s in saes]
    for sae, site in zip(saes, sites):
        bad = [j for j in cfg.features if not 0 <= int(j) < sae.W_dec.shape[0]]
        if bad:
            raise UserError(f"latent {bad[0]} is out of range for the SAE at {site} (0..{sae.W_dec.shape[0] - 1}); "
                            "pass latents that exist")
    out = Path(cfg.out).expanduser()
    if out.exists() and any(out.iterdir()) and not cfg.overwrite:
        raise UserError(f"output {out} exists and is not empty; pass --overwrite or choose another --out")
    t0 = time.time()
    names, concepts = example_concepts(store, cfg.concepts)
    if tokenizer is None:
        tokenizer = load_tokenizer(store, cfg.model, adapter)
    tokens = StoreTokens(store, tokenizer) if tokenizer is not None else None
    items, loss_note = ([], "loss recovered not asked for") if not cfg.loss else _loss_items(cfg, store)
    if items and adapter is None:
        from sightline.models import load_model

        model = cfg.model or ((store.manifest.get("config") or {}).get("model"))
        if not model:
            raise UserError(f"store {store.path} does not name its model; pass --model for loss recovered (or --no-loss)")
        dev = _device(cfg.device)
        dtype = cfg.model_dtype if cfg.model_dtype != "auto" else ("bfloat16" if dev.startswith("cuda") else "float32")
        adapter = load_model(model, dtype=dtype, device=dev)
        if tokens is None:
            tokens = StoreTokens(store, adapter.tokenizer)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    results: list[dict[str, Any]] = []
    taken: set[str] = set()
    try:
        for sae, site in zip(saes, sites):
            name = _name_of(site, taken)
            folder = tmp / name
            folder.mkdir()
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
            if items:
                rec["loss_recovered"] = loss_recovered(adapter, sae, items, site, cfg.loss_batch_size, cfg.progress)
            else:
                rec["loss_note"] = loss_note
            mean = p.modality.mean_activation()
            save_file({"image_share": torch.as_tensor(share, dtype=torch.float32),
                       "freq_image": torch.as_tensor(freq["image"], dtype=torch.float32),
                       "freq_text": torch.as_tensor(freq["text"], dtype=torch.float32),
                       "mean_image": torch.as_tensor(mean["image"], dtype=torch.float32),
                       "mean_text": torch.as_tensor(mean["text"], dtype=torch.float32)},
                      str(folder / "latents.safetensors"))
            _write_sae_page(folder, name, sae, store, site, rec, p.top, tokens, cfg)
            results.append(rec)
        curve = shared_by_layer([{"site": r["site"], "sharing": r["sharing"]} for r in results
                                 if r.get("layer") is not None and r["sharing"]["n_alive"]])
        if curve:
            plot_shared_by_layer(curve, tmp / "shared_by_layer.png")
        _write_json(tmp / "config.json", cfg.to_dict())
        _write_json(tmp / "metrics.json", {"store": str(store.path), "saes": {
            r["name"]: {"site": r["site"], "layer": r["layer"], "sae": r["sae_cfg"], "reconstruction": r["metrics"],
                        "loss_recovered": r.get("loss_recovered"), "loss_note": r.get("loss_note"),
                        "definitions": "see sightline.sae.metrics"} for r in results}})
        _write_json(tmp / "modality.json", {
            "share_threshold": cfg.share_threshold,
            "reading": "image share = mean activation per image token / (that + mean per text token); image-only >= "
                       "1 - t, text-only <= t, shared between; dead latents left out (see sightline.sae.modality)",
            "shared_by_layer": curve,
            "saes": {r["name"]: {"site": r["site"], "layer": r["layer"], "sharing": r["sharing"],
                                 "concepts": r["concepts"]} for r in results}})
        _write_index(tmp, results, curve, cfg)
        if out.exists():
            old = out.with_name(f"{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _clean({
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
            "image_only": r["sharing"]["image_only"], "text_only": r["sharing"]["text_only"],
            "shared": r["sharing"]["shared"],
            "probe_coverage": (r["concepts"].get("probing") or {}).get("coverage"),
            "cross_modal_concepts": [c["concept"] for c in r["concepts"].get("cross_modal", [])],
        } for r in results],
    })


def analyze_sae(config: SAEAnalyzeConfig) -> dict[str, Any]:
    """Load the SAEs and the store named by the config and analyse them (see the module docstring)."""
    from sightline.sae.models import SAE
    from sightline.store import ActivationStore

    folders = find_sae_folders(config.saes)
    store = ActivationStore.open(config.store)
    dev = _device(config.device)
    saes = [SAE.from_pretrained(str(f)).to(dev).eval() for f in folders]
    return analyze_saes(saes, store, config)
