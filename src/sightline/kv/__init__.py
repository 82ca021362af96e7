"""The KV cache of image tokens (Liu et al. part 2): input-agnostic keys (detection, blocking) and what they do to
answers and perception; text prefixes; perception present in the values but not surfaced in the answer (surfacing)."""

from sightline.kv.block import (
                                answer_accuracy,
                                block_edits,
                                blocked_answers,
                                foreground_readout,
                                left_padded,
                                lowest_keys,
                                query_heads,
                                random_block_set,
)
from sightline.kv.keys import (
                                FLAG_THRESHOLD,
                                KeyMoments,
                                KeyScan,
                                plant_constant_keys,
                                scan_keys,
)

__all__ = ["FLAG_THRESHOLD", "KeyMoments", "KeyScan", "answer_accuracy", "block_edits", "blocked_answers",
           "foreground_readout", "left_padded", "lowest_keys", "plant_constant_keys", "query_heads", "random_block_set",
           "scan_keys"]
