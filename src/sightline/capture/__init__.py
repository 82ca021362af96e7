"""Capture: named sites -> tensors at chosen positions (read), and edits at sites (write)."""

from sightline.capture.capture import Capture
from sightline.capture.edit import Edit, add_vector, apply_edits, replace_with
from sightline.capture.sites import KINDS, Site, parse_layers, resolve_sites, site_shape

__all__ = ["Capture", "Edit", "KINDS", "Site", "add_vector", "apply_edits", "parse_layers", "replace_with",
           "resolve_sites", "site_shape"]
