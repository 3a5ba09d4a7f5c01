"""What :func:`~mixres.integrations.hf.mrify` changes in each supported MLLM family.

A :class:`Family` names the model classes it covers and knows, for that family, which ViT
layer feeds the projector and how the model config and the processor learn the new image
size and token count. Supported:

- ``llava`` -- ``LlavaForConditionalGeneration`` (LLaVA-1.5, with a CLIP or a SigLIP tower): one
  square image of ``R`` px, padded to a square with the mean colour (LLaVA's ``expand2square``);
  ``vision_feature_layer`` -> -1, ``vision_feature_select_strategy`` -> ``"full"`` (the tower
  returns exactly the encoder's tokens), ``image_seq_length`` -> ``grid**2``; the processor's
  ``patch_size`` -> ``R / grid``, pad-to-square with the mean colour on.
- ``llava_next`` -- ``LlavaNextForConditionalGeneration`` (AnyRes): every tile, the base
  (whole-image) view included, is an ``R`` px image that goes through MRA on its own; the grid
  pinpoints are scaled from the old tile side to ``R`` (``[336, 672] -> [R, 2R]``), so images
  are cut into the same tile layouts as before. ``image_newline`` (the learned LLM-width
  vector) is kept and still ends every row of the unpadded tile-grid features, now rows of
  the new grid; the base view has no newlines, as before.
- ``paligemma`` -- ``PaliGemmaForConditionalGeneration`` (SigLIP): the tower's
  ``last_hidden_state`` (post-norm applied, as SigLIP does) feeds the linear projector; images
  are resized to ``R x R`` without padding, as PaliGemma's own processor does;
  ``text_config.num_image_tokens`` and the processor's ``image_seq_length`` -> ``grid**2``.

Today's SigLIP families live in their own modules (each keeps its own token reduction after the
encoder): ``llava_onevision`` (:mod:`.family_onevision`), ``gemma3`` (:mod:`.family_gemma3`),
``idefics3`` / ``smolvlm`` (:mod:`.family_idefics3`); Qwen2.5-VL and Qwen3-VL, whose ViTs read every image at
its own size, have their own mrify (``qwen2_5_vl`` / ``qwen3_vl``, :mod:`.family_qwen2_5_vl`). A family subclass overrides the hooks
:meth:`Family.check`, :meth:`Family.update_config`, :meth:`Family.update_model` and
:meth:`Family.update_processor`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import PreTrainedConfig
from transformers.image_utils import SizeDict

from .errors import UnsupportedModelError

__all__ = ["Family", "FAMILIES", "find_family", "vit_config_kwargs", "scale_pinpoints", "set_size"]


def vit_config_kwargs(config: PreTrainedConfig) -> dict[str, Any]:
    """The architecture arguments of a CLIP / SigLIP vision config (no bookkeeping keys)."""
    base = {f.name for f in dataclasses.fields(PreTrainedConfig)}
    own = [f.name for f in dataclasses.fields(type(config)) if f.name not in base]
    kwargs = {name: getattr(config, name) for name in own}
    kwargs["attn_implementation"] = config._attn_implementation
    return kwargs


def set_size(image_processor: Any, name: str, side: int) -> None:
    """Set ``image_processor.<name>`` (a size dict) to ``side``, keeping its form (shortest edge or h x w)."""
    old = getattr(image_processor, name, None)
    if old is None:
        return
    keys = dict(old) if not isinstance(old, SizeDict) else {k: v for k, v in old.__dict__.items() if v is not None}
    new = SizeDict(shortest_edge=side) if "shortest_edge" in keys else SizeDict(height=side, width=side)
    setattr(image_processor, name, new)


@dataclasses.dataclass(frozen=True)
class Family:
    """One MLLM family: its classes and how its config / processor take the new tower.

    Attributes:
        name: ``"llava"``, ``"llava_next"``, ``"paligemma"``, ``"llava_onevision"``, ``"gemma3"``, ...
        model_classes: the ``*ForConditionalGeneration`` / ``*Model`` class names covered.
        anyres: tiles (LLaVA-NeXT) rather than one square image.
        square_pad: whether images are padded to a square with the mean colour first.
        vision_attr: the attribute of the inner model that holds the ViT.
        nested_images: the processor takes one list of images per prompt (Gemma 3, Idefics3).
    """

    name: str
    model_classes: tuple[str, ...]
    anyres: bool = False
    square_pad: bool = True
    vision_attr: str = "vision_tower"
    nested_images: bool = False

    def check(self, model: Any, vision_config: Any) -> None:
        """Raise :class:`UnsupportedModelError` before anything changes if the family cannot take the tower."""

    def update_model(self, model: Any, vision_config: Any) -> None:
        """Adjust the model's own modules to the new token grid after the tower swap (none for LLaVA)."""

    def post_norm(self) -> bool | None:
        """Whether the ViT's post-norm applies to the features: LLaVA reads ``hidden_states`` (never
        normed); PaliGemma reads ``last_hidden_state`` (``None``: as the source does, i.e. SigLIP's)."""
        return None if self.name == "paligemma" else False

    def feature_layer(self, config: PreTrainedConfig) -> int:
        """The ViT layer the projector reads (``vision_feature_layer``; -1 for PaliGemma)."""
        if self.name == "paligemma":
            return -1
        layer = config.vision_feature_layer
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise UnsupportedModelError(
                f"vision_feature_layer={layer!r} concatenates several ViT layers; mrify supports one layer (an int), "
                "since MRA fuses into one token stream"
            )
        return layer

    def update_config(self, config: PreTrainedConfig, vision_config: Any, old_tile: int) -> None:
        """Point the model config at the new tower and its token count."""
        config.vision_config = vision_config
        tokens = vision_config.num_image_tokens
        if self.name == "paligemma":
            vision_config.projection_dim = config.projection_dim
            config.text_config.num_image_tokens = tokens
            return
        config.vision_feature_layer = -1
        config.vision_feature_select_strategy = "full"
        config.image_seq_length = tokens
        if self.anyres:
            config.image_grid_pinpoints = scale_pinpoints(config.image_grid_pinpoints, old_tile, vision_config.image_size)

    def update_processor(self, processor: Any, vision_config: Any, old_tile: int) -> None:
        """Image size, pinpoints, padding and the ``<image>`` expansion of the processor (in place)."""
        side, image_processor = vision_config.image_size, processor.image_processor
        set_size(image_processor, "size", side)
        set_size(image_processor, "crop_size", side)
        if self.name == "paligemma":
            processor.image_seq_length = image_processor.image_seq_length = vision_config.num_image_tokens
            return
        processor.patch_size = vision_config.patch_size
        processor.vision_feature_select_strategy = "full"
        processor.num_additional_image_tokens = 0
        if self.anyres:
            image_processor.image_grid_pinpoints = scale_pinpoints(image_processor.image_grid_pinpoints, old_tile, side)
        elif hasattr(image_processor, "do_pad"):
            image_processor.do_pad = True


def scale_pinpoints(pinpoints: list[list[int]], old_tile: int, new_tile: int) -> list[list[int]]:
    """AnyRes grid pinpoints in tiles of ``old_tile`` px, re-expressed in tiles of ``new_tile`` px.

    Example:
        >>> scale_pinpoints([[336, 672], [1008, 336]], 336, 768)
        [[768, 1536], [2304, 768]]
    """
    bad = [p for p in pinpoints if p[0] % old_tile or p[1] % old_tile]
    if bad:
        raise UnsupportedModelError(f"image_grid_pinpoints {bad} are not whole numbers of {old_tile}-px tiles; cannot rescale them")
    return [[p[0] // old_tile * new_tile, p[1] // old_tile * new_tile] for p in pinpoints]


from .family_gemma3 import GEMMA3  # noqa: E402  (the family modules subclass Family, defined above)
from .family_idefics3 import IDEFICS3, SMOLVLM  # noqa: E402
from .family_onevision import ONEVISION  # noqa: E402
from .family_qwen2_5_vl import QWEN2_5_VL, QWEN3_VL  # noqa: E402

FAMILIES: tuple[Family, ...] = (
    Family("llava", ("LlavaForConditionalGeneration", "LlavaModel")),
    Family("llava_next", ("LlavaNextForConditionalGeneration", "LlavaNextModel"), anyres=True, square_pad=False),
    Family("paligemma", ("PaliGemmaForConditionalGeneration", "PaliGemmaModel"), square_pad=False),
    ONEVISION,
    GEMMA3,
    IDEFICS3,
    SMOLVLM,
    QWEN2_5_VL,
    QWEN3_VL,
)


def find_family(model: object) -> Family:
    """The :class:`Family` of ``model``.

    Raises:
        UnsupportedModelError: the class is not one of the supported ones (listed).
    """
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        if names & set(family.model_classes):
            return family
    supported = [c for f in FAMILIES for c in f.model_classes if c.endswith("ForConditionalGeneration")]
    raise UnsupportedModelError(
        f"mrify supports {supported}, but got a {type(model).__name__}; a model whose vision tower is not a "
        "CLIP / SigLIP ViT inside one of these families (or Qwen2.5-VL's / Qwen3-VL's own ViT) has no place for MRA here"
    )
