"""The model organism: a small LLaVA trained from scratch on the synthetic world, shipped in the package.

`checkpoint_path()` is the shipped checkpoint's folder (an ordinary Hugging Face folder);
`load_organism()` loads it through the same adapter as any real checkpoint.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).parent / "checkpoint"


def checkpoint_path() -> Path:
    """Folder of the shipped organism checkpoint."""
    from sightline.errors import UserError

    if not (CHECKPOINT / "config.json").exists():
        raise UserError(f"no model organism checkpoint in {CHECKPOINT}; train one with "
                        "`sightline organism train --out DIR` and use DIR/model")
    return CHECKPOINT


def load_organism(dtype: str = "float32", device: str | None = None):
    """The shipped organism as a sightline adapter."""
    from sightline.models import load_model

    return load_model(str(checkpoint_path()), dtype=dtype, device=device)
