"""Capture: named sites -> tensors at chosen positions (read), and edits (write): activation edits at sites, attention blocks."""

from sightline.capture.capture import Capture, cache_kwarg
from sightline.capture.edit import BlockAttention, Edit, add_vector, apply_edits, left_pad, replace_with, stop_ids
from sightline.capture.sites import KINDS, Site, SiteHook, parse_layers, resolve_site, resolve_sites, site_shape

__all__ = ["KINDS", "BlockAttention", "Capture", "Edit", "Site", "SiteHook", "add_vector", "apply_edits",
           "cache_kwarg", "left_pad", "parse_layers", "replace_with", "resolve_site", "resolve_sites", "site_shape",
           "stop_ids"]
