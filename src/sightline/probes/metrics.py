"""Probe metrics: top-k and per-class accuracy, chance levels, and selectivity against a control task."""

from __future__ import annotations

import numpy as np
import torch


def topk_accuracy(logits: torch.Tensor, y: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Fraction of rows whose true class is among the k highest logits; logits [..., n, K], y [n] or [..., n]."""
    k = min(int(k), logits.shape[-1])
    top = logits.topk(k, dim=-1).indices  # [..., n, k]
    y = torch.as_tensor(y, device=logits.device).long()
    hit = (top == y[..., None]).any(-1)
    return hit.double().mean(-1)


def per_class_accuracy(pred: np.ndarray, y: np.ndarray, n_classes: int) -> np.ndarray:
    """Recall of each class [K] (NaN for classes absent from y)."""
    pred, y = np.asarray(pred), np.asarray(y)
    out = np.full(n_classes, np.nan)
    for c in range(n_classes):
        m = y == c
        if m.any():
            out[c] = float((pred[m] == c).mean())
    return out


def chance_levels(y_train: np.ndarray, y_test: np.ndarray, n_classes: int) -> dict[str, float]:
    """Uniform chance (1/K) and the majority-class rate: test accuracy of always answering the
    commonest training class."""
    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    major = int(np.bincount(y_train, minlength=n_classes).argmax()) if len(y_train) else 0
    return {"uniform": 1.0 / max(n_classes, 1),
            "majority": float((y_test == major).mean()) if len(y_test) else float("nan")}


def site_metrics(logits_nk: torch.Tensor, y: np.ndarray, classes: list[str]) -> dict:
    """top1, top5, balanced accuracy and per-class accuracy of one probe's logits on one split; top5 is None
    with 5 classes or fewer (it would be 1 by construction)."""
    y_t = torch.as_tensor(np.asarray(y), dtype=torch.long)
    logits_nk = logits_nk.detach().float().cpu()
    pred = logits_nk.argmax(-1).numpy()
    pc = per_class_accuracy(pred, y_t.numpy(), len(classes))
    return {
        "n": int(len(y_t)),
        "top1": float(topk_accuracy(logits_nk, y_t, 1)) if len(y_t) else float("nan"),
        "top5": (float(topk_accuracy(logits_nk, y_t, 5)) if len(y_t) else float("nan")) if len(classes) > 5 else None,
        "balanced": float(np.nanmean(pc)) if np.isfinite(pc).any() else float("nan"),
        "per_class": {c: (None if np.isnan(a) else float(a)) for c, a in zip(classes, pc)},
    }


def selectivity(task_accuracy: float, control_accuracy: float) -> float:
    """Hewitt & Liang (2019): task accuracy minus control-task accuracy (same probe family, same split)."""
    return float(task_accuracy) - float(control_accuracy)
