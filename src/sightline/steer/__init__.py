"""Steering: add k * v (a class-direction difference) at image tokens and measure what the model now says.

Reproduces "Line of Sight" (Rajaram et al. 2025): v = direction(target) - direction(source) at
resid.L, added at the image-token positions during the prefill, greedy decoding from the edited
KV cache; efficacy (forced choice), flip rate of the free answer, and damage, swept over k.
"""

from sightline.steer.generate import MODES, POSITION_CHOICES, left_pad, steer_edit, steered_generate
from sightline.steer.measure import (answer_logprobs, caption_nll, efficacy_from_logprobs, first_answer_token,
                                     mentions)
from sightline.steer.run import (SteerConfig, headline, parse_pairs, parse_scales, run_steering,
                                 summarize)
from sightline.steer.vectors import (DIRECTIONS_FILE, NORMALIZATIONS, class_means, direction_layers,
                                     load_directions, lookup, mean_image_norms, normalize, steering_vector)

__all__ = [
    "DIRECTIONS_FILE", "MODES", "NORMALIZATIONS", "POSITION_CHOICES", "SteerConfig", "answer_logprobs",
    "caption_nll", "class_means", "direction_layers", "efficacy_from_logprobs", "first_answer_token", "headline",
    "left_pad", "load_directions", "lookup", "mean_image_norms", "mentions", "normalize", "parse_pairs",
    "parse_scales", "run_steering", "steer_edit", "steered_generate", "steering_vector", "summarize",
]
