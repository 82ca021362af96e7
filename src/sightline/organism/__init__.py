"""The model organism: a small LLaVA trained from scratch on the synthetic world, shipped in the package.

`checkpoint_path()` is the shipped checkpoint's folder (an ordinary Hugging Face folder);
`load_organism()` loads it through the same adapter as any real checkpoint. `organism_encoder_path()`
is its vision tower as stage 1 of training left it (a CLIPVisionModel folder), before the language
model was trained on it: the baseline for `sightline perceive --encoder`.
"""

from __future__ import annotations

from pathlib import Path

CHECKPOINT = Path(__file__).parent / "checkpoint"
VISION_STAGE1 = CHECKPOINT / "vision_stage1"


def checkpoint_path() -> Path:
    """Folder of the shipped organism checkpoint."""
    from sightline.errors import UserError

    if not (CHECKPOINT / "config.json").exists():
        raise UserError(f"no model organism checkpoint in {CHECKPOINT}; train one with "
                        "`sightline organism train --out DIR` and use DIR/model")
    return CHECKPOINT


def organism_encoder_path() -> Path:
    """Folder of the shipped organism's vision tower after stage 1 (same seed and recipe), for `--encoder`."""
    from sightline.errors import UserError

    if not (VISION_STAGE1 / "config.json").exists():
        raise UserError(f"no stage-1 vision tower in {VISION_STAGE1}; train one with "
                        "`sightline organism train --out DIR` and use DIR/vision_stage1")
    return VISION_STAGE1


def load_organism(dtype: str = "float32", device: str | None = None):
    """The shipped organism as a sightline adapter."""
    from sightline.models import load_model

    return load_model(str(checkpoint_path()), dtype=dtype, device=device)
