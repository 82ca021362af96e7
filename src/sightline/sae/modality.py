"""Which modality an SAE's latents read: per-latent image/text split, the fractions of image-only, text-only and
shared latents, their curve across layers, and latents that fire on both an image concept and its word.

The reading of Line of Sight's statistic (the paper's exact one is not public; PAPERS.md):
- a latent's image share = m_img / (m_img + m_txt), where m_img is its mean activation per IMAGE token
  (its activation mass on image and image_newline tokens divided by their count) and m_txt its mean
  activation per TEXT token (special/chat-template tokens left out, as the paper drops them);
  normalising by token counts keeps a 64:20 image:text token ratio from making every latent look visual;
- image-only: share >= 1 - t; text-only: share <= t; shared: t < share < 1 - t, with t = 0.1 by
  default (a shared latent puts at least a tenth of its per-token mass on the other modality); latents
  that never fire on either modality are dead and left out of the fractions;
- the headline curve is the shared fraction per layer (one SAE per `resid.{L}` site).

Concepts (for labelled stores): per image, the set of concept values it shows (the synthetic world's
shapes and colours of its visible objects from the JSONL `facts`, or the example's `label`); a latent
scores an image by its largest activation over the image's tokens, and a text token by its activation
there, the positives being the last token of each occurrence of the concept's word.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from sightline.errors import UserError
from sightline.sae.features import IMAGE_CODES, TEXT, LatentBatch, StoreTokens, per_example_max, word_positions
from sightline.sae.metrics import SparseScores, sparse_probe

SHARE_THRESHOLD = 0.1
CONCEPT_AUROC = 0.9


class ModalityStats:
    """Streaming per-latent activation mass and firing counts on image and on text tokens."""

    GROUPS = {"image": IMAGE_CODES, "text": (TEXT,)}

    def __init__(self, width: int):
        self.width = width
        self.mass = {m: torch.zeros(width, dtype=torch.float64) for m in self.GROUPS}
        self.fires = {m: torch.zeros(width, dtype=torch.float64) for m in self.GROUPS}
        self.n = {m: 0 for m in self.GROUPS}

    def update(self, batch: LatentBatch) -> None:
        """Add one batch."""
        from sightline.sae.metrics import group_onehot

        f = batch.f_nw
        oh = group_onehot(batch.modality, self.GROUPS, f.device)  # [n, 2]
        mass = (oh.T @ f).double().cpu()
        fires = (oh.T @ (f > 0).float()).double().cpu()
        counts = oh.sum(0).long().tolist()
        for k, m in enumerate(self.GROUPS):
            self.mass[m] += mass[k]
            self.fires[m] += fires[k]
            self.n[m] += counts[k]

    def mean_activation(self) -> dict[str, np.ndarray]:
        """Per latent, the mean activation per image token and per text token [width] (NaN without tokens)."""
        return {m: (self.mass[m] / self.n[m]).numpy() if self.n[m] else np.full(self.width, np.nan)
                for m in self.mass}

    def image_share(self) -> np.ndarray:
        """Per latent, m_img / (m_img + m_txt) [width]; NaN for latents firing on neither (or a missing modality)."""
        mean = self.mean_activation()
        tot = mean["image"] + mean["text"]
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(tot > 0, mean["image"] / np.where(tot > 0, tot, 1), np.nan)


def sharing(image_share: np.ndarray, threshold: float = SHARE_THRESHOLD) -> dict[str, Any]:
    """Counts and fractions of image-only, text-only and shared latents among the live ones."""
    if not 0 <= threshold < 0.5:
        raise UserError(f"share threshold must be in [0, 0.5), got {threshold}")
    s = np.asarray(image_share, np.float64)
    alive = ~np.isnan(s)
    n = int(alive.sum())
    img = int((s[alive] >= 1 - threshold).sum())
    txt = int((s[alive] <= threshold).sum())
    shared = n - img - txt
    frac = (lambda k: k / n if n else math.nan)
    return {"threshold": threshold, "n_alive": n, "n_dead": int((~alive).sum()),
            "n_image_only": img, "n_text_only": txt, "n_shared": shared,
            "image_only": frac(img), "text_only": frac(txt), "shared": frac(shared)}


def shared_by_layer(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The headline curve: [{site, layer, shared, image_only, text_only, n_alive}] sorted by layer, from
    entries {site, sharing}; entries that also carry `name` and `series` (which of several SAEs per site, e.g.
    topk-w1024-k32; "" for one SAE per site) keep them, so each series is drawn as its own line."""
    from sightline.capture.sites import Site

    curve = []
    for e in entries:
        layer = Site.parse(e["site"]).layer
        s = e["sharing"]
        curve.append({"site": e["site"], "layer": layer, "shared": s["shared"], "image_only": s["image_only"],
                      "text_only": s["text_only"], "n_alive": s["n_alive"],
                      **{k: e[k] for k in ("name", "series") if k in e}})
    return sorted(curve, key=lambda c: (c["layer"] if c["layer"] is not None else -1, c["site"], c.get("series", "")))


# ---------------------------------------------------------------------------------------- concepts
def example_concepts(store, mode: str = "auto") -> tuple[list[str], dict[int, set[str]]]:
    """(concept names, example id -> the concepts its image shows).

    mode: "facts" (the synthetic world's JSONL `facts`: shapes and colours of visible objects), "label"
    (the example's label), "auto" (facts where present, else label), "none"."""
    if mode not in ("auto", "facts", "label", "none"):
        raise UserError(f"unknown concepts mode {mode!r}: use auto, facts, label or none")
    if mode == "none":
        return [], {}

    def facts_of(ex):
        return ((ex.get("meta") or {}).get("facts") or ex.get("facts") or {}).get("objects")

    has_facts = any(facts_of(ex) for ex in store.examples)
    use = "facts" if mode == "facts" or (mode == "auto" and has_facts) else "label"
    if use == "facts" and not has_facts:
        raise UserError(f"store {store.path} has no synthetic-world facts; extract a manifest written by "
                        "sightline.data.synthetic.export_jsonl, or use concepts 'label'")
    out: dict[int, set[str]] = {}
    if use == "facts":
        from sightline.data.synthetic import COLOURS, SHAPES

        order = list(SHAPES) + list(COLOURS)
        for ex in store.examples:
            objs = facts_of(ex) or []
            out[ex["example"]] = {str(o[a]) for o in objs if (o.get("area") or 0) > 0 for a in ("shape", "colour")}
        seen = set().union(*out.values()) if out else set()
        names = [c for c in order if c in seen] + sorted(seen - set(order))
    else:
        for ex in store.examples:
            if ex.get("label") is not None:
                out[ex["example"]] = {str(ex["label"])}
        names = sorted(set().union(*out.values())) if out else []
        if mode == "label" and not names:
            raise UserError(f"no example of store {store.path} has a label; use concepts 'none'")
    return names, out


class ConceptCollector:
    """Keeps, for up to `max_images` distinct images, each latent's image score (max over the image's
    tokens), and for the text tokens of those examples each latent's activation and which concept word
    the token ends; sparse, so bounded by max_images whatever the store's size."""

    def __init__(self, width: int, names: Sequence[str], concepts: dict[int, set[str]],
                 store, tokens: StoreTokens | None = None, max_images: int = 4096):
        self.names = list(names)
        self.concepts = concepts
        self.max_images = max_images
        self.tokens = tokens
        self.path_of = {e["example"]: e.get("path") for e in store.examples}
        self.image_scores = SparseScores(width)
        self.image_labels: list[np.ndarray] = []
        self.image_examples: list[int] = []
        self._seen_paths: set[str] = set()
        self.text_scores = SparseScores(width)
        self.text_labels: list[np.ndarray] = []  # concept index per text token, -1 for none
        self._variants = [tokens.word_variants(n) for n in self.names] if tokens is not None else []
        self._kept: set[int] = set()

    @property
    def full(self) -> bool:
        return len(self.image_examples) >= self.max_images

    def update(self, batch: LatentBatch, image_max: tuple[torch.Tensor, np.ndarray] | None = None) -> None:
        """Add the batch's examples (labelled ones, while fewer than max_images images are kept)."""
        if self.full or not self.names:
            return
        vals, exs = image_max if image_max is not None else per_example_max(batch.f_nw, batch.index, IMAGE_CODES)
        take = []
        for j, e in enumerate(exs.tolist()):
            if e not in self.concepts or self.full:
                continue
            path = self.path_of.get(e) or f"#{e}"
            self._kept.add(e)
            if path in self._seen_paths:  # the same image again (another question): its image tokens repeat
                continue
            self._seen_paths.add(path)
            take.append(j)
            self.image_examples.append(e)
            self.image_labels.append(np.array([n in self.concepts[e] for n in self.names]))
        if take:
            self.image_scores.add(vals[torch.as_tensor(take, device=vals.device)])
        if self.tokens is None:
            return
        is_txt = (batch.modality == TEXT) & np.isin(batch.index["example"], list(self._kept))
        if not is_txt.any():
            return
        rows = np.flatnonzero(is_txt)
        self.text_scores.add(batch.f_nw.index_select(0, torch.as_tensor(rows, device=batch.f_nw.device)))
        lab = np.full(len(rows), -1, np.int64)
        ex_col, pos_col = batch.index["example"][rows], batch.index["position"][rows]
        for e in np.unique(ex_col):
            ids = self.tokens.ids(int(e))
            sel = np.flatnonzero(ex_col == e)
            where = {int(p): k for k, p in zip(sel, pos_col[sel])}
            for c, variants in enumerate(self._variants):
                for p in word_positions(ids, variants):
                    if int(p) in where:
                        lab[where[int(p)]] = c
        self.text_labels.append(lab)

    def results(self, threshold: float = CONCEPT_AUROC, image_share: np.ndarray | None = None) -> dict[str, Any]:
        """Sparse probing (held-out single-latent AUROC per concept) and cross-modal concept latents."""
        if not self.names or not self.image_examples:
            return {"concepts": [], "probing": None, "cross_modal": [], "n_images": 0}
        y_img = np.stack(self.image_labels)  # [n_images, c]
        n = len(y_img)
        train, test = np.arange(0, n, 2), np.arange(1, n, 2)  # alternate images: a fixed, label-blind split
        probing = sparse_probe(self.image_scores, y_img, train, test, self.names, threshold)
        probing["split"] = "alternate images (even: choose the latent, odd: score it)"
        a_img = self.image_scores.auroc(y_img)  # [w, c] over all kept images
        out = {"concepts": self.names, "probing": probing, "n_images": n, "cross_modal": [], "per_concept": {}}
        if self.tokens is None or not self.text_labels:
            out["note"] = "no tokenizer or no text tokens: cross-modal concept latents not computed"
            return out
        lab = np.concatenate(self.text_labels)
        y_txt = lab[:, None] == np.arange(len(self.names))[None, :]
        a_txt = self.text_scores.auroc(y_txt)  # [w, c]
        out["n_text_tokens"] = int(len(lab))
        for c, name in enumerate(self.names):
            n_word = int(y_txt[:, c].sum())
            if n_word == 0 or np.isnan(a_img[:, c]).all():
                out["per_concept"][name] = {"latent": None, "n_word_tokens": n_word}
                continue
            both = np.minimum(a_img[:, c], a_txt[:, c])
            j = int(np.nanargmax(both))
            rec = {"latent": j, "auroc_image": float(a_img[j, c]), "auroc_text": float(a_txt[j, c]),
                   "n_word_tokens": n_word, "n_images_with": int(y_img[:, c].sum()),
                   "n_latents_both": int(((a_img[:, c] >= threshold) & (a_txt[:, c] >= threshold)).sum()),
                   "image_share": (float(image_share[j]) if image_share is not None and not np.isnan(image_share[j])
                                   else None)}
            out["per_concept"][name] = rec
            if rec["auroc_image"] >= threshold and rec["auroc_text"] >= threshold:
                out["cross_modal"].append({"concept": name, **rec})
        out["threshold"] = threshold
        return out


def modality_split(sae, store, site: str | None = None, batch_size: int = 4096,
                   threshold: float = SHARE_THRESHOLD, progress: bool = False) -> dict[str, Any]:
    """Per-latent image share over a store and the image-only / text-only / shared fractions."""
    from sightline.sae.features import iter_latents

    stats = ModalityStats(sae.W_dec.shape[0])
    for batch in iter_latents(sae, store, site, batch_size, progress, desc="sae modality"):
        stats.update(batch)
    share = stats.image_share()
    return {"image_share": share, "sharing": sharing(share, threshold), "n_tokens": dict(stats.n)}
