"""The errors of the transformers integration, all :class:`~mixres.errors.MixresError` s.

Each says what was received, what is expected and how to fix it, and is raised before any
model code runs.
"""

from __future__ import annotations

from mixres.errors import ConfigError, MixresError, WeightsError

__all__ = ["IntegrationError", "UnsupportedModelError", "ImageInputError", "PromptError", "ModelPathError"]


class IntegrationError(MixresError):
    """Base class of the errors raised by ``mixres.integrations.hf``."""


class UnsupportedModelError(IntegrationError, ConfigError):
    """The model is not a family :func:`~mixres.integrations.hf.mrify` knows, or its vision
    tower is not a CLIP / SigLIP ViT, or its settings cannot be kept (e.g. several feature layers)."""


class ImageInputError(IntegrationError):
    """An image that cannot be encoded: not an image, too small, or of an unsupported mode."""


class PromptError(IntegrationError):
    """Prompts that do not fit the images: ``<image>`` count differs from the image count."""


class ModelPathError(IntegrationError, WeightsError):
    """A model directory that does not exist or holds no ``config.json`` (nothing is downloaded)."""
