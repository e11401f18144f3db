"""Relay: a session-aware runner for SDXL LoRA training on free notebook GPUs."""

__version__ = "0.1.0"
