"""Steered greedy generation: add k * v at a site and chosen positions of a left-padded batch, then decode.

Two modes (`mode`):
    "prefill"     the paper's protocol: k * v is added at the chosen positions (default: the image
                  tokens) during the prefill only; greedy decoding then continues from the edited
                  KV cache, the generated tokens themselves unedited.
    "every_step"  as "prefill", and k * v is also added at the same site to every generated token
                  (the token fed back at each decoding step), as in activation-addition steering of
                  language models. With positions="image" the two modes differ only through this,
                  since the image tokens are computed once, in the prefill.

Batches are left-padded (`sightline.capture.edit.left_pad`: generation appends columns on the right), so
an example's sequence position p sits in column p + pad of the padded tensor; edits address those columns. Each row of a
batch can carry its own k, so a sweep over k runs as one batch of (image, k) rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sightline.capture.edit import Edit, left_pad, stop_ids
from sightline.errors import UserError

MODES = ("prefill", "every_step")
POSITION_CHOICES = ("image", "text", "all", "last")


def steer_positions(layouts, pads: Sequence[int], positions: str | Sequence[np.ndarray] = "image") -> list[np.ndarray]:
    """Columns of a left-padded batch to edit, per example: "image" (placeholder tokens, newlines
    included), "text", "all" (every real token), "last" (the last prompt token), or explicit arrays
    of each example's own sequence positions."""
    out = []
    for i, (lay, pad) in enumerate(zip(layouts, pads)):
        if isinstance(positions, str):
            if positions not in POSITION_CHOICES:
                raise UserError(f"unknown steering positions {positions!r}: use one of {', '.join(POSITION_CHOICES)}")
            pos = np.array([len(lay) - 1]) if positions == "last" else lay.positions(positions)
        else:
            pos = np.asarray(positions[i], dtype=np.int64)
            if len(pos) and (pos.min() < 0 or pos.max() >= len(lay)):
                raise UserError(f"steering positions of example {i} fall outside its {len(lay)} tokens")
        out.append(np.asarray(pos, dtype=np.int64) + pad)
    return out


def row_scaled_add(vector_d: torch.Tensor, scales_b: torch.Tensor):
    """Edit function adding scales_b[row] * vector to the edited rows of each batch row."""

    def fn(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        # in float32, then back: in bf16/fp16 a small k * v would round away against a large residual
        s = scales_b.to(device=x.device, dtype=torch.float32)[rows]
        return (x.float() + s[:, None] * vector_d.to(device=x.device, dtype=torch.float32)).to(x.dtype)

    return fn


def steer_edit(site: str, vector_d: torch.Tensor, scales_b, columns: list[np.ndarray], mode: str = "prefill",
               later_columns: np.ndarray | None = None) -> Edit:
    """The one Edit that steers a batch: `columns` in the prefill; with mode="every_step" also
    `later_columns` (columns the later forward calls cover: generated or teacher-forced tokens)."""
    if mode not in MODES:
        raise UserError(f"unknown steering mode {mode!r}: use one of {', '.join(MODES)}")
    scales_b = torch.as_tensor(np.broadcast_to(np.asarray(scales_b, dtype=np.float64), (len(columns),)).copy(),
                               dtype=torch.float32)
    if mode == "every_step" and later_columns is not None and len(later_columns):
        extra = np.asarray(later_columns, dtype=np.int64)
        columns = [np.union1d(c, extra) for c in columns]
    return Edit(site, list(columns), row_scaled_add(vector_d, scales_b), prefill_only=(mode == "prefill"))


@torch.no_grad()
def generate_ids(adapter, images, prompts: Sequence[str], site: str | None = None, vector: torch.Tensor | None = None,
                 scales: float | Sequence[float] = 0.0, positions: str | Sequence[np.ndarray] = "image",
                 mode: str = "prefill", max_new_tokens: int = 24) -> list[list[int]]:
    """Greedy new token ids for ONE left-padded batch of (image, prompt) rows, steered when site and
    vector are given (scales: one k for all rows or one per row); eos and padding stripped."""
    from sightline.capture.edit import apply_edits

    texts = [adapter.render_prompt(p) for p in prompts]
    inputs, pads, batch = left_pad(adapter, images, texts)
    inputs = {k: v.to(adapter.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    S = inputs["input_ids"].shape[1]
    tok = adapter.tokenizer
    gen = dict(max_new_tokens=max_new_tokens, do_sample=False)
    if adapter.model.generation_config.pad_token_id is None and tok.pad_token_id is not None:
        gen["pad_token_id"] = tok.pad_token_id
    edits = []
    if site is not None and vector is not None:
        cols = steer_positions(batch.layouts, pads, positions)
        edits.append(steer_edit(site, vector, scales, cols, mode, np.arange(S, S + max_new_tokens)))
    with apply_edits(adapter, edits):
        out = adapter.model.generate(**inputs, **gen)
    new = out[:, S:].tolist()
    stop = stop_ids(adapter)
    result = []
    for row in new:
        keep = []
        for t in row:
            if t in stop:
                break
            keep.append(t)
        result.append(keep)
    return result


def steered_generate(adapter, images, prompts: Sequence[str], site: str | None = None,
                     vector: torch.Tensor | None = None, scales: float | Sequence[float] = 0.0,
                     positions: str | Sequence[np.ndarray] = "image", mode: str = "prefill",
                     max_new_tokens: int = 24, batch_size: int = 16, progress: bool = False) -> list[str]:
    """Greedy answers (decoded, stripped) of many (image, prompt[, k]) rows, in batches of batch_size."""
    from tqdm.auto import tqdm

    n = len(images)
    if len(prompts) != n:
        raise ValueError("one prompt per image")
    scales_n = np.broadcast_to(np.asarray(scales, dtype=np.float64), (n,))
    out: list[str] = []
    tok = adapter.tokenizer
    for k in tqdm(range(0, n, batch_size), desc="generate", disable=not progress, dynamic_ncols=True):
        sl = slice(k, k + batch_size)
        pos = positions if isinstance(positions, str) else list(positions)[sl]
        ids = generate_ids(adapter, list(images[sl]), list(prompts[sl]), site, vector, scales_n[sl], pos, mode,
                           max_new_tokens)
        out += [t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True)]
    return out
