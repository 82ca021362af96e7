"""Zero-shot perception readouts from a VLM's image tokens (Liu et al., COLM 2025). See docs/perception.md."""
