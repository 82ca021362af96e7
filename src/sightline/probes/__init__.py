"""Linear probes: decode a label from pooled activations at every site and layer of a store."""

from sightline.probes.control import control_labels
from sightline.probes.directions import (
    class_mean_direction,
    class_mean_directions,
    load_directions,
    load_vector,
    probe_direction,
    probe_directions,
    save_directions,
)
from sightline.probes.features import POOLINGS, Features, pool_features, resolve_labels, synthetic_token_labels
from sightline.probes.linear import DEFAULT_L2_GRID, LinearProbe, LogisticProbe, load_probes, save_probes
from sightline.probes.metrics import per_class_accuracy, selectivity, topk_accuracy
from sightline.probes.run import ProbeConfig, run_probes, select_sites

__all__ = [
    "DEFAULT_L2_GRID", "POOLINGS", "Features", "LinearProbe", "LogisticProbe", "ProbeConfig",
    "class_mean_direction", "class_mean_directions", "control_labels", "load_directions", "load_probes",
    "load_vector", "per_class_accuracy", "pool_features", "probe_direction", "probe_directions",
    "resolve_labels", "run_probes", "save_directions", "save_probes", "select_sites", "selectivity",
    "synthetic_token_labels", "topk_accuracy",
]
