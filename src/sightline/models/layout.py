"""TokenLayout: which position of a sequence is which image, view, row, col and pixel box.

Every adapter describes the token grids it produces as a list of `ViewGrid`s (one per image and
view) and `TokenLayout.build` places them on the sequence. The pixel geometry of a grid is an
axis-aligned affine map from token-grid coordinates to ORIGINAL image pixels, which is exact for
every resize / centre-crop / pad / unpad that the supported processors do:

    x_pixel = origin_x + col_coord * step_x        y_pixel = origin_y + row_coord * step_y

where (row_coord, col_coord) are continuous grid coordinates (token (r, c) spans [c, c+1) x
[r, r+1)). Boxes are clipped to the image, so a token over padding has an empty box.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

MODALITIES = ("text", "image", "image_newline", "special")
TEXT, IMAGE, IMAGE_NEWLINE, SPECIAL = range(4)
INDEX_COLUMNS = ("example", "position", "modality", "image", "view", "row", "col")


@dataclass(frozen=True)
class ViewGrid:
    """One token grid of one image: its shape, where it sits in the sequence, and its pixel geometry."""

    image: int
    view: int  # 0 = base/global view; 1.. = high-resolution map or tiles
    rows: int
    cols: int
    image_size_hw: tuple[int, int]  # ORIGINAL image (height, width) in pixels
    origin_xy: tuple[float, float]  # pixel coordinate of grid coordinate (0, 0)
    step_xy: tuple[float, float]  # pixels per token along x (cols) and y (rows)
    newline: bool = False  # an image_newline token follows each row
    interpolated: bool = False  # tokens are resampled, not 1:1 with vision patches
    # Where the vision tower's features for this grid live, for `vision.{i}` capture: one entry per
    # token (row-major) giving the flat index into the image's vision sequence (crop * seq + patch),
    # or -1 where no single patch corresponds. None when the family maps vision features itself.
    vision_index: np.ndarray | None = field(default=None, compare=False, repr=False)
    # Exact unclipped pixel spans per column [cols, 2] (x0, x1) and per row [rows, 2] (y0, y1), for
    # grids that are affine only piecewise: anyres tiles whose patches do not fill the tile
    # (LLaVA-OneVision: 27 patches of 14 px cover 378 of each 384-px tile). When set they override
    # origin/step (which then hold the mean pitch, for summaries); None: affine.
    col_spans: np.ndarray | None = field(default=None, compare=False, repr=False)
    row_spans: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def n_tokens(self) -> int:
        """Tokens this grid occupies in the sequence, newlines included."""
        return self.rows * (self.cols + int(self.newline))

    def spans(self) -> tuple[np.ndarray, np.ndarray]:
        """Unclipped pixel spans of the columns [cols, 2] (x0, x1) and of the rows [rows, 2] (y0, y1)."""

        def axis(explicit, n, origin, step):
            if explicit is not None:
                return np.asarray(explicit, np.float64).reshape(n, 2)
            k = np.arange(n, dtype=np.float64)
            return np.stack([origin + k * step, origin + (k + 1) * step], axis=1)

        return (
            axis(self.col_spans, self.cols, self.origin_xy[0], self.step_xy[0]),
            axis(self.row_spans, self.rows, self.origin_xy[1], self.step_xy[1]),
        )

    def boxes(self) -> np.ndarray:
        """Pixel boxes (x0, y0, x1, y1) of the grid's tokens, [rows, cols, 4], clipped to the image."""
        h, w = self.image_size_hw
        xs, ys = self.spans()
        x0, x1 = np.clip(xs[:, 0], 0, w), np.clip(xs[:, 1], 0, w)
        y0, y1 = np.clip(ys[:, 0], 0, h), np.clip(ys[:, 1], 0, h)
        out = np.empty((self.rows, self.cols, 4), dtype=np.float32)
        out[..., 0] = x0[None, :]
        out[..., 1] = y0[:, None]
        out[..., 2] = x1[None, :]
        out[..., 3] = y1[:, None]
        return out

    def to_json(self, first_position: int | None = None) -> dict:
        """The grid's facts as JSON (what a store keeps per example under `layout`): enough to map the
        stored (row, col) back to pixels. `first_position`: where the grid starts in the sequence."""
        out = {"image": self.image, "view": self.view, "rows": self.rows, "cols": self.cols}
        if first_position is not None:
            out["first_position"] = int(first_position)
        xs, ys = self.spans()
        out.update({
            "newline": self.newline,
            "interpolated": self.interpolated,
            "image_size_hw": [int(v) for v in self.image_size_hw],
            "origin_xy": [float(v) for v in self.origin_xy],
            "step_xy": [float(v) for v in self.step_xy],
            # exact per-column / per-row pixel spans (x0, x1) / (y0, y1): differ from origin + k * step
            # where crops are not whole patches (LLaVA-OneVision's 384-px tiles)
            "col_spans": np.round(xs, 4).tolist(),
            "row_spans": np.round(ys, 4).tolist(),
        })
        return out

    @classmethod
    def from_json(cls, d: dict) -> ViewGrid:
        """The grid `to_json` wrote (vision_index is not kept)."""
        spans = {k: (np.asarray(d[k], np.float64) if d.get(k) is not None else None)
                 for k in ("col_spans", "row_spans")}
        return cls(image=int(d["image"]), view=int(d["view"]), rows=int(d["rows"]), cols=int(d["cols"]),
                   image_size_hw=tuple(int(v) for v in d["image_size_hw"]),
                   origin_xy=tuple(float(v) for v in d["origin_xy"]), step_xy=tuple(float(v) for v in d["step_xy"]),
                   newline=bool(d.get("newline", False)), interpolated=bool(d.get("interpolated", False)), **spans)

    def pixel_to_grid(self, x: float, y: float) -> tuple[float, float]:
        """Continuous grid coordinates (row, col) of an original-image pixel coordinate.

        NaN along an axis where the point falls in a gap between spans (seen by no token).
        """
        if self.col_spans is None and self.row_spans is None:
            return (y - self.origin_xy[1]) / self.step_xy[1], (x - self.origin_xy[0]) / self.step_xy[0]
        xs, ys = self.spans()
        return _span_coord(float(y), ys), _span_coord(float(x), xs)


def _span_coord(v: float, spans: np.ndarray) -> float:
    """Continuous grid coordinate of v along an axis given by sorted spans; NaN inside a gap."""
    if len(spans) == 0:
        return float("nan")
    k = int(np.searchsorted(spans[:, 0], v, side="right")) - 1
    k0 = min(max(k, 0), len(spans) - 1)  # before the first / past the last span: extrapolate
    x0, x1 = spans[k0]
    if 0 <= k < len(spans) - 1 and v >= x1:
        return float("nan")
    return k0 + (v - x0) / (x1 - x0)


def _span_index(v: np.ndarray, spans: np.ndarray) -> np.ndarray:
    """Index of the span holding each value, -1 where none does."""
    if len(spans) == 0:
        return np.full(len(v), -1)
    k = np.searchsorted(spans[:, 0], v, side="right") - 1
    inside = (k >= 0) & (v < spans[np.maximum(k, 0), 1])
    return np.where(inside, k, -1)


@dataclass
class TokenLayout:
    """Per-position facts of one sequence (arrays of length seq_len) plus its grids."""

    modality: np.ndarray  # int8 codes into MODALITIES
    image: np.ndarray  # int32, -1 off images
    view: np.ndarray
    row: np.ndarray
    col: np.ndarray
    box: np.ndarray  # float32 [seq, 4] (x0, y0, x1, y1) in original pixels; NaN off image tokens
    interpolated: np.ndarray  # bool
    grids: list[ViewGrid]
    grid_start: list[int]  # sequence position of each grid's first token

    @classmethod
    def build(
        cls,
        input_ids: np.ndarray,
        image_token_id: int,
        grids_per_image: list[list[ViewGrid]],
        special_ids: set[int] = frozenset(),
        extra_tokens_per_image: int = 0,
    ) -> TokenLayout:
        """Place each image's grids, in order, on the runs of `image_token_id` in `input_ids`.

        `extra_tokens_per_image` counts image-token positions before each image's grids that
        belong to no grid (a CLS token kept by the "full" feature strategy). The check that the
        grids fill the placeholder runs exactly is what catches a wrong layout.
        """
        ids = np.asarray(input_ids)
        n = len(ids)
        modality = np.where(np.isin(ids, list(special_ids)), SPECIAL, TEXT).astype(np.int8)
        image = np.full(n, -1, np.int32)
        view, row, col = image.copy(), image.copy(), image.copy()
        box = np.full((n, 4), np.nan, np.float32)
        interp = np.zeros(n, bool)
        is_img = ids == image_token_id
        positions = np.flatnonzero(is_img)
        # image tokens of different images may be adjacent, so split by the expected counts
        counts = [sum(g.n_tokens for g in gs) + extra_tokens_per_image for gs in grids_per_image]
        if sum(counts) != len(positions):
            raise ValueError(
                f"layout mismatch: the grids need {sum(counts)} image tokens, the sequence has {len(positions)}"
            )
        grids: list[ViewGrid] = []
        starts: list[int] = []
        k = 0
        for gs in grids_per_image:
            if extra_tokens_per_image:
                modality[positions[k : k + extra_tokens_per_image]] = IMAGE
                image[positions[k : k + extra_tokens_per_image]] = gs[0].image if gs else -1
                k += extra_tokens_per_image
            for g in gs:
                pos = positions[k : k + g.n_tokens]
                if len(pos) and pos[-1] - pos[0] != g.n_tokens - 1:
                    raise ValueError(f"layout mismatch: image {g.image} view {g.view} is not contiguous")
                starts.append(int(pos[0]) if len(pos) else -1)
                grids.append(g)
                width = g.cols + int(g.newline)
                rr, cc = np.divmod(np.arange(g.n_tokens), width)
                is_nl = cc == g.cols
                image[pos] = g.image
                view[pos] = g.view
                row[pos] = rr
                col[pos] = np.where(is_nl, -1, cc)
                modality[pos] = np.where(is_nl, IMAGE_NEWLINE, IMAGE)
                interp[pos] = g.interpolated & ~is_nl
                b = g.boxes()
                box[pos[~is_nl]] = b[rr[~is_nl], cc[~is_nl]]
                k += g.n_tokens
        return cls(modality, image, view, row, col, box, interp, grids, starts)

    def __len__(self) -> int:
        return len(self.modality)

    @property
    def image_positions(self) -> np.ndarray:
        """Positions of image tokens (newlines included): exactly HF's image-token placeholder positions."""
        return np.flatnonzero((self.modality == IMAGE) | (self.modality == IMAGE_NEWLINE))

    @property
    def text_positions(self) -> np.ndarray:
        """Positions of text tokens (chat-template special tokens included)."""
        return np.flatnonzero((self.modality == TEXT) | (self.modality == SPECIAL))

    def positions(self, which: str) -> np.ndarray:
        """Positions for a `--positions` choice: image, text or all."""
        if which == "image":
            return self.image_positions
        if which == "text":
            return self.text_positions
        if which == "all":
            return np.arange(len(self))
        raise ValueError(f"positions must be image, text or all, not {which!r}")

    def grid(self, image: int = 0, view: int = 0) -> ViewGrid:
        """The grid of one image and view."""
        return find_grid(self.grids, image, view)

    def grid_positions(self, image: int = 0, view: int = 0) -> np.ndarray:
        """Sequence positions of a grid's tokens as [rows, cols] (newlines left out)."""
        i = next(i for i, g in enumerate(self.grids) if g.image == image and g.view == view)
        g, start = self.grids[i], self.grid_start[i]
        width = g.cols + int(g.newline)
        return start + np.arange(g.rows)[:, None] * width + np.arange(g.cols)[None, :]

    def index_rows(self, positions: np.ndarray, example: int) -> np.ndarray:
        """The store's index rows [n, 7] (INDEX_COLUMNS) for chosen positions of this sequence."""
        p = np.asarray(positions, dtype=np.int64)
        return np.stack(
            [np.full(len(p), example), p, self.modality[p], self.image[p], self.view[p], self.row[p], self.col[p]],
            axis=1,
        ).astype(np.int32)

    def summary(self) -> dict:
        """JSON-able description: counts per modality and each grid's shape and place."""
        counts = {m: int((self.modality == i).sum()) for i, m in enumerate(MODALITIES)}
        grids = [
            {
                "image": g.image,
                "view": g.view,
                "rows": g.rows,
                "cols": g.cols,
                "newline": g.newline,
                "interpolated": g.interpolated,
                "first_position": s,
                "n_tokens": g.n_tokens,
                "pixels_per_token_xy": [round(float(v), 3) for v in g.step_xy],
            }
            for g, s in zip(self.grids, self.grid_start)
        ]
        return {"seq_len": len(self), "tokens": counts, "grids": grids}


class StoredLayout:
    """The grids of a stored example (its `layout` JSON, `ViewGrid.to_json` each), with TokenLayout's
    `grid(image, view)`: enough for `mask_to_tokens` and `tokens_to_pixels`."""

    def __init__(self, grids_json: list[dict]):
        self.grids = [ViewGrid.from_json(g) for g in grids_json]
        self.grid_start = [g.get("first_position") for g in grids_json]

    def grid(self, image: int = 0, view: int = 0) -> ViewGrid:
        """The grid of one image and view (KeyError if the example has none)."""
        return find_grid(self.grids, image, view)


def find_grid(grids, image: int = 0, view: int = 0) -> ViewGrid:
    """The grid of one image and view among `grids`; KeyError if none."""
    for g in grids:
        if g.image == image and g.view == view:
            return g
    raise KeyError(f"no grid for image {image} view {view}")


def mask_to_tokens(layout: TokenLayout, mask_hw: np.ndarray, image: int = 0, view: int = 0) -> np.ndarray:
    """Fraction of each token's pixel box covered by a boolean/float mask, as [rows, cols].

    Exact pixel-area integration with an integral image: each original pixel counts by the
    fraction of it that lies inside the box, so fractional boxes (e.g. 14.7 px per token) are fine.
    Tokens with an empty box (over padding) get NaN.
    """
    g = layout.grid(image, view)
    m = np.asarray(mask_hw, dtype=np.float64)
    if m.shape != tuple(g.image_size_hw):
        raise ValueError(f"mask shape {m.shape} != image size {tuple(g.image_size_hw)}")
    b = g.boxes().astype(np.float64)
    area = _box_integral(m, b)
    size = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(size > 0, area / np.where(size > 0, size, 1), np.nan)


def _box_integral(m: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Sum of m over continuous boxes b[..., (x0, y0, x1, y1)], pixels weighted by overlap."""
    # Separable: integrate along y with a cumulative sum, then along x, using linear interpolation
    # of the cumulative sums, which is exact for a piecewise-constant image.
    h, w = m.shape
    cy = np.concatenate([np.zeros((1, w)), np.cumsum(m, axis=0)], axis=0)  # [h+1, w]

    def interp_rows(y):  # cumulative sums at fractional y -> [..., w]
        y0 = np.clip(np.floor(y).astype(int), 0, h - 1)
        t = (y - y0)[..., None]
        return cy[y0] * (1 - t) + cy[np.minimum(y0 + 1, h)] * t

    strip = interp_rows(b[..., 3]) - interp_rows(b[..., 1])  # [..., w]: column sums inside [y0, y1]
    cx = np.concatenate([np.zeros(strip.shape[:-1] + (1,)), np.cumsum(strip, axis=-1)], axis=-1)

    def interp_cols(x):
        x0 = np.clip(np.floor(x).astype(int), 0, w - 1)
        t = x - x0
        a = np.take_along_axis(cx, x0[..., None], -1)[..., 0]
        c = np.take_along_axis(cx, np.minimum(x0 + 1, w)[..., None], -1)[..., 0]
        return a * (1 - t) + c * t

    return interp_cols(b[..., 2]) - interp_cols(b[..., 0])


def point_to_token(layout: TokenLayout, xy: tuple[float, float], image: int = 0, view: int = 0) -> int:
    """Sequence position of the token whose box holds pixel coordinate (x, y); -1 if none does."""
    g = layout.grid(image, view)
    h, w = g.image_size_hw
    x, y = xy
    if not (0 <= x <= w and 0 <= y <= h):
        return -1
    r, c = g.pixel_to_grid(x, y)
    if np.isnan(r) or np.isnan(c):  # in a gap between tiles' patches
        return -1
    r, c = int(np.floor(r)), int(np.floor(c))
    # a point on the far edge belongs to the last token
    r, c = min(r, g.rows - 1), min(c, g.cols - 1)
    if r < 0 or c < 0:
        return -1
    return int(layout.grid_positions(image, view)[r, c])


def tokens_to_pixels(
    layout: TokenLayout, scores_rc: np.ndarray, image: int = 0, view: int = 0
) -> np.ndarray:
    """Paint per-token scores [rows, cols] back onto the original image: [H, W] float, NaN uncovered.

    Each pixel takes the score of the token whose box holds the pixel's centre.
    """
    g = layout.grid(image, view)
    s = np.asarray(scores_rc, dtype=np.float32)
    if s.shape != (g.rows, g.cols):
        raise ValueError(f"scores shape {s.shape} != grid shape {(g.rows, g.cols)}")
    h, w = g.image_size_hw
    if g.col_spans is None and g.row_spans is None:
        rr = np.floor((np.arange(h) + 0.5 - g.origin_xy[1]) / g.step_xy[1]).astype(int)
        cc = np.floor((np.arange(w) + 0.5 - g.origin_xy[0]) / g.step_xy[0]).astype(int)
    else:
        xs, ys = g.spans()
        rr, cc = _span_index(np.arange(h) + 0.5, ys), _span_index(np.arange(w) + 0.5, xs)
    okr = (rr >= 0) & (rr < g.rows)
    okc = (cc >= 0) & (cc < g.cols)
    out = np.full((h, w), np.nan, np.float32)
    out[np.ix_(okr, okc)] = s[np.ix_(rr[okr], cc[okc])]
    return out
