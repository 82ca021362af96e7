"""Keys and values of image tokens: input-agnostic keys (detection, blocking) and what they do to answers and perception."""

from sightline.kv.keys import FLAG_THRESHOLD, KeyMoments, KeyScan, plant_constant_keys, scan_keys

__all__ = ["FLAG_THRESHOLD", "KeyMoments", "KeyScan", "plant_constant_keys", "scan_keys"]
