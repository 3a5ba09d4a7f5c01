"""Pathways: backbone wrappers. The base contracts import nothing heavy; each concrete wrapper
imports its library (transformers, open_clip, timm) only when it is built."""

from .base import MapPathway, TokenPathway, check_images

__all__ = ["MapPathway", "TokenPathway", "check_images"]
