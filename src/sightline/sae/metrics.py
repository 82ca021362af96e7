"""How well an SAE reconstructs, split by token modality: MSE, FVU, L0, dead and dense latents, AUROC, and
the loss recovered in the model when its reconstruction replaces the activations at image positions.

Definitions (over the tokens evaluated, per modality group: image = image + image_newline tokens,
text = text tokens, special = chat-template/special tokens, all = every stored token):
- mse: mean over tokens and dimensions of (x - x_hat)^2, in the activations' original units;
- fvu: sum ||x - x_hat||^2 / sum ||x - mean||^2, the mean taken over the group's tokens (dataset-level,
  not per batch);
- l0: mean number of latents > 0 per token;
- dead: latents that fire (> 0) on none of the group's tokens; dense: latents that fire on more than
  `dense_threshold` (default 0.1) of them.
- loss recovered (Line of Sight): 1 - (NLL_sae - NLL_clean) / (NLL_zero - NLL_clean), with NLL the mean
  over answer tokens of teacher-forced (image, question, answer) sequences, NLL_sae with the SAE's
  reconstruction replacing the activations at the image positions of its site, NLL_zero with zeros
  there (zero-ablation of the residual at image positions, as Line of Sight).
- task accuracy (Line of Sight's benchmark accuracy with the SAE spliced in): the share of labelled
  questions answered right clean, with the SAE's reconstruction replacing the site's activations at the
  image positions during the prefill (the answer then decoded from that cache), and with zeros there;
  per question type, beside chance. An answer is right by exact match (the greedy answer, lower-cased,
  stripped of spaces and a final full stop, equals the label) or, for a question with `choices`, when
  the label is the choice the model gives the highest probability (the sum of log-probabilities of the
  choice's tokens and the end-of-answer token, teacher-forced). Chance: 1 / the number of choices, or
  for the synthetic world's short answers 1 / the number of answers the world allows
  (`sightline.data.synthetic.answer_family`); none for other free answers.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from sightline.errors import UserError
from sightline.sae.features import LatentBatch, iter_latents

GROUPS: dict[str, tuple[int, ...]] = {"image": (1, 2), "text": (0,), "special": (3,)}
DENSE_THRESHOLD = 0.1


def group_onehot(modality: np.ndarray, groups: dict[str, tuple[int, ...]], device) -> torch.Tensor:
    """[n, n_groups] float32 one-hot of each token's modality group (a token in no group: a zero row)."""
    lut = np.full(8, -1, np.int64)
    for k, codes in enumerate(groups.values()):
        lut[list(codes)] = k
    g = lut[np.asarray(modality, np.int64)]
    out = torch.zeros((len(g), len(groups)), dtype=torch.float32)
    ok = g >= 0
    out[np.flatnonzero(ok), g[ok]] = 1.0
    return out.to(device)


class ReconStats:
    """Streaming sums for the reconstruction metrics of each modality group; per-batch sums in float32 by
    one matmul with the tokens' group one-hot, accumulated across batches in float64."""

    def __init__(self, width: int, d: int, groups: dict[str, tuple[int, ...]] = GROUPS):
        self.groups = dict(groups)
        self.width = width
        G = len(self.groups)
        self.n = np.zeros(G + 1, np.int64)  # the last slot: all tokens
        self.sse = np.zeros(G + 1)
        self.sum_x = torch.zeros((G + 1, d), dtype=torch.float64)
        self.sum_x2 = np.zeros(G + 1)
        self.active = np.zeros(G + 1)
        self.fires = torch.zeros((G + 1, width), dtype=torch.float64)

    def update(self, batch: LatentBatch) -> None:
        """Add one batch."""
        x, xh, f = batch.x_nd, batch.x_hat_nd, batch.f_nw
        oh = group_onehot(batch.modality, self.groups, x.device)
        oh = torch.cat([oh, torch.ones_like(oh[:, :1])], 1)  # [n, G + 1]
        on = (f > 0).float()
        per_tok = torch.stack([((x - xh) ** 2).sum(1), (x ** 2).sum(1), on.sum(1)], 1)  # [n, 3]
        sums = (oh.T @ per_tok).double().cpu().numpy()  # [G + 1, 3]
        self.n += oh.sum(0).long().cpu().numpy()
        self.sse += sums[:, 0]
        self.sum_x2 += sums[:, 1]
        self.active += sums[:, 2]
        self.sum_x += (oh.T @ x).double().cpu()
        self.fires += (oh.T @ on).double().cpu()

    def result(self, dense_threshold: float = DENSE_THRESHOLD) -> dict[str, dict[str, Any]]:
        """{group: {n_tokens, mse, fvu, l0, n_dead, frac_dead, n_dense, frac_dense}} (NaN where no tokens)."""
        out = {}
        d = self.sum_x.shape[1]
        for k, g in enumerate([*self.groups, "all"]):
            n = int(self.n[k])
            if n == 0:
                out[g] = {"n_tokens": 0, "mse": math.nan, "fvu": math.nan, "l0": math.nan, "n_dead": None,
                          "frac_dead": math.nan, "n_dense": None, "frac_dense": math.nan}
                continue
            total_var = self.sum_x2[k] - float((self.sum_x[k] ** 2).sum()) / n
            freq = self.fires[k] / n
            n_dead = int((self.fires[k] == 0).sum())
            n_dense = int((freq > dense_threshold).sum())
            out[g] = {
                "n_tokens": n,
                "mse": float(self.sse[k]) / (n * d),
                "fvu": float(self.sse[k]) / total_var if total_var > 0 else math.nan,
                "l0": float(self.active[k]) / n,
                "n_dead": n_dead,
                "frac_dead": n_dead / self.width,
                "n_dense": n_dense,
                "frac_dense": n_dense / self.width,
            }
        return out

    def frequencies(self) -> dict[str, np.ndarray]:
        """Per group (and 'all'), each latent's firing frequency [width] (NaN for a group without tokens)."""
        return {g: (self.fires[k] / self.n[k]).numpy() if self.n[k] else np.full(self.width, np.nan)
                for k, g in enumerate([*self.groups, "all"])}


def reconstruction_metrics(sae, store, site: str | None = None, batch_size: int = 4096,
                           dense_threshold: float = DENSE_THRESHOLD, progress: bool = False) -> dict[str, dict]:
    """MSE, FVU, L0, dead and dense latents of an SAE over a store, per modality group (see module docstring)."""
    stats = ReconStats(sae.W_dec.shape[0], sae.W_dec.shape[1])
    for batch in iter_latents(sae, store, site, batch_size, progress, desc="sae metrics"):
        stats.update(batch)
    return stats.result(dense_threshold)


# ------------------------------------------------------------------------------------------ AUROC
def rankdata(x: np.ndarray) -> np.ndarray:
    """1-based ranks of a 1-D array, ties given their average rank (as scipy.stats.rankdata)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    new = np.r_[True, xs[1:] != xs[:-1]]
    dense = np.cumsum(new)  # 1-based group number in sorted order
    bounds = np.r_[np.flatnonzero(new), len(x)]  # start of each group, then the end
    avg = 0.5 * (bounds[dense - 1] + 1 + bounds[dense])  # mean of ranks start+1 .. end
    out = np.empty(len(x), np.float64)
    out[order] = avg
    return out


def auroc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of scores for boolean labels, from ranks (Mann-Whitney U; ties count half).

    NaN when one class is empty."""
    s = np.asarray(scores, np.float64).ravel()
    y = np.asarray(labels).astype(bool).ravel()
    if len(s) != len(y):
        raise ValueError(f"{len(s)} scores for {len(y)} labels")
    n1 = int(y.sum())
    n0 = len(y) - n1
    if n1 == 0 or n0 == 0:
        return math.nan
    r = rankdata(s)
    return float((r[y].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


class SparseScores:
    """Non-negative scores of n items x width latents kept as their nonzero entries (row, col, value).

    An SAE's latents are >= 0 and mostly 0, so a probe set of many items and many latents is small
    this way; `auroc` needs only the nonzeros (all zeros of a latent tie at the bottom)."""

    def __init__(self, width: int):
        self.width = width
        self.n = 0
        self._rows: list[np.ndarray] = []
        self._cols: list[np.ndarray] = []
        self._vals: list[np.ndarray] = []

    def add(self, scores_mw: torch.Tensor) -> None:
        """Append m items' scores [m, width] (negative values are not allowed)."""
        nz = torch.nonzero(scores_mw > 0)
        if (scores_mw < 0).any():
            raise ValueError("SparseScores holds non-negative scores only")
        self._rows.append((nz[:, 0].cpu().numpy() + self.n).astype(np.int64))
        self._cols.append(nz[:, 1].cpu().numpy().astype(np.int64))
        self._vals.append(scores_mw[nz[:, 0], nz[:, 1]].float().cpu().numpy())
        self.n += scores_mw.shape[0]

    def entries(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cat = (lambda parts, dt: np.concatenate(parts) if parts else np.zeros(0, dt))
        return cat(self._rows, np.int64), cat(self._cols, np.int64), cat(self._vals, np.float32)

    def dense(self, rows: np.ndarray | None = None) -> np.ndarray:
        """The scores as a dense [n, width] array (for tests and small sets)."""
        r, c, v = self.entries()
        out = np.zeros((self.n, self.width), np.float32)
        out[r, c] = v
        return out if rows is None else out[rows]

    def column(self, col: int, rows: np.ndarray | None = None) -> np.ndarray:
        """One latent's scores over all items [n] (or the chosen rows)."""
        r, c, v = self.entries()
        out = np.zeros(self.n, np.float32)
        m = c == col
        out[r[m]] = v[m]
        return out if rows is None else out[rows]

    def auroc(self, labels_nc: np.ndarray, rows: np.ndarray | None = None) -> np.ndarray:
        """AUROC of every latent for every label column: [width, c] (NaN where a class is empty).

        labels_nc: bool [n, c] over all items (or over `rows` when given, a subset of the items)."""
        r, c, v = self.entries()
        y = np.asarray(labels_nc, bool)
        if y.ndim == 1:
            y = y[:, None]
        if rows is not None:
            remap = np.full(self.n, -1, np.int64)
            remap[np.asarray(rows)] = np.arange(len(rows))
            keep = remap[r] >= 0
            r, c, v = remap[r[keep]], c[keep], v[keep]
            n = len(rows)
        else:
            n = self.n
        if len(y) != n:
            raise ValueError(f"labels have {len(y)} rows for {n} items")
        return sparse_auroc(r, c, v, n, self.width, y)


def sparse_auroc(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, n: int, width: int,
                 labels_nc: np.ndarray) -> np.ndarray:
    """AUROC [width, c] of n items' non-negative scores given by their positive entries, from ranks:
    a latent's zeros share the average rank (z + 1) / 2, its positive values rank z + 1 .. n."""
    y = np.asarray(labels_nc, bool)
    n1 = y.sum(0).astype(np.float64)  # [c]
    n0 = n - n1
    nnz = np.bincount(cols, minlength=width).astype(np.float64)  # [w]
    z = n - nnz
    order = np.lexsort((vals, cols))
    cs, vs, rs = cols[order], vals[order], rows[order]
    E = len(cs)
    if E:
        col_start = np.r_[0, np.cumsum(np.bincount(cs, minlength=width))[:-1]]
        new = np.r_[True, (cs[1:] != cs[:-1]) | (vs[1:] != vs[:-1])]
        bounds = np.r_[np.flatnonzero(new), E]
        g = np.cumsum(new) - 1
        within = 0.5 * (bounds[g] + bounds[g + 1] - 1) - col_start[cs] + 1  # average rank among the nonzeros
        rank = z[cs] + within
    else:
        rank = np.zeros(0)
    out = np.empty((width, y.shape[1]), np.float64)
    for k in range(y.shape[1]):
        pos = y[rs, k] if E else np.zeros(0, bool)
        pos_sum = np.bincount(cs[pos], weights=rank[pos], minlength=width)
        pos_nnz = np.bincount(cs[pos], minlength=width)
        r_pos = pos_sum + (n1[k] - pos_nnz) * (z + 1) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            out[:, k] = (r_pos - n1[k] * (n1[k] + 1) / 2) / (n1[k] * n0[k])
    return out


def sparse_probe(scores: SparseScores, labels_nc: np.ndarray, train: np.ndarray, test: np.ndarray,
                 names: Sequence[str], threshold: float = 0.9) -> dict[str, Any]:
    """Single-latent sparse probing: per label, the latent with the best AUROC on the `train` items,
    scored on the held-out `test` items (so the choice among width latents does not inflate it).

    Returns {"per_label": {name: {latent, auroc_train, auroc_test, n_pos_test}}, "coverage": fraction of
    labels with auroc_test >= threshold (labels without both classes in both halves left out), ...}."""
    y = np.asarray(labels_nc, bool)
    a_train = scores.auroc(y[train], rows=train)
    a_test = scores.auroc(y[test], rows=test)
    per: dict[str, Any] = {}
    hits = []
    for k, name in enumerate(names):
        col = a_train[:, k]
        if np.isnan(col).all() or np.isnan(a_test[:, k]).all():
            per[name] = {"latent": None, "auroc_train": None, "auroc_test": None,
                         "n_pos_test": int(y[test, k].sum())}
            continue
        j = int(np.nanargmax(col))
        per[name] = {"latent": j, "auroc_train": float(col[j]), "auroc_test": float(a_test[j, k]),
                     "best_auroc_test_any_latent": float(np.nanmax(a_test[:, k])),
                     "n_pos_test": int(y[test, k].sum()), "n_test": int(len(test))}
        hits.append(a_test[j, k] >= threshold)
    return {"per_label": per, "threshold": threshold, "n_labels": len(hits),
            "coverage": float(np.mean(hits)) if hits else math.nan}


# ------------------------------------------------------------------------------- loss recovered
def answer_items(data: str, limit: int | None = None) -> list[tuple[str, str, str]]:
    """(image path, question, answer) triples from a JSONL manifest (image, prompt, label), e.g. from
    `sightline.data.synthetic.export_jsonl`; lines without prompt or label are skipped."""
    from sightline.data import open_dataset

    ds = open_dataset(data)
    items = [(ex.path, ex.prompt, ex.label) for ex in ds if ex.prompt and ex.label]
    if not items:
        raise UserError(f"{data} has no line with both a question (\"prompt\") and an answer (\"label\"); "
                        "loss recovered needs (image, question, answer) lines")
    return items[:limit] if limit else items


def _end_token(adapter) -> str:
    """The end-of-answer token as text: the generation config's eos (first if several), else the tokenizer's."""
    tok = adapter.tokenizer
    gc = getattr(adapter.model, "generation_config", None)
    eos = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        return tok.eos_token or ""
    return tok.convert_ids_to_tokens(int(eos))


@torch.no_grad()
def answer_nlls(adapter, items: Sequence[tuple[Any, str, str]], edits_for=None, batch_size: int = 8,
                progress: bool = False, desc: str = "answer nll") -> tuple[np.ndarray, np.ndarray]:
    """Per item (sum of NLL over its answer tokens [n], number of answer tokens [n]) of teacher-forced
    sequences render_prompt(question) + answer + end token, for (image, question, answer) items.

    edits_for(batch) -> list of Edits applied during the forward (None: clean). The answer tokens are
    those after the rendered prompt's own tokens (the common prefix of the two tokenisations)."""
    from tqdm.auto import tqdm

    from sightline.capture.edit import apply_edits
    from sightline.data import load_image

    end = _end_token(adapter)
    sums, counts = np.zeros(len(items)), np.zeros(len(items), np.int64)
    dev = adapter.device
    for s in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        chunk = items[s : s + batch_size]
        images = [im if not isinstance(im, str) else load_image(im) for im, _, _ in chunk]
        prompts = [adapter.render_prompt(q) for _, q, _ in chunk]
        full = adapter.prepare(images, [p + a + end for p, (_, _, a) in zip(prompts, chunk)])
        head = adapter.prepare(images, prompts)
        ids = full.inputs["input_ids"]
        starts = []
        for i in range(len(chunk)):
            a = ids[i, : full.lengths[i]]
            b = head.inputs["input_ids"][i, : head.lengths[i]]
            n = min(len(a), len(b))
            same = (a[:n] == b[:n]).numpy()
            starts.append(int(np.argmin(same)) if not same.all() else n)
        first = min(starts)
        keep = ids.shape[1] - first + 1  # logits of positions first-1 .. S-1 predict tokens first .. S
        inputs = {k: (v.to(dev) if torch.is_tensor(v) else v) for k, v in full.inputs.items()}
        edits = edits_for(full) if edits_for is not None else []
        with apply_edits(adapter, edits):
            logits = adapter.model(**inputs, logits_to_keep=keep, return_dict=True).logits
        logp = torch.log_softmax(logits.float(), -1)
        for i in range(len(chunk)):
            tgt_pos = torch.arange(starts[i], full.lengths[i])
            if len(tgt_pos) == 0:
                continue
            rows = tgt_pos - 1 - (first - 1)
            tgt = ids[i, tgt_pos].to(dev)
            sums[s + i] = -float(logp[i, rows.to(dev), tgt].sum())
            counts[s + i] = len(tgt_pos)
    return sums, counts


def answer_nll(adapter, items: Sequence[tuple[Any, str, str]], edits_for=None, batch_size: int = 8,
               progress: bool = False, desc: str = "answer nll") -> tuple[float, int]:
    """(sum of NLL over answer tokens, number of answer tokens) of teacher-forced sequences
    render_prompt(question) + answer + end token, for (image, question, answer) items (`answer_nlls`, summed)."""
    sums, counts = answer_nlls(adapter, items, edits_for, batch_size, progress, desc)
    return float(sums.sum()), int(counts.sum())


def reconstruction_fn(sae) -> Callable[[torch.Tensor], torch.Tensor]:
    """x [n, d] -> the SAE's reconstruction of x (computed in float32 on the SAE's device, returned as x was)."""
    dev_sae = next(iter(sae.parameters())).device

    def recon(x: torch.Tensor) -> torch.Tensor:
        x32 = x.to(device=dev_sae, dtype=torch.float32)
        return sae.decode(sae.encode(x32)).to(device=x.device, dtype=x.dtype)

    return recon


def loss_recovered(adapter, sae, items: Sequence[tuple[Any, str, str]], site: str | None = None,
                   batch_size: int = 8, progress: bool = False,
                   clean: tuple[float, int] | None = None) -> dict[str, Any]:
    """NLL on answer tokens clean, with the SAE's reconstruction at the image positions of its site, and
    with zeros there; and loss recovered = 1 - (sae - clean) / (zero - clean).

    `clean`: the (total, count) `answer_nll` already gave for the same items without edits (it does not
    depend on the SAE, so one pass serves every SAE of a run)."""
    from sightline.capture.edit import Edit, replace_with

    site = site or sae.cfg.site
    recon = reconstruction_fn(sae)

    def with_fn(fn):
        return lambda batch: [Edit(site, [lay.image_positions for lay in batch.layouts], replace_with(fn))]

    out: dict[str, Any] = {"site": site, "n_sequences": len(items)}
    for name, edits_for in (("clean", None), ("sae", with_fn(recon)), ("zero", with_fn(torch.zeros_like))):
        if name == "clean" and clean is not None:
            total, count = clean
        else:
            total, count = answer_nll(adapter, items, edits_for, batch_size, progress, desc=f"answer nll ({name})")
        out[f"nll_{name}"] = total / max(count, 1)
        out["n_answer_tokens"] = count
    gap = out["nll_zero"] - out["nll_clean"]
    out["loss_recovered"] = 1 - (out["nll_sae"] - out["nll_clean"]) / gap if gap != 0 else math.nan
    if gap == 0:
        out["note"] = (f"zero-ablating {site} at image positions leaves the answer loss unchanged (e.g. the last "
                       "block's output, which reaches no other position), so loss recovered is undefined")
    return out


# ------------------------------------------------------------------------------------ task accuracy
@dataclass(frozen=True)
class TaskItem:
    """One labelled question about an image (a JSONL line: image, prompt = the question, label = the answer,
    optional qtype and choices)."""

    image: Any  # a path or a PIL image
    question: str
    answer: str
    qtype: str = "all"
    choices: tuple[str, ...] = ()  # empty: exact match of the greedy answer


def _task_item(image, question, answer, meta: dict, where: str) -> TaskItem:
    choices = meta.get("choices") or ()
    if not isinstance(choices, (list, tuple)) or not all(isinstance(c, str) for c in choices):
        raise UserError(f'{where}: "choices" must be a list of strings, e.g. ["cat", "dog"]')
    if choices and answer not in choices:
        raise UserError(f'{where}: the answer {answer!r} is not one of its "choices" {list(choices)}; '
                        "list the right answer among them")
    return TaskItem(image, str(question), str(answer), str(meta.get("qtype") or "all"), tuple(choices))


def task_items(data: str | None = None, store=None, per_qtype: int | None = None,
               qtypes: Sequence[str] = ()) -> list[TaskItem]:
    """Labelled questions from a JSONL manifest (one line per question: "image", "prompt" = the question,
    "label" = the answer, optional "qtype" to group by and "choices" for choice scoring; the layout of
    `sightline.data.synthetic.export_jsonl`) or else from a store's examples; only the question types
    `qtypes` (empty: all), the first `per_qtype` of each (None: all). Lines without a question or an answer
    are skipped."""
    items: list[TaskItem] = []
    if data is not None:
        from sightline.data import open_dataset

        for ex in open_dataset(data):
            if ex.prompt and ex.label:
                items.append(_task_item(ex.path, ex.prompt, ex.label, ex.meta or {}, f"{data} line {ex.id + 1}"))
        if not items:
            raise UserError(f"{data} has no line with both a question (\"prompt\") and an answer (\"label\"); "
                            "task accuracy needs (image, question, answer) lines")
    elif store is not None:
        for e in store.examples:
            if e.get("prompt") and e.get("label") and e.get("path"):
                items.append(_task_item(e["path"], e["prompt"], e["label"], e.get("meta") or {},
                                        f"store example {e['example']}"))
    if qtypes:
        have = sorted({it.qtype for it in items})
        missing = [q for q in qtypes if q not in have]
        if missing:
            raise UserError(f"question type {missing[0]!r} is not in the data (it has {', '.join(have) or 'none'}); "
                            "pick from those")
        items = [it for it in items if it.qtype in qtypes]
    if per_qtype is None:
        return items
    seen: dict[str, int] = {}
    out = []
    for it in items:
        if seen.get(it.qtype, 0) < per_qtype:
            seen[it.qtype] = seen.get(it.qtype, 0) + 1
            out.append(it)
    return out


def normalize_answer(text: str) -> str:
    """An answer as exact match compares it: lower case, surrounding spaces and a final full stop removed."""
    return text.strip().lower().rstrip(".").strip()


def image_edit(site: str, fn: Callable[[torch.Tensor], torch.Tensor], layouts, pads: Sequence[int] | None = None):
    """The Edit replacing `site` by fn(activations) at every image position of each example (prefill only);
    `pads`: left padding per example (generation), whose columns shift the positions."""
    from sightline.capture.edit import Edit, replace_with

    pads = [0] * len(layouts) if pads is None else pads
    return Edit(site, [lay.image_positions + p for lay, p in zip(layouts, pads)], replace_with(fn))


@torch.no_grad()
def greedy_answers(adapter, items: Sequence[TaskItem], fn=None, site: str | None = None, batch_size: int = 8,
                   max_new_tokens: int = 8, progress: bool = False, desc: str = "answers") -> list[str]:
    """The model's greedy answer to each item's question (decoded, stripped), clean or with `site` replaced by
    fn(activations) at the image positions during the prefill (then decoded from that cache)."""
    from tqdm.auto import tqdm

    from sightline.capture.edit import apply_edits, left_pad, stop_ids
    from sightline.data import load_image

    tok = adapter.tokenizer
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if adapter.model.generation_config.pad_token_id is None and tok.pad_token_id is not None:
        gen["pad_token_id"] = tok.pad_token_id
    stop = stop_ids(adapter)
    out: list[str] = []
    for s in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, dynamic_ncols=True):
        chunk = items[s : s + batch_size]
        images = [it.image if not isinstance(it.image, str) else load_image(it.image) for it in chunk]
        inputs, pads, batch = left_pad(adapter, images, [adapter.render_prompt(it.question) for it in chunk])
        inputs = {k: v.to(adapter.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        S = inputs["input_ids"].shape[1]
        edits = [image_edit(site, fn, batch.layouts, pads)] if fn is not None else []
        with apply_edits(adapter, edits):
            ids = adapter.model.generate(**inputs, **gen)[:, S:].tolist()
        for row in ids:
            keep = []
            for t in row:
                if t in stop:
                    break
                keep.append(t)
            out.append(tok.decode(keep, skip_special_tokens=True).strip())
    return out


def chosen_answers(adapter, items: Sequence[TaskItem], fn=None, site: str | None = None, batch_size: int = 8,
                   progress: bool = False, desc: str = "choices") -> list[str]:
    """For each item with choices, the choice whose tokens (and the end token) the model finds most likely,
    teacher-forced, clean or with `site` replaced by fn(activations) at the image positions."""
    rows = [(it.image, it.question, c) for it in items for c in it.choices]
    edits_for = (lambda b: [image_edit(site, fn, b.layouts)]) if fn is not None else None
    sums, _ = answer_nlls(adapter, rows, edits_for, batch_size, progress, desc)
    out, k = [], 0
    for it in items:
        n = len(it.choices)
        out.append(it.choices[int(np.argmin(sums[k : k + n]))])
        k += n
    return out


def task_answers(adapter, items: Sequence[TaskItem], fn=None, site: str | None = None, batch_size: int = 8,
                 max_new_tokens: int = 8, progress: bool = False, desc: str = "tasks") -> tuple[np.ndarray, list[str]]:
    """(right [n] bool, the answer given [n]) for every item: exact match of the greedy answer, or the chosen
    choice for items with choices (see the module docstring), clean or with `site` replaced by fn at the
    image positions."""
    given: list[str | None] = [None] * len(items)
    free = [i for i, it in enumerate(items) if not it.choices]
    multi = [i for i, it in enumerate(items) if it.choices]
    if free:
        for i, a in zip(free, greedy_answers(adapter, [items[i] for i in free], fn, site, batch_size,
                                             max_new_tokens, progress, desc)):
            given[i] = a
    if multi:
        for i, a in zip(multi, chosen_answers(adapter, [items[i] for i in multi], fn, site, batch_size, progress,
                                              desc)):
            given[i] = a
    right = np.array([normalize_answer(g) == normalize_answer(it.answer) for g, it in zip(given, items)], bool)
    return right, [str(g) for g in given]


def task_chance(items: Sequence[TaskItem]) -> dict[str, dict[str, Any]]:
    """Per question type (and "all"): `chance` (the mean of 1 / the number of choices, or of answers the
    synthetic world allows; None where a free answer has no such set) and `majority` (the share of the
    most common right answer)."""
    from sightline.data.synthetic import answer_family

    groups: dict[str, list[TaskItem]] = {}
    for it in items:
        groups.setdefault(it.qtype, []).append(it)
    groups["all"] = list(items)
    out = {}
    for q, its in groups.items():
        per = []
        for it in its:
            fam = it.choices or answer_family(normalize_answer(it.answer))
            per.append(1 / len(fam) if fam else None)
        answers = [normalize_answer(it.answer) for it in its]
        top = max(set(answers), key=answers.count) if answers else None
        out[q] = {"chance": None if not per or any(p is None for p in per) else round(float(np.mean(per)), 4),
                  "majority": round(answers.count(top) / len(answers), 4) if answers else None}
    return out


def task_accuracy(adapter, sae, items: Sequence[TaskItem], site: str | None = None, batch_size: int = 8,
                  max_new_tokens: int = 8, progress: bool = False,
                  clean: tuple[np.ndarray, list[str]] | None = None,
                  zero: tuple[np.ndarray, list[str]] | None = None) -> dict[str, Any]:
    """Accuracy per question type clean, with the SAE's reconstruction spliced in at the image positions of its
    site, and with zeros there, beside chance (see the module docstring).

    `clean` / `zero`: what `task_answers` already gave for the same items without an edit / with zeros at
    this site (neither depends on the SAE, so one pass serves every SAE of a run, or of a site)."""
    site = site or sae.cfg.site
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, progress=progress)
    clean = clean if clean is not None else task_answers(adapter, items, desc="tasks (clean)", **kw)
    spliced = task_answers(adapter, items, reconstruction_fn(sae), site, desc="tasks (sae)", **kw)
    zero = zero if zero is not None else task_answers(adapter, items, torch.zeros_like, site, desc="tasks (zero)",
                                                      **kw)
    chance = task_chance(items)
    qtypes = [*dict.fromkeys(it.qtype for it in items), "all"]
    per = {}
    for q in qtypes:
        rows = np.array([q == "all" or it.qtype == q for it in items], bool)
        per[q] = {"n": int(rows.sum()),
                  **{name: round(float(r[0][rows].mean()), 4) if rows.any() else None
                     for name, r in (("clean", clean), ("sae", spliced), ("zero", zero))},
                  **chance[q]}
    changed = [i for i, (a, b) in enumerate(zip(clean[1], spliced[1])) if a != b]
    n_choice = sum(bool(it.choices) for it in items)
    return {"site": site, "n_questions": len(items),
            "scoring": "choice" if n_choice == len(items) else "exact" if n_choice == 0 else "mixed",
            "per_qtype": per, "n_answers_changed_by_sae": len(changed),
            "examples": [{"question": items[i].question, "answer": items[i].answer, "clean": clean[1][i],
                          "sae": spliced[1][i], "zero": zero[1][i]} for i in changed[:5]]}
