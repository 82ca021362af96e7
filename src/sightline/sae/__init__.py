"""Sparse autoencoders on image and text tokens: architectures (models.py), the trainer (train.py), directions in
the SAE basis (directions.py) and sparse probes over latents (sparse_probe.py).

Names are imported on first use, so that `python -m sightline.sae.train` (e.g. under torchrun)
does not import the trainer twice.
"""

from __future__ import annotations

from typing import Any

_EXPORTS = {
    "ARCHITECTURES": "sightline.sae.models",
    "ExplainDirectionConfig": "sightline.sae.directions",
    "explain_directions": "sightline.sae.directions",
    "SparseProbeConfig": "sightline.sae.sparse_probe",
    "run_sparse_probes": "sightline.sae.sparse_probe",
    "SAE": "sightline.sae.models",
    "SAEConfig": "sightline.sae.models",
    "register_architecture": "sightline.sae.models",
    "SAETrainConfig": "sightline.sae.train",
    "sae_grid": "sightline.sae.train",
    "train_saes": "sightline.sae.train",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        import importlib

        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'sightline.sae' has no attribute {name!r}")
