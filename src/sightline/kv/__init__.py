"""The KV cache of image tokens: input-agnostic keys, attention blocking, text prefixes and surfacing."""
