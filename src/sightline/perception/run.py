"""The perception job: six zero-shot readouts scored on every representation, layer and KV head.

`run_perceive(PerceiveConfig(...))` loads the model (default: the shipped organism on synthetic
data), reads each task's units one at a time (one episode / set / image / pair / clip in memory),
extracts every representation in one forward per image (`sightline.perception.represent`), applies
the task's readout per representation and accumulates the task's metrics per task x representation
(x layer x KV head). Protocols (Liu et al., COLM 2025; PAPERS.md):

    fgseg     support tokens labelled foreground when >= `token_fraction` of their non-ignored pixels are;
              a linear classifier per rep on the support tokens (classes weighted equally: `classifier_balanced`);
              query tokens with p >= 0.5 painted
              back onto the pixels; mIoU (per category, Pascal-5i) and FB-IoU
    coseg     the set's tokens clustered across its images (`cosegment`), painted back; Jaccard, precision
    textseg   the class name's last token (its value / key / residual at the same layer and head) scored
    refseg    by dot product against the image tokens, normalised per image, painted back; the threshold
              chosen per rep on the calibration units; mIoU (refseg: mean per-expression IoU and pointing)
    semcorr   each source keypoint's token -> nearest target token by cosine -> that token's box centre;
              PCK@alpha of the target box and of the image, per category
    tempcorr  first frame's labels on tokens (per token each label's share of its pixels: `prop_first_labels`),
              propagated by `ClipPropagator`; decoded as DINO does (bilinear upsampling, norm_mask, argmax:
              `prop_decode`); DAVIS J&F

Beside every rep: the TOKEN-GRID ORACLE (the ground truth moved onto the tokens and back the same way:
the best any token-level readout can score; tempcorr: each frame's true label shares decoded as the readouts'
are, `tokens_majority` each token's majority label painted back), the CONTROL (the same architecture with random weights,
built from the model's config with `seed`, read by the same readouts; on by default for models up to
CONTROL_MAX_PARAMS parameters, where it costs little, off above: `--control` / `--no-control`), chance
levels (all-foreground / all-background masks, a random pixel or token, the first frame copied) and a
seeded bootstrap 95% interval over units for each task's primary metric. Writes OUT/{config.json,
results.json, figures/, index.html} whole or not at all (docs/outputs.md; results.json: docs/perception.md).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sightline.config import ConfigIO, to_dict
from sightline.errors import UserError
from sightline.perception.tasks import FORMATS, IGNORE, TASK_FORMAT, TASKS, load_image, load_mask
from sightline.report.files import RunFolder, RunResult, check_output, write_json

PRIMARY = {"fgseg": "miou", "coseg": "jaccard", "textseg": "miou", "refseg": "mean_image_iou",
           "semcorr": "pck_bbox", "tempcorr": "J&F-Mean"}


def primary_metric(task: str, fmt: str | None = None) -> str:
    """The metric a task's best rep, figures and page go by: PRIMARY, except semcorr on synthetic data, which goes
    by PCK of the image. The organism's 14-px tokens on 112-px images leave PCK@0.1 of a ~30-px box a 3-px
    tolerance that even the token-grid oracle meets for only ~15% of keypoints; PCK@0.1 of the image (11 px,
    under a token) is what a token-level readout can be judged by there (the oracle scores 1.0)."""
    return "pck_img" if task == "semcorr" and fmt == "synthetic" else PRIMARY[task]
METRICS = {  # the scores reported per rep (the primary first)
    "fgseg": ("miou", "fb_iou"), "coseg": ("jaccard", "precision"), "textseg": ("miou", "fb_iou"),
    "refseg": ("mean_image_iou", "miou", "pointing"), "semcorr": ("pck_bbox", "pck_img"),
    "tempcorr": ("J&F-Mean", "J-Mean", "F-Mean"),
}
TEXT_TASKS = ("textseg", "refseg")
CONTROL_MAX_PARAMS = 1_000_000_000
PAPER_THRESHOLDS = tuple(round(0.05 * k, 2) for k in range(1, 20))
DEFAULT_REPS = ("values", "keys", "resid", "projector", "vision", "encoder")


def parse_tasks(spec: str) -> tuple[str, ...]:
    """`--task`: one task, a comma list, or `all`."""
    items = [t.strip() for t in str(spec).split(",") if t.strip()]
    if items == ["all"] or not items:
        return TASKS
    bad = [t for t in items if t not in TASKS]
    if bad:
        raise UserError(f"unknown --task {bad[0]!r}; tasks are {', '.join(TASKS)} or all")
    return tuple(dict.fromkeys(items))


@dataclass(frozen=True)
class PerceiveConfig(ConfigIO):
    """Everything a perception run depends on (saved as OUT/config.json). Protocol defaults are the
    paper's (PAPERS.md, "Visual Representations inside the Language Model")."""

    model: str | None = None
    """Model folder or Hugging Face id; default: the shipped model organism."""
    task: str = "all"
    """fgseg, coseg, textseg, refseg, semcorr, tempcorr, a comma list, or all."""
    data: str | None = None
    """Dataset root (the format's own layout); default: none (synthetic scenes made on the fly)."""
    format: str | None = None
    """pascal5i, msrc, imagenet-s, refcoco, spair, davis or synthetic; default: synthetic without --data,
    else each task's own dataset format."""
    out: str = "perceive"
    """Output folder (config.json, results.json, figures/, index.html)."""
    reps: tuple[str, ...] = DEFAULT_REPS
    """Representations: kinds (values, keys, resid, projector, vision, encoder) and/or exact names (values.2.h1);
    encoder is left out when there is no encoder (and was not asked for by name)."""
    layers: str = "all"
    """Language-model layers of the bare kinds values, keys, resid: all, 0,4,8 or 4-12."""
    heads: str = "all"
    """KV heads of values and keys: all (the concatenation and every head), concat, each, or a list 0,1."""
    vision_layers: str = "all"
    """Vision-tower layers of the bare kind vision: all, 0,4 or 2-6."""
    encoder: str | None = None
    """External vision encoder folder (CLIP/SigLIP) for the encoder rep; default: the organism's stage-1 vision
    tower when the model is the organism, else none."""
    encoder_layer: int = -1
    """Encoder layer read (-1: the last)."""
    view: int = 0
    """Which view's token grid is read (0 = the base view)."""
    prompt: str = ""
    """Text after the image for tasks without a text query (default: the image alone)."""
    query_prompt: str = "{text}"
    """Text after the image for textseg/refseg; {text} is the class name or referring expression."""
    prefix: str | None = None
    """Text placed before the image in the user turn (the paper's text prefix)."""
    query_alone: bool = False
    """Run the query text through the language model alone (no image) instead of after the image."""
    shots: int = 5
    """fgseg: support images per episode (the paper's 5-shot)."""
    episodes: int = 1000
    """fgseg: episodes per fold (the paper's 1000)."""
    fold: int | None = None
    """fgseg on pascal5i: one fold 0..3; default: all four."""
    split: str | None = None
    """Dataset split (default: the format's evaluation split)."""
    token_fraction: float = 0.5
    """A token is foreground (support labels, the oracle) when at least this share of its non-ignored pixels is."""
    classifier_l2: float = 10.0
    """fgseg: L2 penalty of the per-token logistic classifier (standardised features; sklearn's C = 1 / l2). Five
    support images give a few hundred tokens for a few hundred feature dimensions: on the organism (40 episodes,
    seeds 0-2, values of all heads together, best layer over the majority-token oracle) l2 = 10 gave 0.63-0.69 where l2 = 1 gave 0.59-0.67 and
    l2 = 0.1 0.51-0.63."""
    classifier_balanced: bool = True
    """fgseg: weight the classifier's two classes equally (sklearn's class_weight="balanced"): the foreground is a
    few tokens of each support image, and unweighted the penalised fit rarely predicts it (organism, 20 episodes:
    best value layer 0.27 -> 0.39 mIoU); False: the plain loss."""
    classifier_threshold: float = 0.65
    """fgseg: a query token is foreground when the classifier's probability is at least this. Balanced weights move
    the probabilities of the rare foreground up, so 0.5 over-predicts it; on the organism (l2 = 10, 40 episodes,
    best value rep over the majority-token oracle) 0.65 gave 0.71-0.75 on seeds 0-2 where 0.5 gave 0.68-0.73, and
    0.79-0.81 against 0.75-0.78 on seeds 3-5 (not used to choose it)."""
    coseg_clusters: int = 6
    """coseg: clusters over the set's tokens."""
    coseg_vote_fraction: float = 0.75
    """coseg: a cluster is the common object when it appears in at least this share of the set's images (Amir et
    al.'s 75%)."""
    coseg_min_fraction: float = 0.02
    """coseg: a cluster counts as present in an image when it holds at least this share of the image's tokens."""
    coseg_background_prior: bool = True
    """coseg: clusters that dominate the image border are background."""
    thresholds: tuple[float, ...] = PAPER_THRESHOLDS
    """textseg/refseg: candidate thresholds on the normalised scores, chosen per rep on the calibration units."""
    calibration_fraction: float = 0.2
    """textseg/refseg: share of the units held out to choose the threshold."""
    refcoco_dataset: str = "refcoco"
    """refseg on refcoco data: refcoco, refcoco+ or refcocog."""
    pck_alpha: float = 0.1
    """semcorr: PCK tolerance as a share of the target box's (and image's) larger side."""
    prop_topk: int = 5
    """tempcorr: source tokens each token takes its label from."""
    prop_n_last: int = 7
    """tempcorr: preceding frames propagated from (plus the first)."""
    prop_radius: int = 12
    """tempcorr: neighbourhood radius in tokens."""
    prop_temperature: float = 0.1
    """tempcorr: softmax temperature of the affinities."""
    prop_first_labels: str = "coverage"
    """tempcorr: the first frame's labels on the tokens: coverage (each token's share of every object's pixels, a
    soft label: an object smaller than a token still starts with weight) or majority (each token one-hot on the
    label covering most of it; objects under half a token can vanish)."""
    prop_decode: str = "bilinear"
    """tempcorr: soft token labels to a label map as DINO does (bilinear upsampling to the pixels, each label
    min-max normalised (norm_mask), argmax), or nearest (each token's argmax painted onto its pixels)."""
    centre: str = "none"
    """coseg, semcorr, tempcorr: token features for the cosine readouts as they are (none) or less the image's
    mean token (image)."""
    synthetic_units: int = 20
    """Synthetic data: units made per task (episodes, sets, images, pairs, clips)."""
    synthetic_frames: int = 8
    """Synthetic data: frames per tempcorr clip."""
    synthetic_set_size: int = 6
    """Synthetic data: images per coseg set."""
    limit: int | None = None
    """Score at most this many units per task (after the calibration units)."""
    control: bool | None = None
    """Score the random-weight control too; default: on for models up to 1e9 parameters, off above."""
    bootstrap: int = 1000
    """Bootstrap resamples of the units for the 95% intervals (0: none)."""
    min_units: int = 20
    """Fewer units than this: the task is flagged too small to mean much (results and page)."""
    n_examples: int = 3
    """Units per task drawn on the page (image, prediction, truth), kept in memory as thumbnails for them only; 0: none."""
    example_rep: str | None = None
    """The representation those figures show beside the oracle; default: values (all heads) of the read language-model
    layer nearest the middle."""
    seed: int = 0
    """Seeds the data sampling, the control's weights, clustering and the bootstrap."""
    batch_size: int = 8
    """Images per forward."""
    model_dtype: str = "auto"
    """auto (bfloat16 on GPU, float32 on CPU), float32, float16 or bfloat16."""
    device: str = "auto"
    """auto (CUDA if available), cpu, cuda:0."""
    device_map: str | None = None
    """accelerate device map (e.g. auto) for a model larger than one GPU; overrides --device."""
    revision: str | None = None
    """Model revision on the Hub."""
    trust_remote_code: bool = False
    """Allow the model's own code from the Hub."""
    overwrite: bool = False
    """Replace an existing output folder."""
    progress: bool = True
    """Show progress bars."""



# ============================================================================= checks and set-up
def check_config(cfg: PerceiveConfig) -> tuple[str, ...]:
    """The tasks `cfg` asks for, every setting checked (one UserError line for a bad one)."""
    tasks = parse_tasks(cfg.task)
    if cfg.format is not None and cfg.format not in FORMATS:
        raise UserError(f"unknown --format {cfg.format!r}; formats are {', '.join(FORMATS)}")
    if cfg.format not in (None, "synthetic"):
        wrong = [t for t in tasks if TASK_FORMAT[t] != cfg.format]
        if wrong:
            fits = [t for t, f in TASK_FORMAT.items() if f == cfg.format]
            raise UserError(f"--format {cfg.format} does not serve --task {wrong[0]}: {cfg.format} holds "
                            f"{', '.join(fits)} (and synthetic serves every task)")
        if cfg.data is None:
            raise UserError(f"--format {cfg.format} needs --data ROOT (the dataset's folder)")
    if cfg.data is not None and not Path(cfg.data).expanduser().exists():
        raise UserError(f"--data {cfg.data} does not exist; give the dataset's folder")
    for name in ("shots", "episodes", "synthetic_units", "synthetic_set_size", "batch_size", "coseg_clusters", "prop_topk",
                 "prop_n_last", "min_units"):
        if getattr(cfg, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be at least 1, not {getattr(cfg, name)}")
    if cfg.n_examples < 0:
        raise UserError(f"--n-examples must be 0 or more, not {cfg.n_examples}")
    if cfg.synthetic_frames < 3:
        raise UserError(f"--synthetic-frames must be at least 3 (DAVIS scores frames 1..T-2), not {cfg.synthetic_frames}")
    if cfg.limit is not None and cfg.limit < 1:
        raise UserError(f"--limit must be at least 1, not {cfg.limit}")
    if cfg.fold is not None and not 0 <= cfg.fold <= 3:
        raise UserError(f"--fold must be 0, 1, 2 or 3 (Pascal-5i), not {cfg.fold}")
    for name in ("token_fraction", "calibration_fraction", "coseg_vote_fraction", "pck_alpha", "classifier_threshold"):
        if not 0 < getattr(cfg, name) <= 1:
            raise UserError(f"--{name.replace('_', '-')} must be in (0, 1], not {getattr(cfg, name)}")
    if not cfg.thresholds:
        raise UserError("--thresholds needs one or more numbers, e.g. 0.3,0.5,0.7")
    if cfg.bootstrap < 0 or cfg.prop_radius < 0 or cfg.prop_temperature <= 0 or cfg.classifier_l2 <= 0:
        raise UserError("--bootstrap and --prop-radius must be >= 0; --prop-temperature and --classifier-l2 > 0")
    for name, allowed in (("prop_first_labels", ("coverage", "majority")), ("prop_decode", ("bilinear", "nearest")),
                          ("centre", ("none", "image"))):
        if getattr(cfg, name) not in allowed:
            raise UserError(f"--{name.replace('_', '-')} {getattr(cfg, name)!r}: choose {' or '.join(allowed)}")
    if "{text}" not in cfg.query_prompt:
        raise UserError(f"--query-prompt {cfg.query_prompt!r} must contain {{text}}")
    return tasks


def format_of(cfg: PerceiveConfig, task: str) -> str:
    """The dataset format a task is read in (--format, else synthetic without --data, else the task's own)."""
    if cfg.format is not None:
        return cfg.format
    return "synthetic" if cfg.data is None else TASK_FORMAT[task]


def resolve_model(cfg: PerceiveConfig) -> tuple[str, bool]:
    """(model path, whether it is the shipped organism)."""
    from sightline.organism import checkpoint_path

    if cfg.model is None:
        return str(checkpoint_path()), True
    try:
        same = Path(cfg.model).expanduser().resolve() == checkpoint_path().resolve()
    except (UserError, OSError):
        same = False
    return cfg.model, same


def _encoder_path(cfg: PerceiveConfig, organism: bool) -> tuple[str | None, str | None]:
    """(encoder folder or None, why there is none)."""
    if cfg.encoder is not None:
        if not Path(cfg.encoder).expanduser().exists():
            raise UserError(f"--encoder {cfg.encoder} does not exist; give a CLIP/SigLIP vision checkpoint folder")
        return cfg.encoder, None
    if organism:
        try:
            from sightline.organism import organism_encoder_path  # the organism's stage-1 vision tower
        except ImportError:
            return None, "the organism ships no stage-1 vision tower here"
        try:
            p = organism_encoder_path()
        except UserError as e:
            return None, str(e)
        return (str(p), None) if p is not None else (None, "the organism ships no stage-1 vision tower")
    return None, "no --encoder given"


def load_task_data(cfg: PerceiveConfig, task: str, fold: int = 0):
    """The task's TaskData as `cfg` asks (`sightline.data.perception.load_task`)."""
    from sightline.data.perception import load_task

    fmt = format_of(cfg, task)
    kw: dict[str, Any] = dict(split=cfg.split, fold=fold, shots=cfg.shots, episodes=cfg.episodes, seed=cfg.seed,
                              limit=cfg.limit, calibration_fraction=cfg.calibration_fraction,
                              refcoco_dataset=cfg.refcoco_dataset)
    if fmt == "synthetic":
        n = cfg.synthetic_units if cfg.limit is None else min(cfg.synthetic_units, cfg.limit)
        kw.update(episodes=n, limit=n, synthetic={"n": n, "n_frames": cfg.synthetic_frames,
                                                        "set_size": cfg.synthetic_set_size})
    return load_task(task, fmt, cfg.data or "", **kw)


# ============================================================================= accumulators
class _Acc:
    """One (kind, rep)'s scores on one task: the benchmark's scorer, plus per-unit records of the reported
    statistics (unit, group, num, den) from which the bootstrap recomputes them."""

    def __init__(self, scorer=None):
        self.scorer = scorer
        self.records: dict[str, list[tuple[int, str, float, float]]] = {}

    def rec(self, stat: str, unit: int, group: str, num: float, den: float) -> None:
        """Record one unit's share of a statistic (grouped ratio: mean over groups of sum num / sum den)."""
        self.records.setdefault(stat, []).append((unit, group, float(num), float(den)))

    def values(self, names: Sequence[str]) -> dict[str, float]:
        """The statistics: from the scorer where it has them, else from the records."""
        got = self.scorer.to_json() if self.scorer is not None else {}
        out = {}
        for n in names:
            if n in got and got[n] is not None:
                out[n] = float(got[n])
            elif n in self.records:
                out[n] = _stat(self.records[n])
        return out


def _stat(records, weights: np.ndarray | None = None) -> float:
    """Mean over groups of (sum of num / sum of den) over `records`; `weights` [n_units] resample units."""
    v = grouped_stat(records, None if weights is None else weights[None])
    return float(v[0])


def grouped_stat(records, weights: np.ndarray | None) -> np.ndarray:
    """A recorded statistic (records: (unit, group, num, den)): the mean over groups of sum num / sum den, per row of
    `weights` [B, n_units] (each unit's count in a resample; None: every unit once) -> [B]."""
    units = np.array([r[0] for r in records], dtype=np.int64)
    _, grp = np.unique([r[1] for r in records], return_inverse=True)
    num = np.array([r[2] for r in records])
    den = np.array([r[3] for r in records])
    w = np.ones((1, units.max() + 1)) if weights is None else weights
    wr = w[:, units]  # [B, R]
    onehot = np.zeros((len(records), grp.max() + 1))
    onehot[np.arange(len(records)), grp] = 1
    n_g, d_g, p_g = (wr * num) @ onehot, (wr * den) @ onehot, wr @ onehot > 0
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(d_g > 0, n_g / np.where(d_g > 0, d_g, 1), 1.0)  # an empty union scores 1, as SegScores
        return (ratio * p_g).sum(1) / p_g.sum(1)


def bootstrap_weights(n_units: int, n_boot: int, seed: int, width: int | None = None, chunk: int = 250):
    """The seeded bootstrap's resamples of `n_units` units, in chunks of `chunk` rows: arrays [b, width] of each
    unit's count (units past n_units, up to `width`, never drawn). The same seed gives the same resamples, so two
    statistics of the same units read on them are paired."""
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), 0xB007]))
    width = n_units if width is None else max(width, n_units)
    for start in range(0, n_boot, chunk):  # bounded memory
        b = min(chunk, n_boot - start)
        w = rng.multinomial(n_units, np.full(n_units, 1.0 / n_units), size=b).astype(np.float64)
        if width > n_units:
            w = np.concatenate([w, np.zeros((b, width - n_units))], axis=1)
        yield w


def bootstrap_interval(records, n_units: int, n_boot: int, seed: int) -> tuple[float | None, float | None]:
    """Percentile 95% interval of a recorded statistic over `n_boot` resamples of the units (seeded)."""
    if not records or n_boot <= 0 or n_units < 2:
        return None, None
    n_max = max(n_units, max(r[0] for r in records) + 1)
    s = np.concatenate([grouped_stat(records, w) for w in bootstrap_weights(n_units, n_boot, seed, n_max)])
    s = s[np.isfinite(s)]
    if not len(s):
        return None, None
    lo, hi = np.percentile(s, [2.5, 97.5])
    return float(lo), float(hi)


# ============================================================================= per-token helpers
def _np(x) -> np.ndarray:
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _token_fraction(layout, mask: np.ndarray, label: int, view: int) -> tuple[np.ndarray, np.ndarray]:
    """(share of each token's non-ignored pixels that are `label`, share of its pixels not ignored) [rows, cols]."""
    from sightline.models.layout import mask_to_tokens

    valid = mask != IGNORE
    on = mask_to_tokens(layout, (mask == label) & valid, 0, view)
    cover = mask_to_tokens(layout, valid, 0, view)
    with np.errstate(invalid="ignore", divide="ignore"):
        frac = np.where(cover > 0, on / np.where(cover > 0, cover, 1), np.nan)
    return frac, np.nan_to_num(cover)


_PIXEL_INDEX: dict[str, np.ndarray] = {}


def _paint(layout, token_rc: np.ndarray, view: int) -> np.ndarray:
    """Per-token values [rows, cols] painted onto the original pixels (NaN where no token covers), as
    `tokens_to_pixels` does; the pixel -> token map is made once per grid (a few kept)."""
    from sightline.models.layout import tokens_to_pixels

    g = layout.grid(0, view)
    key = repr(g.to_json())
    index = _PIXEL_INDEX.get(key)
    if index is None:
        index = tokens_to_pixels(layout, np.arange(g.rows * g.cols, dtype=np.float32).reshape(g.rows, g.cols), 0, view)
        index = np.where(np.isnan(index), -1, index).astype(np.int64)
        if len(_PIXEL_INDEX) > 64:
            _PIXEL_INDEX.clear()
        _PIXEL_INDEX[key] = index
    flat = np.asarray(token_rc, dtype=np.float32).reshape(-1)
    if flat.shape[0] != g.rows * g.cols:
        raise ValueError(f"scores shape {np.shape(token_rc)} != grid shape {(g.rows, g.cols)}")
    return np.where(index >= 0, flat[np.maximum(index, 0)], np.float32(np.nan))


def _paint_bool(layout, token_rc: np.ndarray, view: int) -> np.ndarray:
    return np.nan_to_num(_paint(layout, np.asarray(token_rc, np.float32), view), nan=0.0) >= 0.5


def _bilinear_matrices(layout, view: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(rows matrix [H, rows], columns matrix [W, cols], covered [H, W]) of bilinear upsampling from a grid to its
    original pixels: interpolated between token centres, clamped beyond the outer ones (for a uniform grid,
    DINO's F.interpolate(scale_factor=patch, mode="bilinear", align_corners=False)); covered: pixels a token
    covers (`tokens_to_pixels`)."""
    g = layout.grid(0, view)
    h, w = g.image_size_hw
    xs, ys = g.spans()

    def axis(n_px: int, centres: np.ndarray) -> np.ndarray:
        n = len(centres)
        f = np.interp(np.arange(n_px) + 0.5, centres, np.arange(n, dtype=np.float64))
        i0 = np.floor(f).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        m = np.zeros((n_px, n))
        m[np.arange(n_px), i0] += 1 - (f - i0)
        m[np.arange(n_px), i1] += f - i0
        return m

    covered = ~np.isnan(_paint(layout, np.zeros((g.rows, g.cols), np.float32), view))
    return axis(h, ys.mean(1)), axis(w, xs.mean(1)), covered


def _decode_labels(layout, view: int, soft: np.ndarray, nearest: bool) -> np.ndarray:
    """Label maps [T, H, W] uint8 from soft token labels [T, rows, cols, C]: DINO's decoding (bilinear
    upsampling, `norm_mask` per label: min-max scaled where its max is positive, argmax), or with `nearest` each
    token's argmax painted onto its pixels. Uncovered pixels: 0."""
    soft = np.asarray(soft, np.float64)
    if nearest:
        return np.stack([np.nan_to_num(_paint(layout, s.argmax(-1), view), nan=0.0).round().astype(np.uint8)
                         for s in soft])
    my, mx, covered = _bilinear_matrices(layout, view)
    up = np.einsum("hr,trcC,wc->tChw", my.astype(np.float32), soft.astype(np.float32), mx.astype(np.float32),
                   optimize=True)  # [T, C, H, W]
    if covered.all():
        lo, hi = up.min(axis=(2, 3), keepdims=True), up.max(axis=(2, 3), keepdims=True)
    else:
        lo = np.where(covered, up, np.inf).min(axis=(2, 3), keepdims=True)
        hi = np.where(covered, up, -np.inf).max(axis=(2, 3), keepdims=True)
    rng = hi - lo
    # norm_mask as one multiply-add per label: (up - lo) / rng where max > 0 and rng > 0; 0 where max > 0 = min
    scale = np.where(hi > 0, np.where(rng > 0, 1 / np.where(rng > 0, rng, 1), 0), 1).astype(np.float32)
    shift = np.where(hi > 0, -lo * scale, 0).astype(np.float32)
    lab = (up * scale + shift).argmax(1)
    return np.where(covered, lab, 0).astype(np.uint8)


def _centred(x: torch.Tensor, how: str) -> torch.Tensor:
    """Token features [n, D] for the cosine readouts: as they are (`none`) or less the image's mean token
    (`image`)."""
    return x - x.mean(0, keepdim=True) if how == "image" else x


def best_token_mask(frac_hw: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """The token-level mask with the highest foreground IoU on this image: every token whose foreground share is
    at least t, for the best t (IoU = I / (|P| + |G| - I) is maximised by such a threshold set). `frac_hw`: the
    tokens' shares painted onto the pixels (NaN uncovered)."""
    valid = gt != IGNORE
    v = np.nan_to_num(frac_hw, nan=-1.0)[valid]
    fg = (gt[valid] == 1)
    levels = np.unique(v[v > 0])[::-1]  # candidate thresholds, high to low
    if not len(levels):
        return np.zeros(gt.shape, bool)
    idx = np.searchsorted(-levels, -v, side="left")  # the level index at which each pixel enters
    inside = v > 0
    n_in = np.bincount(idx[inside], minlength=len(levels)).cumsum()
    i_in = np.bincount(idx[inside & fg], minlength=len(levels)).cumsum()
    iou = i_in / (n_in + fg.sum() - i_in)
    t = levels[int(np.argmax(iou))]
    return np.nan_to_num(frac_hw, nan=-1.0) >= t


def _fg_iou(pred: np.ndarray, gt: np.ndarray) -> tuple[int, int]:
    valid = gt != IGNORE
    fg = (gt == 1) & valid
    p = pred & valid
    return int(np.count_nonzero(p & fg)), int(np.count_nonzero(p | fg))


def _centres(grid) -> np.ndarray:
    """Box centres (x, y) of a grid's tokens, [rows * cols, 2]."""
    b = grid.boxes().reshape(-1, 4).astype(np.float64)
    return np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], axis=1)


def _point_tokens(grid, xy: np.ndarray) -> np.ndarray:
    """Row-major token index holding each point (x, y); -1 where none does."""
    out = np.full(len(xy), -1, np.int64)
    h, w = grid.image_size_hw
    for k, (x, y) in enumerate(np.asarray(xy, np.float64).reshape(-1, 2)):
        if not (np.isfinite(x) and np.isfinite(y) and 0 <= x <= w and 0 <= y <= h):
            continue
        r, c = grid.pixel_to_grid(x, y)
        if np.isnan(r) or np.isnan(c):
            continue
        r, c = min(max(int(np.floor(r)), 0), grid.rows - 1), min(max(int(np.floor(c)), 0), grid.cols - 1)
        out[k] = r * grid.cols + c
    return out


# ============================================================================= the task runner
@dataclass
class _Sources:
    """The featurizers of one run: kind ("model", "control") -> Featurizer, and the reps each reads."""

    featurizers: dict[str, Any]
    reps: list[Any]  # Rep
    view: int
    unit_prefix: str | None = None  # the current unit's text before its images (None: the featurizers' own)

    def reps_of(self, kind: str, text: bool = False) -> list[str]:
        """Rep names a kind reads (the control has no external encoder; text tasks need a text query)."""
        return [r.name for r in self.reps if not (kind == "control" and r.kind == "encoder")
                and not (text and not r.has_text_query)]

    def features(self, images, texts=None) -> dict[str, list]:
        """kind -> per image ImageFeatures (every image with the current unit's prefix, where one is set)."""
        if self.unit_prefix is None:
            return {k: f(images, texts) for k, f in self.featurizers.items()}
        pre = [self.unit_prefix] * len(images)
        return {k: f(images, texts, pre) for k, f in self.featurizers.items()}


def _grid_kinds(feats) -> list[str]:
    """The grids whose token oracle is scored: the model's, and the encoder's where it reads one."""
    return ["tokens"] + (["encoder_tokens"] if feats[0].encoder_grid is not None else [])


def _oracle_layout(f, which: str):
    return f.layout_of("encoder" if which == "encoder_tokens" else "model")


class _TaskRun:
    """Accumulators of one task over every (kind, rep) and the oracle / chance baselines."""

    def __init__(self, task: str, cfg: PerceiveConfig, src: _Sources, example_rep: str | None = None):
        from sightline.perception.examples import ExampleCollector

        self.task, self.cfg, self.src = task, cfg, src
        self.examples = ExampleCollector(task, example_rep, cfg.n_examples)
        self.acc: dict[tuple[str, str], _Acc] = {}
        self.n_units = 0
        self.notes: list[str] = []

    def get(self, kind: str, rep: str, make: Callable[[], Any] | None = None) -> _Acc:
        """The accumulator of (kind, rep), made on first use with `make()` as its scorer."""
        key = (kind, rep)
        if key not in self.acc:
            self.acc[key] = _Acc(make() if make is not None else None)
        return self.acc[key]

    # ---------------------------------------------------------------------- segmentation scoring
    def seg(self, kind: str, rep: str, unit: int, pred: np.ndarray, gt: np.ndarray, category: str) -> None:
        """Score one binary prediction into (kind, rep)."""
        from sightline.perception.metrics import SegScores

        a = self.get(kind, rep, SegScores)
        iou = a.scorer.add(pred, gt, category)
        self.examples.seg(kind, rep, unit, pred, gt)
        inter, union = _fg_iou(pred, gt)
        a.rec("miou", unit, category, inter, union)
        a.rec("mean_image_iou", unit, "", iou, 1)
        a.rec("jaccard", unit, "", iou, 1)

    def seg_oracle(self, which: str, unit: int, layout, frac_rc: np.ndarray, view: int, gt: np.ndarray,
                   category: str) -> np.ndarray:
        """The token-grid oracles of one image: `which` (e.g. "tokens"), the best token-level mask for the image's
        IoU (`best_token_mask`), and `which`_majority, tokens foreground at >= token_fraction. Returns the
        painted shares."""
        painted = _paint(layout, np.nan_to_num(frac_rc), view)
        self.seg("oracle", which, unit, best_token_mask(painted, gt), gt, category)
        self.seg("oracle", f"{which}_majority", unit, np.nan_to_num(painted) >= self.cfg.token_fraction, gt, category)
        return painted

    def seg_baselines(self, unit: int, gt: np.ndarray, category: str) -> None:
        """Chance: all foreground and all background."""
        self.seg("chance", "all_foreground", unit, np.ones(gt.shape, bool), gt, category)
        self.seg("chance", "all_background", unit, np.zeros(gt.shape, bool), gt, category)

    # ---------------------------------------------------------------------- fgseg
    def fgseg(self, unit: int, ep) -> None:
        """One episode: classifier on the support tokens, prediction on the query's."""
        from sightline.perception.readouts import fit_token_classifier

        view = self.src.view
        samples = [*ep.support, ep.query]
        images = [load_image(s.image) for s in samples]
        masks = [load_mask(s.mask) for s in samples]
        self.examples.images(unit, images[-1:], ep.category)
        feats = self.src.features(images)
        gt = masks[-1]
        frac_cache: dict[tuple[int, str], tuple[np.ndarray, np.ndarray]] = {}

        def labels(i: int, which: str, f):
            if (i, which) not in frac_cache:
                frac, cover = _token_fraction(_oracle_layout(f, which), masks[i], 1, view if which == "tokens" else 0)
                frac_cache[i, which] = (frac.reshape(-1), cover.reshape(-1))
            return frac_cache[i, which]

        for which in _grid_kinds(feats["model"]):
            f = feats["model"][-1]
            frac, _ = labels(len(samples) - 1, which, f)
            g = f.grid_of("encoder" if which == "encoder_tokens" else "model")
            self.seg_oracle(which, unit, _oracle_layout(f, which), frac.reshape(g.rows, g.cols),
                            view if which == "tokens" else 0, gt, ep.category)
        self.seg_baselines(unit, gt, ep.category)
        for kind, fs in feats.items():
            for rep in self.src.reps_of(kind):
                which = "encoder_tokens" if rep == "encoder" else "tokens"
                xs, ys = [], []
                for i in range(len(samples) - 1):
                    frac, cover = labels(i, which, fs[i])
                    keep = cover > 0
                    xs.append(fs[i].feats[rep][torch.as_tensor(keep)])
                    ys.append(frac[keep] >= self.cfg.token_fraction)
                x, y = torch.cat(xs), np.concatenate(ys)
                q = fs[-1]
                g = q.grid_of(rep)
                if y.all() or not y.any():  # one class in the support: predict it everywhere
                    p = np.full(g.rows * g.cols, float(y.any()) if len(y) else 0.0)
                else:
                    clf = fit_token_classifier(x, torch.as_tensor(y), l2=self.cfg.classifier_l2,
                                               class_weight="balanced" if self.cfg.classifier_balanced else None)
                    p = _np(clf.predict_proba(q.feats[rep]))
                    p = p[:, 1] if p.ndim == 2 else p
                tok = (p >= self.cfg.classifier_threshold).reshape(g.rows, g.cols)
                pred = _paint_bool(q.layout_of(rep), tok, view if rep != "encoder" else 0)
                self.seg(kind, rep, unit, pred, gt, ep.category)

    # ---------------------------------------------------------------------- coseg
    def coseg(self, unit: int, cs) -> None:
        """One set: cluster its tokens across its images; score every image."""
        from sightline.perception.readouts import cosegment

        view = self.src.view
        images = [load_image(s.image) for s in cs.samples]
        masks = [load_mask(s.mask) for s in cs.samples]
        self.examples.images(unit, images, cs.name)
        feats = self.src.features(images)
        for which in _grid_kinds(feats["model"]):
            for f, m in zip(feats["model"], masks):
                layout = _oracle_layout(f, which)
                v = view if which == "tokens" else 0
                frac, _ = _token_fraction(layout, m, 1, v)
                self.seg_oracle(which, unit, layout, frac, v, m, cs.name)
        for m in masks:
            self.seg_baselines(unit, m, cs.name)
        for kind, fs in feats.items():
            for rep in self.src.reps_of(kind):
                grids = [f.grid_of(rep) for f in fs]
                fg = cosegment([_centred(f.feats[rep], self.cfg.centre) for f in fs], [(g.rows, g.cols) for g in grids],
                               n_clusters=self.cfg.coseg_clusters, vote_fraction=self.cfg.coseg_vote_fraction,
                               min_fraction=self.cfg.coseg_min_fraction, seed=self.cfg.seed,
                               background_prior=self.cfg.coseg_background_prior)
                for f, g, tok, m in zip(fs, grids, fg, masks):
                    tok = _np(tok).astype(bool).reshape(g.rows, g.cols)
                    pred = _paint_bool(f.layout_of(rep), tok, view if rep != "encoder" else 0)
                    self.seg(kind, rep, unit, pred, m, cs.name)

    # ---------------------------------------------------------------------- textseg / refseg
    def text_maps(self, sample) -> tuple[np.ndarray, dict[str, dict[str, np.ndarray]], Any]:
        """(gt, kind -> rep -> painted score map [H, W] with NaN uncovered, the model's features)."""
        from sightline.perception.readouts import normalize_scores, query_scores

        image, gt = load_image(sample.image), load_mask(sample.mask)
        feats = self.src.features([image], [sample.text])
        out: dict[str, dict[str, np.ndarray]] = {}
        for kind, fs in feats.items():
            f = fs[0]
            out[kind] = {}
            for rep in self.src.reps_of(kind, text=True):
                g = f.grid_of(rep)
                s = _np(normalize_scores(query_scores(f.feats[rep], f.query[rep], how="dot")))
                out[kind][rep] = _paint(f.layout_of(rep), s.reshape(g.rows, g.cols), self.src.view)
        return gt, out, feats["model"][0]

    def calibrate(self, sample, search: dict) -> None:
        """Add one held-out sample to each (kind, rep)'s threshold search."""
        from sightline.perception.readouts import ThresholdSearch

        gt, maps, _ = self.text_maps(sample)
        for kind, reps in maps.items():
            for rep, s in reps.items():
                if (kind, rep) not in search:
                    search[kind, rep] = ThresholdSearch(list(self.cfg.thresholds))
                search[kind, rep].add(np.nan_to_num(s, nan=0.0), gt)

    def textseg(self, unit: int, sample, thresholds: dict) -> None:
        """One image and its query: threshold the score map (the rep's calibrated threshold)."""
        from sightline.perception.metrics import pointing_hit

        gt, maps, f = self.text_maps(sample)
        cat = sample.category or sample.text
        self.examples.images(unit, lambda: [load_image(sample.image)], sample.text or cat)
        refer = self.task == "refseg"
        for which in _grid_kinds([f]):
            layout = _oracle_layout(f, which)
            v = self.src.view if which == "tokens" else 0
            frac, _ = _token_fraction(layout, gt, 1, v)
            painted = self.seg_oracle(which, unit, layout, frac, v, gt, cat)
            if refer:
                self.get("oracle", which).rec("pointing", unit, "", pointing_hit(painted, gt), 1)
        self.seg_baselines(unit, gt, cat)
        if refer:
            valid = gt != IGNORE
            share = float(np.count_nonzero((gt == 1) & valid)) / max(1, int(np.count_nonzero(valid)))
            self.get("chance", "random_pixel").rec("pointing", unit, "", share, 1)
        for kind, reps in maps.items():
            for rep, s in reps.items():
                self.seg(kind, rep, unit, np.nan_to_num(s, nan=0.0) >= thresholds[kind, rep], gt, cat)
                if refer:
                    self.get(kind, rep).rec("pointing", unit, "", pointing_hit(s, gt), 1)

    # ---------------------------------------------------------------------- semcorr
    def semcorr(self, unit: int, pair) -> None:
        """One pair: nearest target token of each source keypoint's token; PCK of its centre."""
        from sightline.perception.metrics import PCKScores, bbox_threshold, image_threshold, pck
        from sightline.perception.readouts import nearest_neighbours

        src_im, tgt_im = load_image(pair.source), load_image(pair.target)
        feats = self.src.features([src_im, tgt_im])
        gt = np.asarray(pair.target_xy, np.float64).reshape(-1, 2)
        t_box = bbox_threshold(pair.target_bbox, self.cfg.pck_alpha)
        t_img = image_threshold((tgt_im.height, tgt_im.width), self.cfg.pck_alpha)
        cat = pair.category
        self.examples.pair(unit, src_im, tgt_im, pair.source_xy, gt, t_box, cat)

        def score(kind: str, rep: str, pred_xy: np.ndarray) -> None:
            self.examples.points(kind, rep, unit, pred_xy)
            a = self.get(kind, rep, PCKScores)
            hb, hi = pck(pred_xy, gt, t_box), pck(pred_xy, gt, t_img)
            a.scorer.add(hb, hi, cat)
            a.rec("pck_bbox", unit, "", hb.sum(), len(hb))
            a.rec("pck_img", unit, "", hi.sum(), len(hi))

        f_s, f_t = feats["model"]
        for which in _grid_kinds(feats["model"]):
            g = f_t.grid_of("encoder" if which == "encoder_tokens" else "model")
            idx = _point_tokens(g, gt)
            cen = _centres(g)
            pred = np.where(idx[:, None] >= 0, cen[np.maximum(idx, 0)], np.nan)
            score("oracle", which, pred)
        g = f_t.grid
        cen = _centres(g)
        dist = np.sqrt(((cen[None, :, :] - gt[:, None, :]) ** 2).sum(-1))  # [N, n_tokens]
        a = self.get("chance", "random_token")
        a.rec("pck_bbox", unit, "", (dist <= t_box).mean(1).sum(), len(gt))
        a.rec("pck_img", unit, "", (dist <= t_img).mean(1).sum(), len(gt))
        for kind, (fs, ft) in feats.items():
            for rep in self.src.reps_of(kind):
                gs, gt_grid = fs.grid_of(rep), ft.grid_of(rep)
                sidx = _point_tokens(gs, pair.source_xy)
                ok = sidx >= 0
                pred = np.full((len(gt), 2), np.nan)
                if ok.any():
                    xs, xt = _centred(fs.feats[rep], self.cfg.centre), _centred(ft.feats[rep], self.cfg.centre)
                    nn = _np(nearest_neighbours(xs[torch.as_tensor(sidx[ok])], xt))
                    pred[ok] = _centres(gt_grid)[nn.astype(np.int64)]
                score(kind, rep, pred)

    # ---------------------------------------------------------------------- tempcorr
    def tempcorr(self, unit: int, clip) -> None:
        """One clip, streamed in batches of frames: propagate the first frame's token labels per rep
        (`cfg.prop_first_labels`), decode each frame's soft labels (`cfg.prop_decode`)."""
        from sightline.perception.metrics import JFScores
        from sightline.perception.readouts import ClipPropagator

        cfg, view = self.cfg, self.src.view
        gts = [load_mask(m) for m in clip.masks]
        first = gts[0]
        n_obj = int(first[first != IGNORE].max(initial=0))
        n_cls = n_obj + 1
        self.examples.clip(unit, lambda t: load_image(clip.frames[t]), gts, clip.name)

        def coverage(layout, m, v):  # [rows, cols, C]: share of each token's pixels per label
            return np.stack([np.nan_to_num(_token_fraction(layout, m, k, v)[0]) for k in range(n_cls)], -1)

        def first_labels(cov: np.ndarray) -> np.ndarray:  # [rows, cols, C] as the readouts start from them
            if cfg.prop_first_labels == "coverage":
                return cov.astype(np.float32)
            return np.eye(n_cls, dtype=np.float32)[cov.argmax(-1)]

        props: dict[tuple[str, str], Any] = {}
        soft: dict[tuple[str, str], list[np.ndarray]] = {}  # per (kind, rep): soft token labels of frames 1..
        layouts: dict[str, list] = {"tokens": [], "encoder_tokens": []}
        first_tok: dict[str, np.ndarray] = {}
        for start in range(0, len(clip.frames), cfg.batch_size):
            frames = [load_image(f) for f in clip.frames[start:start + cfg.batch_size]]
            feats = self.src.features(frames)
            for j, f in enumerate(feats["model"]):
                t = start + j
                for which in _grid_kinds(feats["model"]):
                    layout = _oracle_layout(f, which)
                    v = view if which == "tokens" else 0
                    layouts[which].append((layout, v))
                    cov = coverage(layout, gts[t], v)
                    if t == 0:
                        first_tok[which] = first_labels(cov)
                    else:
                        soft.setdefault(("oracle", which), []).append(cov)
                        soft.setdefault(("oracle", f"{which}_majority"), []).append(
                            np.eye(n_cls, dtype=np.float32)[cov.argmax(-1)])
                        soft.setdefault(("chance", "first_frame" if which == "tokens" else "first_frame_encoder"),
                                        []).append(first_tok[which])
            for kind, fs in feats.items():
                for rep in self.src.reps_of(kind):
                    for j, f in enumerate(fs):
                        t = start + j
                        g = f.grid_of(rep)
                        x = _centred(f.feats[rep], cfg.centre)
                        if t == 0:
                            lab = first_tok["encoder_tokens" if rep == "encoder" else "tokens"].reshape(-1, n_cls)
                            props[kind, rep] = ClipPropagator(torch.as_tensor(lab), x, (g.rows, g.cols),
                                                              n_last=cfg.prop_n_last, topk=cfg.prop_topk,
                                                              radius=cfg.prop_radius,
                                                              temperature=cfg.prop_temperature)
                        else:
                            out = _np(props[kind, rep].step(x))
                            soft.setdefault((kind, rep), []).append(out.reshape(g.rows, g.cols, n_cls))
            del feats
        props.clear()
        gt_rest = gts[1:]
        for (kind, rep), labs in soft.items():
            which = "encoder_tokens" if rep in ("encoder", "encoder_tokens", "encoder_tokens_majority",
                                                "first_frame_encoder") else "tokens"
            nearest = cfg.prop_decode == "nearest" or rep.endswith("_majority")
            grids = [lv[0].grid(0, lv[1]).to_json() for lv in layouts[which][1:]]
            if all(g == grids[0] for g in grids):  # one grid for the whole clip: decode its frames at once
                preds = list(_decode_labels(*layouts[which][1], np.stack(labs), nearest))
            else:
                preds = [_decode_labels(*layouts[which][t], lab[None], nearest)[0] for t, lab in enumerate(labs, 1)]
            self.examples.labels(kind, rep, unit, preds)
            a = self.get(kind, rep, JFScores)
            per = a.scorer.add(clip.name, preds, gt_rest, n_obj)
            jf = [(o["J"] + o["F"]) / 2 for o in per.values()]
            a.rec("J&F-Mean", unit, "", sum(jf), len(jf))
            a.rec("J-Mean", unit, "", sum(o["J"] for o in per.values()), len(jf))
            a.rec("F-Mean", unit, "", sum(o["F"] for o in per.values()), len(jf))


# ============================================================================= summaries
def _rep_facts(rep: str) -> tuple[int | None, int | None]:
    from sightline.perception.represent import Rep

    try:
        r = Rep.parse(rep)
    except UserError:
        return None, None
    return r.layer, r.head


def summarize_task(run: _TaskRun, extra: dict) -> tuple[list[dict], dict]:
    """(flat rows, the task's summary) of one finished task."""
    task, cfg = run.task, run.cfg
    names = METRICS[task]
    primary = primary_metric(task, extra.get("format"))
    rows = []
    per: dict[str, dict[str, dict]] = {}
    for (kind, rep), a in sorted(run.acc.items()):
        vals = a.values(names)
        layer, head = _rep_facts(rep) if kind in ("model", "control") else (None, None)
        for metric in names:
            if metric not in vals:
                continue
            lo = hi = None
            if metric == primary and metric in a.records:
                lo, hi = bootstrap_interval(a.records[metric], run.n_units, cfg.bootstrap, cfg.seed)
            rows.append({"task": task, "rep": rep, "kind": kind, "layer": layer, "head": head, "metric": metric,
                         "value": vals[metric], "ci_low": lo, "ci_high": hi})
            if metric == primary:
                per.setdefault(kind, {})[rep] = {"value": vals[metric], "ci": None if lo is None else [lo, hi]}

    def best(kind: str, pick: Callable[[str], bool] = lambda r: True):
        cand = {r: v for r, v in per.get(kind, {}).items() if pick(r) and v["value"] is not None}
        if not cand:
            return None
        r = max(cand, key=lambda k: cand[k]["value"])
        return {"rep": r, "value": cand[r]["value"], "ci": cand[r]["ci"]}

    values_best = best("model", lambda r: r.startswith("values."))
    proj = per.get("model", {}).get("projector", {}).get("value")
    summary = {
        "primary_metric": primary,
        "metrics": list(names),
        "n_units": run.n_units,
        "too_small": run.n_units < cfg.min_units,
        "best": best("model"),
        "best_values": values_best,
        "projector": proj,
        "encoder": per.get("model", {}).get("encoder", {}).get("value"),
        "lm_gain": (values_best["value"] - proj) if values_best and proj is not None else None,
        "oracle": per.get("oracle", {}).get("tokens", {}).get("value"),
        "oracle_majority": per.get("oracle", {}).get("tokens_majority", {}).get("value"),
        "oracle_encoder": per.get("oracle", {}).get("encoder_tokens", {}).get("value"),
        "control_best": best("control"),
        "control_best_values": best("control", lambda r: r.startswith("values.")),
        "chance": {r: v["value"] for r, v in per.get("chance", {}).items()},
        "per_rep": {k: {r: v["value"] for r, v in d.items()} for k, d in per.items()},
        "notes": run.notes,
        **extra,
    }
    return rows, summary


# ============================================================================= the job
def run_perceive(cfg: PerceiveConfig, task_data: Mapping[str, Any] | None = None, adapter=None) -> RunResult:
    """Run every task of `cfg` and write `cfg.out` (module docstring; docs/outputs.md).

    `task_data`: task -> TaskData to score instead of loading `cfg.data` (Python use, tests). `adapter`: the
    model of `cfg.model` already loaded (Python callers that run several analyses); None loads it."""
    from sightline.models import load_model
    from sightline.perception.represent import Featurizer, parameter_count, parse_reps, random_weights_like
    from sightline.runtime import resolve_placement

    tasks = check_config(cfg) if task_data is None else tuple(task_data)
    if task_data is not None:
        check_config(PerceiveConfig(**{**to_dict(cfg), "task": ",".join(tasks), "thresholds": tuple(cfg.thresholds),
                                 "reps": tuple(cfg.reps)}))
    out = check_output(cfg.out, cfg.overwrite, UserError)
    t0 = time.perf_counter()
    model_path, organism = resolve_model(cfg)
    enc_path, enc_why = _encoder_path(cfg, organism)
    device, model_dtype = resolve_placement(cfg.device, cfg.model_dtype, cfg.device_map)
    if adapter is None:
        adapter = load_model(model_path, dtype=model_dtype, device=device, device_map=cfg.device_map,
                             revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, progress=cfg.progress)
    asked = [r.strip() for x in cfg.reps for r in str(x).split(",") if r.strip()]
    skipped: dict[str, str] = {}
    if "encoder" in asked and enc_path is None:
        if tuple(cfg.reps) != DEFAULT_REPS:
            raise UserError(f"representation 'encoder' needs an external encoder ({enc_why}): pass --encoder PATH")
        asked.remove("encoder")
        skipped["encoder"] = enc_why or "no encoder"
    reps = parse_reps(asked, cfg.layers, cfg.heads, n_layers=adapter.n_layers, n_kv_heads=adapter.n_kv_heads,
                      n_vision_layers=adapter.n_vision_layers, kv_layers=getattr(adapter, "kv_layers", None),
                      vision_layers=cfg.vision_layers, encoder=enc_path is not None)
    example_rep = _example_rep(cfg, reps, adapter.n_layers)
    encoder = None
    if enc_path is not None and any(r.kind == "encoder" for r in reps):
        from sightline.perception.encoder import Encoder

        encoder = Encoder.load(enc_path, device=device, dtype="float32", layer=cfg.encoder_layer,
                               progress=cfg.progress)
    n_params = parameter_count(adapter)
    control = cfg.control if cfg.control is not None else n_params <= CONTROL_MAX_PARAMS
    kw = dict(prompt=cfg.prompt, query_prompt=cfg.query_prompt, prefix=cfg.prefix, view=cfg.view,
              query_alone=cfg.query_alone, batch_size=cfg.batch_size)
    featurizers = {"model": Featurizer(adapter, reps, encoder=encoder, **kw)}
    if control:
        ctrl = random_weights_like(adapter, cfg.seed)
        featurizers["control"] = Featurizer(ctrl, [r for r in reps if r.kind != "encoder"], **kw)
    src = _Sources(featurizers, reps, cfg.view)
    examples: dict[str, dict] = {}

    all_rows: list[dict] = []
    summaries: dict[str, dict] = {}
    warnings: list[str] = []
    with RunFolder(out, overwrite=cfg.overwrite) as tmp:
        write_json(tmp / "config.json", to_dict(cfg))
        with torch.no_grad():
            for task in tasks:
                rows, summary = _run_task(task, cfg, src, task_data, skipped, example_rep, examples)
                all_rows += rows
                summaries[task] = summary
                if summary["too_small"]:
                    warnings.append(f"{task}: only {summary['n_units']} units (fewer than {cfg.min_units}): "
                                    "its scores mean little")
                warnings += [f"{task}: {n}" for n in summary["notes"]]
        summary = {
            "out": str(out),
            "model": adapter.describe(),
            "organism": organism,
            "n_parameters": n_params,
            "control": control,
            "control_rule": ("--control/--no-control given" if cfg.control is not None else
                             f"auto: on for models up to {CONTROL_MAX_PARAMS:.0e} parameters (this one has "
                             f"{n_params:.3g})"),
            "encoder": enc_path,
            "reps": [r.name for r in reps],
            "skipped_reps": skipped,
            "tasks": summaries,
            "lm_gain": {t: s["lm_gain"] for t, s in summaries.items()},
            "warnings": warnings,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        result = {"summary": summary, "rows": all_rows}
        write_json(tmp / "results.json", result)
        from sightline.report.perception import write_perceive_page

        write_perceive_page(tmp, summary, all_rows, examples, subtitle=f"{summary['model']['name']} · {cfg.task}")
    return RunResult(out, summary)


def score_task(task: str, cfg: PerceiveConfig, featurizer, reps: Sequence[Any], task_data: Any = None,
               prefix_of: Callable[[Any], str] | None = None) -> tuple[list[dict], dict, dict]:
    """One task scored by one `Featurizer` over `reps` (no control, no examples), for studies built on the readouts:
    (flat rows, the task's summary, (kind, rep) -> statistic -> per-unit records (unit, group, num, den) for
    `grouped_stat` / `bootstrap_weights`). `task_data`: the task's TaskData (None: loaded as `cfg` says);
    `prefix_of(unit)`: each unit's text before its images ("" none; None: the featurizer's prefix)."""
    src = _Sources({"model": featurizer}, list(reps), cfg.view)
    records: dict = {}
    rows, summary = _run_task(task, cfg, src, None if task_data is None else {task: task_data}, {}, None, None,
                              prefix_of=prefix_of, records=records)
    return rows, summary, records


def _example_rep(cfg: PerceiveConfig, reps, n_layers: int) -> str | None:
    """The rep the qualitative figures show (`--example-rep`, checked against the reps read)."""
    from sightline.perception.examples import default_example_rep

    names = [r.name for r in reps]
    if cfg.example_rep is None:
        return default_example_rep(names, n_layers)
    if cfg.example_rep not in names:
        raise UserError(f"--example-rep {cfg.example_rep} is not among the representations read; use one of "
                        f"{', '.join(names[:8])}{', ...' if len(names) > 8 else ''}")
    return cfg.example_rep


def _run_task(task: str, cfg: PerceiveConfig, src: _Sources, task_data, skipped: dict, example_rep: str | None = None,
              examples: dict | None = None, prefix_of: Callable[[Any], str] | None = None,
              records: dict | None = None) -> tuple[list[dict], dict]:
    """Score one task; its qualitative examples go into `examples[task]`. `prefix_of(unit)`: each unit's text before
    its images ("" none); `records`: filled with (kind, rep) -> statistic -> the per-unit records."""
    from tqdm.auto import tqdm

    run = _TaskRun(task, cfg, src, example_rep)
    folds = [cfg.fold] if cfg.fold is not None else ([0, 1, 2, 3] if format_of(cfg, task) == "pascal5i"
                                                     and task == "fgseg" and task_data is None else [0])
    datas = [task_data[task]] if task_data is not None else [load_task_data(cfg, task, f) for f in folds]
    source = "; ".join(str(d.source) for d in datas)
    units = [u for d in datas for u in d.units]
    calibration = [u for d in datas for u in d.calibration]
    if cfg.limit is not None:
        units = units[: cfg.limit]
    if not units:
        raise UserError(f"{task}: the data holds no units ({source})")
    thresholds: dict = {}
    extra: dict[str, Any] = {"source": source, "format": datas[0].format, "folds": folds,
                             "skipped_reps": dict(skipped)}
    bar = tqdm(desc=task, total=len(units) + len(calibration if task in TEXT_TASKS else []), unit="unit",
               disable=not cfg.progress, dynamic_ncols=True)
    if task in TEXT_TASKS:
        no_query = [r.name for r in src.reps if not r.has_text_query]
        extra["skipped_reps"].update({r: "no text query (vision-side representation)" for r in no_query})
        cal = calibration
        if not cal:
            cal = units
            run.notes.append("no held-out calibration units: the threshold was chosen on the scored units")
        search: dict = {}
        for u in cal:
            if prefix_of is not None:
                src.unit_prefix = prefix_of(u)
            run.calibrate(u, search)
            bar.update(1)
        thresholds = {k: s.best() for k, s in search.items()}
        extra["thresholds"] = {f"{k}:{r}": {"threshold": float(v[0]), "calibration_miou": float(v[1])}
                               for (k, r), v in thresholds.items()}
        extra["n_calibration"] = len(cal)
        extra["query"] = ("the text run alone through the language model" if cfg.query_alone else
                          "the text after the image in the prompt") + ": its last token"
        thresholds = {k: float(v[0]) for k, v in thresholds.items()}
    step = {"fgseg": run.fgseg, "coseg": run.coseg, "semcorr": run.semcorr, "tempcorr": run.tempcorr}.get(task)
    for i, u in enumerate(units):
        if prefix_of is not None:
            src.unit_prefix = prefix_of(u)
        if task in TEXT_TASKS:
            run.textseg(i, u, thresholds)
        else:
            step(i, u)
        run.n_units += 1
        bar.update(1)
    bar.close()
    src.unit_prefix = None
    if records is not None:
        records.update({key: a.records for key, a in run.acc.items()})
    extra["read"] = _what_was_read(task, cfg, src)
    if examples is not None:
        examples[task] = run.examples.to_dict()
    return summarize_task(run, extra)


def _what_was_read(task: str, cfg: PerceiveConfig, src: _Sources) -> str:
    view = f"view {cfg.view}'s token grid"
    what = {
        "fgseg": f"{cfg.shots}-shot logistic classifier per token (support tokens foreground at >= "
                 f"{cfg.token_fraction:g} of their pixels), query tokens with p >= "
                 f"{cfg.classifier_threshold:g}",
        "coseg": f"{cfg.coseg_clusters} clusters over the set's tokens, kept when present in >= "
                 f"{cfg.coseg_vote_fraction:g} of its images",
        "textseg": "dot product of the class name's last token with the image tokens, normalised, thresholded",
        "refseg": "dot product of the expression's last token with the image tokens, normalised, thresholded; "
                  "pointing = the top pixel",
        "semcorr": f"nearest target token by cosine of each source keypoint's token; PCK@{cfg.pck_alpha:g}",
        "tempcorr": f"label propagation (top-{cfg.prop_topk}, {cfg.prop_n_last} last frames + the first, radius "
                    f"{cfg.prop_radius}, temperature {cfg.prop_temperature:g})",
    }[task]
    return f"{what}; on {view}" + (f", prefix {cfg.prefix!r}" if cfg.prefix else "")
