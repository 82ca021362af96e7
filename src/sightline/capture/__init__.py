"""Capture: named sites -> tensors at chosen positions (read), and edits at sites (write)."""

from sightline.capture.capture import Capture
from sightline.capture.sites import KINDS, Site, parse_layers, resolve_sites, site_shape

__all__ = ["Capture", "KINDS", "Site", "parse_layers", "resolve_sites", "site_shape"]
