"""Token pathways over Idefics3's and SmolVLM's SigLIP ViTs: ``hf_idefics3`` and ``hf_smolvlm``.

Source: ``Idefics3VisionTransformer`` (transformers ``models/idefics3/modeling_idefics3.py``) and
``SmolVLMVisionTransformer`` (``models/smolvlm/modeling_smolvlm.py``): SigLIP blocks whose
position embeddings are looked up by *bucketed fractional coordinates* (NaViT-style, Patch
n' Pack) instead of being interpolated. The wrapper holds the unchanged model as ``.model`` (its
``state_dict`` keys are transformers' own, prefixed ``model.``) and splits its forward into the
three calls of the token-pathway contract:

- :meth:`~HFIdefics3Pathway.embed`: the model's own ``embeddings(pixels, patch_attention_mask)``
  with every patch valid, so any ``(H, W)`` grid gets exactly the positions the source gives it
  (we do not resample bicubically as ``hf_siglip`` does: the source never does);
- :meth:`run_blocks`: encoder layers ``start .. end-1`` (attention mask None: every patch valid);
- :meth:`finalize`: ``post_layernorm``, which the source applies to ``last_hidden_state`` (what
  the Idefics3 / SmolVLM connector reads), so ``post_norm=None`` applies it for the last block.

No prefix token. Weights: as ``hf_siglip`` (``weights`` a local ``save_pretrained`` directory of
the vision transformer, or a weight file of it).
"""

from __future__ import annotations

import torch

from ..registry import register_pathway
from .base import check_images
from .hf import HFVisionPathway

__all__ = ["HFIdefics3Pathway", "HFSmolVLMPathway"]


class HFIdefics3Pathway(HFVisionPathway):
    """transformers ``Idefics3VisionTransformer`` as a token pathway (``hf_idefics3``).

    Arguments as :class:`~mixres.pathways.hf.HFVisionPathway` (``config`` takes
    ``Idefics3VisionConfig`` keyword arguments).

    Example:
        >>> vit = HFIdefics3Pathway(dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        ...                              num_attention_heads=4, patch_size=8, image_size=32))
        >>> tokens, grid = vit(torch.randn(1, 3, 32, 48))
        >>> tokens.shape, grid, vit.num_prefix_tokens
        (torch.Size([1, 24, 32]), (4, 6), 0)
    """

    _model_class = "Idefics3VisionTransformer"
    _config_class = "Idefics3VisionConfig"
    _source_post_norm = True

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patchify and add the source's bucketed position embeddings (every patch valid).

        Args:
            images (Tensor[B, 3, H, W]): normalised images; ``H, W`` multiples of ``patch_size``.

        Returns:
            ``(x (Tensor[B, h*w, C]), (h, w))``.

        Raises:
            ShapeError: not ``Tensor[B, 3, H, W]`` of floats, or a side not a multiple of the patch.
            DeviceError: ``images`` are not on the pathway's device.
        """
        check_images(images, self.patch_size, module=self)
        emb = self.model.embeddings
        grid = (images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size)
        valid = torch.ones((images.shape[0], *grid), dtype=torch.bool, device=images.device)
        x = emb(pixel_values=images.to(emb.patch_embedding.weight.dtype), patch_attention_mask=valid)
        return x, grid


class HFSmolVLMPathway(HFIdefics3Pathway):
    """transformers ``SmolVLMVisionTransformer`` as a token pathway (``hf_smolvlm``); as ``hf_idefics3``."""

    _model_class = "SmolVLMVisionTransformer"
    _config_class = "SmolVLMVisionConfig"


register_pathway("hf_idefics3")(HFIdefics3Pathway)
register_pathway("hf_smolvlm")(HFSmolVLMPathway)
