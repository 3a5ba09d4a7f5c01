"""``idefics3`` / ``smolvlm``: what :func:`~mixres.integrations.hf.mrify` changes in Idefics3 and SmolVLM.

``Idefics3ForConditionalGeneration`` / ``SmolVLMForConditionalGeneration`` split an image into
square tiles of ``max_image_size`` px plus one global view, run each through their SigLIP
(``Idefics3VisionTransformer``, bucketed position embeddings; the ``hf_idefics3`` / ``hf_smolvlm``
pathways) and read its ``last_hidden_state`` (post-norm applied). The connector's pixel shuffle
(``scale_factor`` s: s x s neighbouring tokens folded into one of s**2 times the width) then a
linear map are their own token reduction, kept after the encoder: MRA's grid ``g = max(R / 32, native)`` per
tile becomes ``(g / s)**2`` LLM tokens (``g`` has to be a multiple of ``s``).

mrify sets the tile side to ``R`` (``max_image_size``), scales the processor's longest-edge
``size`` by ``R / old_tile`` (so images are cut into the same tile layouts) and sets the
processor's ``image_seq_len``. The tower ignores ``patch_attention_mask``: the processor's real
tiles are full ``R x R`` images (the tests check it), and the all-zero padding tiles are dropped by
the model before the tower, as before. These models build their ViT class directly from the config
(not through ``AutoModel``), so a mrified model becomes a :class:`MixresIdefics3ForConditionalGeneration`
/ :class:`MixresSmolVLMForConditionalGeneration` (``model_type`` ``mixres_idefics3`` /
``mixres_smolvlm``, registered with the Auto classes): the same model whose ``vision_model`` is
a :class:`~mixres.integrations.hf.modeling.MixresVisionModel`, so ``save_pretrained`` /
``from_pretrained`` round-trip.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Model,
    SmolVLMConfig,
    SmolVLMForConditionalGeneration,
    SmolVLMModel,
)
from transformers.configuration_utils import SubConfigSpec

from .errors import UnsupportedModelError
from .families import Family
from .modeling import MixresVisionModel

__all__ = [
    "Idefics3Family", "IDEFICS3", "SMOLVLM", "MixresIdefics3Config", "MixresIdefics3ForConditionalGeneration",
    "MixresSmolVLMConfig", "MixresSmolVLMForConditionalGeneration",
]


def _mixres_config(base: type, model_type: str) -> type:
    defaults = {**base.sub_configs_defaults, "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="mixres_vision")}
    return type(f"Mixres{base.__name__}", (base,), {"model_type": model_type, "sub_configs_defaults": defaults,
                                                    "__doc__": f"{base.__name__} whose vision_config is a MixresVisionConfig."})


MixresIdefics3Config = _mixres_config(Idefics3Config, "mixres_idefics3")
MixresSmolVLMConfig = _mixres_config(SmolVLMConfig, "mixres_smolvlm")


def _mixres_inner(base: type) -> type:
    def __init__(self, config: Any) -> None:
        # the source's __init__ builds its ViT class from config.vision_config; we re-state it with our tower
        super(base, self).__init__(config)
        self.padding_idx = config.text_config.pad_token_id
        self.vocab_size = config.text_config.vocab_size
        self.vision_model = MixresVisionModel._from_config(config.vision_config)
        self.connector = type(self)._connector_class(config)
        self.text_model = AutoModel.from_config(config.text_config)
        self.image_seq_len = int(config.vision_config.num_image_tokens)
        self.image_token_id = config.image_token_id
        self.post_init()

    connector = {Idefics3Model: "Idefics3Connector", SmolVLMModel: "SmolVLMConnector"}[base]
    module = __import__(base.__module__, fromlist=[connector])
    return type(f"Mixres{base.__name__}", (base,), {"__init__": __init__, "_connector_class": getattr(module, connector)})


def _mixres_outer(base: type, inner: type, config_class: type) -> type:
    def __init__(self, config: Any) -> None:
        super(base, self).__init__(config)  # as the source's __init__, with the inner model above
        self.model = inner(config)
        self.image_token_id = config.image_token_id
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.vocab_size = config.text_config.vocab_size
        if base is SmolVLMForConditionalGeneration:
            self.model.text_model.generation_config = GenerationConfig.from_model_config(config)
        self.post_init()

    return type(f"Mixres{base.__name__}", (base,), {
        "__init__": __init__, "config_class": config_class,
        "__doc__": f"{base.__name__} whose ``model.vision_model`` is a MixresVisionModel (mrified).",
    })


MixresIdefics3ForConditionalGeneration = _mixres_outer(
    Idefics3ForConditionalGeneration, _mixres_inner(Idefics3Model), MixresIdefics3Config)
MixresSmolVLMForConditionalGeneration = _mixres_outer(
    SmolVLMForConditionalGeneration, _mixres_inner(SmolVLMModel), MixresSmolVLMConfig)
for _config, _model in ((MixresIdefics3Config, MixresIdefics3ForConditionalGeneration),
                        (MixresSmolVLMConfig, MixresSmolVLMForConditionalGeneration)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModelForImageTextToText.register(_config, _model, exist_ok=True)

_MIXRES = {"idefics3": (MixresIdefics3Config, MixresIdefics3ForConditionalGeneration),
           "smolvlm": (MixresSmolVLMConfig, MixresSmolVLMForConditionalGeneration)}


class Idefics3Family(Family):
    """Idefics3 / SmolVLM: tiles of ``R`` px, the pixel-shuffle connector kept, ``(g / s)**2`` tokens per tile."""

    def post_norm(self) -> bool | None:
        """``None``: the post-norm on the last block, as ``last_hidden_state`` has it."""
        return None

    def feature_layer(self, config: Any) -> int:
        """The last block (the connector reads ``last_hidden_state``)."""
        return -1

    def check(self, model: Any, vision_config: Any) -> None:
        """The MRA grid has to be a multiple of the connector's ``scale_factor``."""
        scale, grid = model.config.scale_factor, vision_config.image_size // vision_config.patch_size
        if grid % scale:
            raise UnsupportedModelError(
                f"{self.name}'s connector folds {scale}x{scale} tokens into one, but image_size {vision_config.image_size} "
                f"gives a {grid}x{grid} grid; pick an image_size whose grid (max(image_size / 32, the ViT's native grid)) is a multiple of {scale}"
            )

    def update_config(self, config: Any, vision_config: Any, old_tile: int) -> None:
        """Tower config; ``num_image_tokens`` -> the per-tile count after the pixel shuffle."""
        grid = vision_config.image_size // vision_config.patch_size
        vision_config.num_image_tokens = (grid // config.scale_factor) ** 2
        config.vision_config = vision_config

    def update_model(self, model: Any, vision_config: Any) -> None:
        """Become the Mixres* class of this family (same modules; ``config`` of the Mixres* type)."""
        config_class, model_class = _MIXRES[self.name]
        data = model.config.to_dict()
        data.pop("model_type", None)
        data["vision_config"] = vision_config
        config = config_class(**data)
        model.__class__, model.config = model_class, config
        model.model.config = config
        model.model.image_seq_len = int(vision_config.num_image_tokens)

    def update_processor(self, processor: Any, vision_config: Any, old_tile: int) -> None:
        """Tile side ``R``, the longest-edge size scaled by ``R / old_tile``, ``image_seq_len``."""
        side, image_processor = vision_config.image_size, processor.image_processor
        image_processor.max_image_size = {"longest_edge": side}
        longest = dict(image_processor.size)["longest_edge"]
        image_processor.size = {"longest_edge": longest * side // old_tile}
        processor.image_seq_len = int(vision_config.num_image_tokens)


# only the *ForConditionalGeneration classes: the model (and its config) change class on mrify
IDEFICS3 = Idefics3Family("idefics3", ("Idefics3ForConditionalGeneration",), square_pad=False, vision_attr="vision_model",
                          nested_images=True)
SMOLVLM = Idefics3Family("smolvlm", ("SmolVLMForConditionalGeneration",), square_pad=False, vision_attr="vision_model",
                          nested_images=True)
