"""sightline: read, measure and edit what a VLM's language model knows about its image."""

__version__ = "0.1.0"
