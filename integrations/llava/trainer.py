"""``LlavaTrainer``: transformers' ``Trainer`` with what a LLaVA recipe needs.

Checkpoints are sealed and checked (:mod:`.checkpoints`): resume skips a torn last checkpoint,
refuses missing optimizer / scheduler / RNG state and another run's ``output_dir``; rotation
deletes only this run's checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import Trainer

from .checkpoints import SafeCheckpointsMixin
from .recipe import RecipeError

__all__ = ["LlavaTrainer"]


class LlavaTrainer(SafeCheckpointsMixin, Trainer):
    """``Trainer`` whose image-free batches still run the vision tower (weight 0 in the loss).

    Without it, a step where one process sees no image leaves the tower's parameters without a
    gradient there but not elsewhere: DDP waits for them and ZeRO-3 gathers them out of step.

    Keyword arguments besides ``Trainer``'s: ``overwrite_output_dir`` and
    ``allow_partial_resume`` (:class:`~.checkpoints.SafeCheckpointsMixin`).
    """

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, **kwargs: Any) -> Any:
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, **kwargs)
        if "pixel_values" not in inputs and model.training:
            loss = loss + 0.0 * self._blank_image_features(model)
        return (loss, outputs) if return_outputs else loss

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: Any = None) -> None:
        """Load a checkpoint's weights under the model's own parameter names.

        transformers writes LLaVA checkpoints with the original key names
        (``language_model.model.*``, ``vision_tower.*``) but ``Trainer`` loads them back with
        ``load_state_dict(strict=False)``, so no key would match and resuming would silently keep
        the fresh weights. The keys are renamed with transformers' own conversion mapping and
        every parameter has to be found. (DeepSpeed and FSDP checkpoints load their own way.)
        """
        model = model if model is not None else self.model
        file = Path(resume_from_checkpoint) / "model.safetensors"
        if self.is_deepspeed_enabled or self.is_fsdp_enabled or not file.is_file():
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        from safetensors.torch import load_file
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import PrefixChange, WeightRenaming, apply_renamings

        inner = self.accelerator.unwrap_model(model)
        renamings = [c for c in get_model_conversion_mapping(inner, add_legacy=False)
                     if isinstance(c, WeightRenaming) and not isinstance(c, PrefixChange)]
        state = {apply_renamings(k, renamings): v for k, v in load_file(file, device="cpu").items()}
        missing, unexpected = inner.load_state_dict(state, strict=False)
        loaded = {t.data_ptr() for n, t in inner.state_dict().items() if n in state}
        missing = [k for k in missing if inner.state_dict()[k].data_ptr() not in loaded]  # tied weights are saved once
        if missing or unexpected:
            raise RecipeError(f"checkpoint {str(resume_from_checkpoint)!r} does not fit the model: missing "
                              f"{missing[:5]}, unexpected {unexpected[:5]} ({len(missing)} / {len(unexpected)} keys)")

    def _blank_image_features(self, model: Any) -> torch.Tensor:
        inner = self.accelerator.unwrap_model(model)
        config = inner.config.vision_config
        side = int(config.image_size)
        ref = next(inner.model.multi_modal_projector.parameters())
        blank = torch.zeros(1, 3, side, side, device=ref.device, dtype=ref.dtype)
        features = inner.model.get_image_features(pixel_values=blank, vision_feature_layer=-1,
                                                  vision_feature_select_strategy="full").pooler_output
        return sum(f.sum() for f in features)
