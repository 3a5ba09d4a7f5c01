"""The recipe under sharded data parallelism: FSDP2 (``fully_shard``) and DeepSpeed ZeRO-3.

Three things plain DDP does not need:

- **A wrap policy** (:func:`fsdp_wrap_classes`): FSDP shards and gathers parameters per unit.
  When the user names no ``transformer_layer_cls_to_wrap``, :func:`configure` sets one unit per
  LLM decoder layer (the LLM's ``_no_split_modules``), per repeated block of each pathway
  (a ViT's layers, a CNN's stages), per adapter and for the final fusion; embeddings, the
  projector and the LM head stay in the root unit. Only the encoder contract (``parts()``) is
  used, so every registered encoder gets a policy.
- **A gathered export** (:func:`export_model`): under FSDP / ZeRO-3 no process holds the whole
  model, so the final save, the LoRA merge and the evaluation run on a plain copy rebuilt on the
  main process from the gathered full state dict.
- **Partitioned encoders** (:func:`save_partitioned`): under ``deepspeed.zero.Init`` a
  parameter holds only its shard (``param.data`` is ``torch.Size([0])``), which is how the
  release's ZeRO-3 fine-tuning failed to load ConvNeXt weights. mixres's weight loaders gather
  partitioned parameters before loading (:func:`mixres.pathways.gathered`); this
  module gathers them to save.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["prepare", "fsdp_wrap_classes", "configure", "freeze_unreached", "is_sharded", "export_model", "save_partitioned"]

logger = logging.getLogger(__name__)


def _repeated_block_class(part: torch.nn.Module) -> str:
    """The class of the children of ``part``'s biggest container of >= 2 same-class modules.

    A ViT's ``encoder.layers`` (``CLIPEncoderLayer``), a ConvNeXt's ``stages``
    (``ConvNeXtStage``, which hold more than any one stage's ``blocks``), the adapters'
    ``ModuleList`` (``MRAdapter``); a part without one (a final fusion) is its own unit.
    """
    best, best_size = type(part).__name__, 0
    for module in part.modules():
        if not isinstance(module, (torch.nn.ModuleList, torch.nn.Sequential)) or len(module) < 2:
            continue
        names = Counter(type(child).__name__ for child in module)
        if len(names) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = next(iter(names)), size
    if isinstance(part, (torch.nn.ModuleList, torch.nn.Sequential)) and best_size == 0:
        best = type(next(iter(part))).__name__ if len(part) else best
    return best


def fsdp_wrap_classes(model: Any) -> list[str]:
    """Class names to wrap as FSDP units: the LLM's decoder layers and each encoder part's blocks.

    Args:
        model: a recipe model (a transformers Llava whose tower is a mixres encoder).

    Returns:
        Sorted class names, e.g. ``['CLIPEncoderLayer', 'ConvNeXtStage', 'LlamaDecoderLayer',
        'MRAdapter', 'MRFinalFusion']`` for ``llava-hr-*`` on a Llama.
    """
    names = set(getattr(model.model.language_model, "_no_split_modules", None) or [])
    for part in model.model.vision_tower.encoder.parts().values():
        if isinstance(part, torch.nn.Module) and any(True for _ in part.parameters()):
            names.add(_repeated_block_class(part))
    return sorted(names)


def prepare(training: Any) -> bool:
    """Before the model is built: give DeepSpeed the job's process group when it has none yet.

    On a GPU, accelerate starts ``deepspeed.comm`` with the process group (``PartialState``,
    ``use_deepspeed``); with ``--use_cpu true`` it starts a gloo group with ``torch.distributed``
    only. ``deepspeed.zero.Init`` (transformers builds every sub-model under it when the config
    is ZeRO-3) then reads the world size from an unstarted ``deepspeed.comm`` as 1 and fails:
    ``train_batch_size is not equal to micro_batch_per_gpu * gradient_acc_step * world_size
    8 != 4 * 1 * 1`` (``deepspeed/runtime/config.py``, ``_batch_assertion``; the config is read
    before ``zero.Init`` starts the comm itself). This starts ``deepspeed.comm`` on the existing
    group (no new one is made). Returns whether it did; without DeepSpeed, or when the comm is
    already up (every GPU job), it does nothing.

    Args:
        training: the ``TrainingArguments`` (their devices set up: ``training.world_size`` read).

    Raises:
        RecipeError: a DeepSpeed job on a machine without GPUs launched without ``--use_cpu
            true``: accelerate then sets up no process group, transformers fills the config's
            ``"auto"`` batch size for 1 process while DeepSpeed counts the launcher's (``4 != 4 * 1 * 2``).
    """
    import os

    import torch.distributed as dist

    if not getattr(training, "deepspeed", None):
        return False
    launched = int(os.environ.get("WORLD_SIZE", training.world_size))  # torchrun, deepspeed, accelerate set it
    if launched > training.world_size:
        from .recipe import RecipeError

        raise RecipeError(f"DeepSpeed: the launcher started {launched} processes but the trainer sees "
                          f"{training.world_size} (no GPU here?); on CPU pass --use_cpu true")
    if training.world_size < 2 or not dist.is_initialized():
        return False
    from deepspeed import comm

    if comm.is_initialized():
        return False
    comm.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False, verbose=False)
    return True


def configure(trainer: Any, model: Any) -> list[str] | None:
    """Give an FSDP trainer the recipe's wrap policy when the user named no classes to wrap.

    Works however FSDP was switched on (``accelerate launch --config_file fsdp.yaml`` or
    ``--fsdp`` / ``--fsdp_config``): the plugin is read from ``trainer.accelerator`` before
    ``train()`` prepares the model. Returns the classes wrapped (``None`` without FSDP).
    """
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None) or _fsdp_on_cpu(trainer)
    if plugin is None:
        return None
    frozen = freeze_unreached(model)
    if frozen:
        logger.info("frozen (no forward pass reaches them): %s", frozen)
    policy = plugin.auto_wrap_policy
    if getattr(policy, "func", policy) is not transformer_auto_wrap_policy and policy is not None:
        return plugin.transformer_cls_names_to_wrap  # size-based or the user's own: left alone
    if not plugin.transformer_cls_names_to_wrap:
        plugin.transformer_cls_names_to_wrap = fsdp_wrap_classes(model)
        plugin.auto_wrap_policy = transformer_auto_wrap_policy
    logger.info("FSDP units: %s", plugin.transformer_cls_names_to_wrap)
    return list(plugin.transformer_cls_names_to_wrap)


def freeze_unreached(model: Any) -> list[str]:
    """Freeze the tower's trainable parameters that no forward pass reaches; returns their names.

    CLIP's ``post_layernorm`` (LLaVA reads the blocks' tokens without it) or a CNN's classifier
    head are in the pathways' parts but get no gradient. Such a parameter never changes (AdamW
    skips it), so freezing it changes no number; but under FSDP its missing optimizer state
    makes a checkpoint impossible to resume (torch.distributed.checkpoint saves the optimizer
    state that exists, then on load expects one for every trainable parameter). Found by one
    forward and backward of the tower on a blank image at the configured size.
    """
    inner = model.model
    side = int(model.config.vision_config.image_size)
    ref = next(inner.multi_modal_projector.parameters())
    tower = [(n, p) for n, p in inner.vision_tower.named_parameters() if p.requires_grad]
    if not tower:
        return []
    blank = torch.zeros(1, 3, side, side, device=ref.device, dtype=ref.dtype)
    with torch.enable_grad():
        features = inner.get_image_features(pixel_values=blank, vision_feature_layer=-1,
                                            vision_feature_select_strategy="full").pooler_output
        total = sum(f.float().sum() for f in features)
        grads = torch.autograd.grad(total, [p for _, p in tower], allow_unused=True)  # no .grad is touched
    unreached = [n for (n, p), g in zip(tower, grads) if g is None]
    for n, p in tower:
        if n in unreached:
            p.requires_grad_(False)
    return [f"model.vision_tower.{n}" for n in unreached]


def _fsdp_on_cpu(trainer: Any) -> Any | None:
    """Switch a CPU job that asked for FSDP to FSDP; returns the plugin (``None``: none asked).

    accelerate (1.15) selects ``DistributedType.FSDP`` only for accelerator backends
    (``AcceleratorState``: the GPU-like distributed types), so on CPU an FSDP config silently
    runs DDP. PyTorch's FSDP2 itself runs on CPU over gloo; this sets the shared accelerate state
    to FSDP with the plugin the user configured (``--fsdp`` / ``fsdp_config``, or the
    ``FSDP_*`` variables ``accelerate launch --config_file`` sets), before ``train()`` prepares
    the model, so the CPU job runs the same accelerate / Trainer FSDP code as a GPU job.
    """
    import os

    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = trainer.accelerator.state
    asked = trainer.args.fsdp_plugin_args is not None or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or state.distributed_type != DistributedType.MULTI_CPU:
        return None
    plugin = FullyShardedDataParallelPlugin(**(trainer.args.fsdp_plugin_args or {}))
    state.distributed_type = DistributedType.FSDP
    # and in PartialState's shared dict, as AcceleratorState.__init__ itself does: every later
    # AcceleratorState() (AcceleratedOptimizer makes one) copies PartialState's values over its own.
    # Without this the job fell back to MULTI_CPU once the optimizer was prepared, and resuming a
    # FULL_STATE_DICT checkpoint hung: accelerate's load_fsdp_model took its FSDP1 path on rank 1
    # (return early) while rank 0 waited in set_model_state_dict's broadcast from rank 0.
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.fsdp_plugin = plugin
    trainer.is_fsdp_enabled = True
    return plugin


def is_sharded(trainer: Any) -> bool:
    """Whether no process holds the whole model (FSDP, or DeepSpeed ZeRO-3)."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    if getattr(trainer, "is_deepspeed_enabled", False):
        from transformers.integrations import is_deepspeed_zero3_enabled

        return bool(is_deepspeed_zero3_enabled())
    return False


def export_model(trainer: Any, rebuild: Callable[[], Any]) -> Any | None:
    """A plain (unsharded) copy of the trained model on the main process; ``None`` elsewhere.

    Every process joins the gather (``accelerator.get_state_dict``: FSDP2 full state dict on
    rank 0, ZeRO-3 consolidated 16-bit weights); the main process loads it into
    ``rebuild()`` (the same architecture, LoRA adapters included when the stage had them),
    refusing missing or unexpected keys.

    Raises:
        RuntimeError: the gathered state does not fit the rebuilt model.
    """
    wrapped = trainer.model_wrapped if getattr(trainer, "is_deepspeed_enabled", False) else trainer.model
    state = trainer.accelerator.get_state_dict(wrapped)  # full tensors on the main process only
    if not trainer.is_world_process_zero():
        return None
    model = rebuild()
    own = model.state_dict()
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if own[k].data_ptr() in {own[j].data_ptr() for j in state if j in own}}
    missing = [k for k in missing if k not in tied]
    if missing or unexpected:
        raise RuntimeError(f"the gathered state does not fit the rebuilt model: missing {missing[:5]}, unexpected "
                           f"{unexpected[:5]} ({len(missing)} / {len(unexpected)} keys)")
    return model


def save_partitioned(dst: str | Path, encoder: torch.nn.Module) -> Path | None:
    """:func:`mixres.convert.save_converted` for an encoder built under ``deepspeed.zero.Init``.

    Gathers the partitioned parameters (every process joins), writes on rank 0 only and
    returns the directory there (``None`` on the other ranks). A plain encoder is saved as is.
    """
    import torch.distributed as dist

    from mixres.convert import save_converted
    from mixres.pathways import gathered

    with gathered(encoder, modifier_rank=None):
        if dist.is_initialized() and dist.get_rank() != 0:
            return None
        return save_converted(dst, encoder)
