"""autotune: hardware-aware per-layer compression plans for PyTorch / Hugging Face models."""

__version__ = "0.1.0"
