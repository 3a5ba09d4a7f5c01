"""The dual-pathway encoder of LLaVA-HR: a high-res map pathway beside a low-res ViT.

Source: arXiv 2403.03003 Sec. 3 and Fig. 2; released as ``MultiPathCLIPVisionTower`` in
``llava_hr/model/multimodal_encoder/multipath_encoder_wapper.py``. Order of computation as
released:

1. the whole map pathway (CNN) runs on the high-res image;
2. the ViT input is the same normalised tensor resized (bilinear, ``align_corners=True``) to the
   size the resolution policy gives (:mod:`mixres.encoders.resolution`);
3. ViT blocks run in slices; after block ``k`` of each injection its fusion mixes the chosen map
   stage into the tokens (prefix/CLS rows are set aside and never seen by the fusion);
4. the optional final fusion mixes a map into the selected layer's tokens.

Where we differ: any token pathway / map pathway / fusion, any number of injections at any
blocks, non-square images, frozen parts as flags.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import to_2tuple
from ..errors import ConfigError, ShapeError
from ..pathways.base import MapPathway, TokenPathway, check_images
from ..registry import build_if_config, register_encoder
from .base import Encoder
from .resolution import check_policy, vit_input_size

__all__ = ["DualPathwayEncoder", "PARTS", "llava_hr_injections"]

#: the parts a dual-pathway encoder may have (:meth:`DualPathwayEncoder.parts` lists those it uses)
PARTS: tuple[str, ...] = ("token_pathway", "map_pathway", "adapters", "final_fusion")
Stage = int | tuple[int, ...]


def llava_hr_injections(num_blocks: int, fusion: Mapping[str, Any], map_stage: int = -1) -> list[dict[str, Any]]:
    """Injections after blocks L/4, L/2 and 3L/4 (6, 12, 18 of 24), as LLaVA-HR places them.

    Example:
        >>> blocks = [i["after_block"] for i in llava_hr_injections(24, {"name": "mr_adapter"})]
        >>> blocks
        [6, 12, 18]
    """
    if num_blocks % 4:
        raise ConfigError(f"LLaVA-HR places adapters at L/4 steps; num_blocks={num_blocks} is not a multiple of 4")
    return [{"after_block": k * num_blocks // 4, "map_stage": map_stage, "fusion": dict(fusion)} for k in (1, 2, 3)]


def _select(maps: list[torch.Tensor], stage: Stage) -> torch.Tensor | list[torch.Tensor]:
    return [maps[s] for s in stage] if isinstance(stage, tuple) else maps[stage]


class DualPathwayEncoder(Encoder):
    """A token pathway (ViT) with fusions of a map pathway's (CNN's) maps between its blocks.

    Args:
        token_pathway: a registered token pathway, its config, or its registered name.
        map_pathway: a registered map pathway, its config, or its registered name.
        injections: ``[{"after_block": k, "map_stage": s, "fusion": <fusion or config>}]``; ``s``
            is a stage index or a list of them (a multi-source fusion such as ``sva`` or
            ``channel_concat`` then gets a list of maps); the fusion's ``low_dim``/``high_dim``
            default to the ViT width and the stage's width (a list for several stages).
            In-stream fusions keep the width and the grid.
        final_fusion: optional fusion (or config) applied to the selected layer's tokens; it may
            change the width and the grid (``sva`` with ``query_grid``): :meth:`grid_for` follows.
        final_map_stage: which map stage(s) the final fusion reads (default the last).
        resolution: the resolution policy (:func:`~mixres.encoders.resolution.check_policy`).
        freeze: parts whose parameters get no gradient (:meth:`parts`): any of ``token_pathway``,
            ``map_pathway``, ``adapters``, ``final_fusion``.
        grad_checkpointing: recompute both pathways' activations in the backward pass.
        image_size: the input resolution this encoder is meant for (presets set it; processors
            resize to it); ``None``: the ViT's native size.

    Shape:
        images (Tensor[B, 3, H, W]) -> (tokens (Tensor[B, h*w, out_dim]), (h, w)), with ``(h, w)``
        the ViT's patch grid at the size the policy gives for ``(H, W)``.
    """

    def __init__(
        self,
        token_pathway: TokenPathway | Mapping[str, Any] | str,
        map_pathway: MapPathway | Mapping[str, Any] | str,
        injections: Sequence[Mapping[str, Any]] = (),
        final_fusion: nn.Module | Mapping[str, Any] | None = None,
        final_map_stage: int | Sequence[int] = -1,
        resolution: Mapping[str, Any] | None = None,
        freeze: Sequence[str] = (),
        grad_checkpointing: bool = False,
        image_size: int | Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        self.token_pathway = build_if_config(token_pathway, "pathway", "token_pathway")
        self.map_pathway = build_if_config(map_pathway, "pathway", "map_pathway")
        if not isinstance(self.token_pathway, TokenPathway):
            raise TypeError(f"token_pathway has to be a TokenPathway (a ViT), but got {type(self.token_pathway).__name__}")
        if not isinstance(self.map_pathway, MapPathway):
            raise TypeError(f"map_pathway has to be a MapPathway (a CNN), but got {type(self.map_pathway).__name__}")
        self.resolution = check_policy(resolution or {"policy": "llava_hr"})
        self.injection_points = [self._check_injection(i, inj) for i, inj in enumerate(injections)]
        order = [p[0] for p in self.injection_points]
        if order != sorted(order):
            raise ConfigError(f"injections have to be in block order, but got after_block={order}")
        self.adapters = nn.ModuleList(
            [self._make_fusion(inj["fusion"], stage, f"injections[{i}].fusion", in_stream=True)
             for i, (inj, (_, stage)) in enumerate(zip(injections, self.injection_points))]
        )
        self.final_map_stage = self._check_stage(final_map_stage, "final_map_stage")
        self.final_fusion = None
        if final_fusion is not None:
            self.final_fusion = self._make_fusion(final_fusion, self.final_map_stage, "final_fusion", in_stream=False)
        native = self.token_pathway.image_size
        self.image_size = to_2tuple("image_size", native if image_size is None else (image_size if isinstance(image_size, int) else tuple(image_size)))
        self.out_dim = self.final_fusion.out_dim if self.final_fusion is not None else self.token_pathway.dim
        if image_size is not None:  # a size asked for must be one forward takes (num_tokens / describe)
            self.check_image_size(self.image_size)  # (a defaulted native ViT size is checked when used)
        self._check_grids()
        self.set_freeze(freeze)
        self.set_grad_checkpointing(grad_checkpointing)

    # -- construction checks ------------------------------------------------------------
    def _check_stage(self, stage: int | Sequence[int], where: str) -> Stage:
        """A stage index (or a non-empty list of them, for multi-source fusions), normalised."""
        n = self.map_pathway.num_stages
        many = isinstance(stage, (list, tuple))
        stages = list(stage) if many else [stage]
        if not stages or any(isinstance(s, bool) or not isinstance(s, int) or not -n <= s < n for s in stages):
            raise ConfigError(f"{where} has to be a stage index in [-{n}, {n - 1}] or a non-empty list of them, but got {stage!r}")
        return tuple(s % n for s in stages) if many else stages[0] % n

    def _stage_dims(self, stage: Stage) -> int | list[int]:
        dims = self.map_pathway.dims
        return [dims[s] for s in stage] if isinstance(stage, tuple) else dims[stage]

    def _check_grids(self) -> None:
        """In-stream fusions keep the token grid (checked on the grid of :attr:`image_size`)."""
        grid = self.token_pathway.grid_for(self.vit_size(self.image_size))
        for i, adapter in enumerate(self.adapters):
            if tuple(adapter.output_grid(grid)) != tuple(grid):
                raise ConfigError(f"injections[{i}].fusion returns grid {adapter.output_grid(grid)} for grid {grid}; only the "
                                  "final fusion may change the grid (e.g. sva's query_grid)")

    def _check_injection(self, i: int, inj: Mapping[str, Any]) -> tuple[int, Stage]:
        if not isinstance(inj, Mapping) or not {"after_block", "fusion"} <= set(inj):
            raise ConfigError(f"injections[{i}] has to be a dict with 'after_block' and 'fusion', but got {inj!r}")
        extra = sorted(set(inj) - {"after_block", "map_stage", "fusion"})
        if extra:
            raise ConfigError(f"injections[{i}] has unknown keys {extra}; allowed: after_block, map_stage, fusion")
        last = self.token_pathway.num_selected_blocks
        k = inj["after_block"]
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= last:
            raise ConfigError(f"injections[{i}]['after_block'] has to be in [1, {last}] (blocks run), but got {k!r}")
        return k, self._check_stage(inj.get("map_stage", -1), f"injections[{i}]['map_stage']")

    def _make_fusion(self, fusion: Any, stage: Stage, where: str, in_stream: bool) -> nn.Module:
        dims = self._stage_dims(stage)
        if isinstance(fusion, Mapping):
            fusion = dict(fusion)
            fusion.setdefault("low_dim", self.token_pathway.dim)
            fusion.setdefault("high_dim", dims)
        module = build_if_config(fusion, "fusion", where)
        if module.low_dim != self.token_pathway.dim:
            raise ConfigError(f"{where} has low_dim={module.low_dim}, but the token pathway's width is {self.token_pathway.dim}")
        want = tuple(dims) if isinstance(dims, list) else (dims,)
        if tuple(getattr(module, "high_dims", (module.high_dim,))) != want:
            raise ConfigError(f"{where} reads maps of widths {list(getattr(module, 'high_dims', (module.high_dim,)))}, "
                              f"but map stage(s) {stage} have {list(want)} channels")
        if in_stream and module.out_dim != module.low_dim:
            raise ConfigError(f"{where} changes the width ({module.low_dim} -> {module.out_dim}); only the final fusion may")
        return module

    # -- config-time helpers ------------------------------------------------------------
    @property
    def config(self) -> dict[str, Any]:
        """As :attr:`Configurable.config`, with the fusions' resolved configs in the injections."""
        cfg = super().config
        cfg["token_pathway"] = self.token_pathway.config
        cfg["map_pathway"] = self.map_pathway.config
        cfg["final_fusion"] = self.final_fusion.config if self.final_fusion is not None else None
        cfg["injections"] = [
            {"after_block": k, "map_stage": list(s) if isinstance(s, tuple) else s, "fusion": a.config}
            for (k, s), a in zip(self.injection_points, self.adapters)
        ]
        stage = self.final_map_stage
        cfg["final_map_stage"] = list(stage) if isinstance(stage, tuple) else stage
        return cfg

    @property
    def reads_maps(self) -> bool:
        """Whether any fusion reads the map pathway (a low-res-only encoder does not run it)."""
        return bool(len(self.adapters)) or self.final_fusion is not None

    def parts(self) -> dict[str, nn.Module]:
        """``token_pathway``, and where used: ``map_pathway``, ``adapters``, ``final_fusion``."""
        out: dict[str, nn.Module] = {"token_pathway": self.token_pathway}
        if self.reads_maps:
            out["map_pathway"] = self.map_pathway
        if len(self.adapters):
            out["adapters"] = self.adapters
        if self.final_fusion is not None:
            out["final_fusion"] = self.final_fusion
        return out

    def vit_size(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """Pixels ``(h, w)`` the ViT reads for a high-res input of ``image_size``."""
        size = to_2tuple("image_size", image_size if isinstance(image_size, int) else tuple(image_size))
        tp = self.token_pathway
        return vit_input_size(self.resolution, size, tp.patch_size, tp.image_size)

    def grid_for(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """The grid of the returned tokens for a high-res input of ``image_size``; runs nothing.

        The ViT's patch grid at the size the policy gives, or the final fusion's output grid.
        """
        self.check_image_size(image_size)
        grid = self.token_pathway.grid_for(self.vit_size(image_size))
        return tuple(self.final_fusion.output_grid(grid)) if self.final_fusion is not None else grid

    def check_image_size(self, image_size: int | Sequence[int]) -> tuple[int, int]:
        """Refuse an input size that :meth:`forward` would refuse; return it as ``(H, W)``.

        The map pathway's final stride has to divide ``H`` and ``W``, so the high-res map
        aligns with the token grid (:meth:`forward` checks the same rule on the images).

        Raises:
            ShapeError: a side that is not a multiple of the final stride.
        """
        h, w = to_2tuple("image_size", image_size if isinstance(image_size, int) else tuple(image_size))
        stride = max(self.map_pathway.strides)
        if h % stride or w % stride:
            raise ShapeError(
                f"image size {(h, w)} cannot be aligned: the map pathway's final stride is {stride}, "
                f"so H and W have to be multiples of {stride} (e.g. {(max(1, h // stride) * stride, max(1, w // stride) * stride)})"
            )
        return h, w

    # -- forward ------------------------------------------------------------------------
    def run_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The whole map pathway first (no autograd graph when it is frozen)."""
        if "map_pathway" in self.frozen:
            with torch.no_grad():
                return self.map_pathway(images)
        return self.map_pathway(images)

    def vit_images(self, images: torch.Tensor) -> torch.Tensor:
        """The ViT's input: the normalised images resized bilinearly (align_corners=True)."""
        size = self.vit_size(images.shape[-2:])
        if tuple(images.shape[-2:]) == size:
            return images
        return F.interpolate(images.float(), size=size, mode="bilinear", align_corners=True).to(images.dtype)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Encode ``images (Tensor[B, 3, H, W])`` into ``(tokens (Tensor[B, h*w, out_dim]), (h, w))``."""
        self._check_images(images)
        maps = self.run_maps(images) if self.reads_maps else []
        tp = self.token_pathway
        x, grid = tp.embed(self.vit_images(images))
        p = tp.num_prefix_tokens
        done = 0
        for (after, stage), adapter in zip(self.injection_points, self.adapters):
            x = tp.run_blocks(x, done, after)
            x = torch.cat([x[:, :p], adapter(x[:, p:], grid, _select(maps, stage))], dim=1)
            done = after
        x = tp.finalize(tp.run_blocks(x, done, tp.num_selected_blocks))
        tokens = x[:, p:]
        if self.final_fusion is not None:
            tokens = self.final_fusion(tokens, grid, _select(maps, self.final_map_stage))
            grid = tuple(self.final_fusion.output_grid(grid))
        return tokens, grid

    def _check_images(self, images: torch.Tensor) -> None:
        try:
            self.check_image_size(check_images(images))
        except ShapeError as err:
            raise ShapeError(f"images: {err}") from None

    def extra_repr(self) -> str:
        inj = ", ".join(f"{k}<-stage{s}" for k, s in self.injection_points)
        return f"injections=[{inj}], resolution={self.resolution}, frozen={list(self.frozen)}, out_dim={self.out_dim}"


register_encoder("dual_pathway")(DualPathwayEncoder)
