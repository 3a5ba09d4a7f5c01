"""transformers integration: MRA inside HF MLLMs.

Families :func:`mrify` takes (:data:`FAMILIES`): LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, PaliGemma,
Gemma 3, Idefics3, SmolVLM, Qwen2.5-VL and Qwen3-VL (their own packed ViTs: :mod:`.family_qwen2_5_vl`).

Importing this package registers :class:`MixresVisionConfig` / :class:`MixresVisionModel` with
``AutoConfig`` / ``AutoModel`` (``model_type = "mixres_vision"``), so mrified models load with
the Auto classes once it is imported. Public API:

- :func:`mrify`: an existing model + processor -> the same with a dual-pathway encoder;
- :func:`generate`: batched generation from PIL images and prompts;
- :func:`load_pretrained`: a local directory -> ``(model, processor)``;
- :func:`~mixres.integrations.hf.convert.convert_llava_hr`: an official LLaVA-HR checkpoint ->
  a transformers Llava directory with this tower (``mixres.integrations.hf.convert``);
- :mod:`~mixres.integrations.hf.chat`: the ``mixres chat`` command;
- :mod:`~mixres.integrations.hf.images`: pad to square with the mean colour, mode checks;
- :mod:`~mixres.integrations.hf.tiny`: tiny random models for tests and docs.
"""

from .errors import ImageInputError, IntegrationError, ModelPathError, PromptError, UnsupportedModelError
from .families import FAMILIES, Family, find_family
from .images import check_image, pad_to_square, reference_pixel_values
from .inference import generate, load_pretrained
from .modeling import MixresVisionConfig, MixresVisionModel, register_auto_classes
from .mrify import mrify
from .projector import MixresLlavaForConditionalGeneration, MixresProjector, llava_class_for

register_auto_classes()

__all__ = [
    "mrify",
    "generate",
    "load_pretrained",
    "MixresVisionConfig",
    "MixresVisionModel",
    "register_auto_classes",
    "MixresLlavaForConditionalGeneration",
    "MixresProjector",
    "llava_class_for",
    "Family",
    "FAMILIES",
    "find_family",
    "check_image",
    "pad_to_square",
    "reference_pixel_values",
    "IntegrationError",
    "UnsupportedModelError",
    "ImageInputError",
    "PromptError",
    "ModelPathError",
]
