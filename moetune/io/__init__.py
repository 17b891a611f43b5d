"""Layer 2, files: atomic writes, the adapter format, the base model's provenance. Imports config and core."""
