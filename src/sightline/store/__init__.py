"""ActivationStore: sharded half-precision activations per site plus a per-token index, on disk."""

from sightline.store.format import FORMAT_VERSION, INDEX_COLUMNS, MODALITIES
from sightline.store.reader import ActivationStore
from sightline.store.writer import StoreWriter

__all__ = ["FORMAT_VERSION", "INDEX_COLUMNS", "MODALITIES", "ActivationStore", "StoreWriter"]
