"""regionembed: region-level embeddings and explainability for CLIP-like models."""

__version__ = "0.1.0"
