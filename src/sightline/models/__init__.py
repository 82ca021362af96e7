"""Model adapters: one file per VLM family, the TokenLayout, and loading."""

from sightline.models.base import Adapter, Batch, ModuleNames, adapter_for_config, load_model, supported
from sightline.models.layout import (
    INDEX_COLUMNS,
    MODALITIES,
    StoredLayout,
    TokenLayout,
    ViewGrid,
    mask_to_tokens,
    point_to_token,
    tokens_to_pixels,
)

__all__ = [
    "Adapter", "Batch", "INDEX_COLUMNS", "MODALITIES", "ModuleNames", "StoredLayout", "TokenLayout", "ViewGrid",
    "adapter_for_config",
    "load_model", "mask_to_tokens", "point_to_token", "supported", "tokens_to_pixels",
]
