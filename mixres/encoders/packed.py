"""MRA over a packed ViT: several images of different sizes in one window-ordered stream (Qwen2.5-VL).

The composition of :class:`~mixres.encoders.dual.DualPathwayEncoder` (LLaVA-HR, arXiv 2403.03003
Sec. 3) for a *packed* token pathway (``hf_qwen2_5_vl``): every image of a batch has its own
size, its own ViT grid ``(h_i, w_i)`` and its own high-res view read by the map pathway (CNN).
Order of computation:

1. the map pathway runs on each image's high-res view (images of one size run as one batch);
2. the ViT embeds the processor's packed patches (window order, :class:`~mixres.pathways.hf_qwen2_5_vl.PackedLayout`);
3. blocks run in slices; after block ``k`` of each injection, each image's tokens are gathered
   into raster order (its ``(h_i, w_i)`` grid), its fusion mixes in that image's map (the fusion
   aligns the map to the grid, e.g. MR-Adapter's average-pool / bilinear resample), and the
   tokens are scattered back into the stream;
4. an optional final fusion (of the ViT's width: the merger reads it) the same way.

Not registered as an encoder (its input is the processor's packed format, not ``Tensor[B, 3, H, W]``,
so it is no LLaVA-style tower); the Qwen2.5-VL tower
(:mod:`mixres.integrations.hf.qwen_tower`) builds it from :attr:`PackedDualPathwayEncoder.config`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..errors import ConfigError, ShapeError
from ..pathways.base import MapPathway
from ..registry import build_if_config

__all__ = ["PackedDualPathwayEncoder", "PACKED_PARTS"]

#: the parts of a packed dual-pathway encoder
PACKED_PARTS: tuple[str, ...] = ("token_pathway", "map_pathway", "adapters", "final_fusion")


class PackedDualPathwayEncoder(nn.Module):
    """A packed token pathway with fusions of a map pathway's maps between its blocks, image by image.

    Args:
        token_pathway: a packed token pathway (``hf_qwen2_5_vl``) or its config.
        map_pathway: a map pathway (CNN) or its config.
        injections: ``[{"after_block": k, "map_stage": s, "fusion": <config>}]`` (``s`` one stage
            index, default the last); ``low_dim`` / ``high_dim`` default to the ViT's and the stage's widths.
        final_fusion: optional fusion config after the last block; its ``out_dim`` has to be the ViT width.
        freeze: parts with no gradient (:data:`PACKED_PARTS`).

    Shape:
        ``forward(patches (Tensor[S, D]), grid_thw (Tensor[n, 3]), high_res [Tensor[1, 3, H_i, W_i]] * n)``
        -> ``(x (Tensor[S, C]) in the pathway's stream order, layout)``.
    """

    def __init__(self, token_pathway: Any, map_pathway: Any, injections: Sequence[Mapping[str, Any]] = (),
                 final_fusion: Mapping[str, Any] | None = None, freeze: Sequence[str] = ()) -> None:
        super().__init__()
        self.token_pathway = build_if_config(token_pathway, "pathway", "token_pathway")
        self.map_pathway = build_if_config(map_pathway, "pathway", "map_pathway")
        if not hasattr(self.token_pathway, "to_grids"):
            raise TypeError(f"token_pathway has to be a packed token pathway (hf_qwen2_5_vl), but got {type(self.token_pathway).__name__}")
        if not isinstance(self.map_pathway, MapPathway):
            raise TypeError(f"map_pathway has to be a MapPathway (a CNN), but got {type(self.map_pathway).__name__}")
        self.points = [self._check_injection(i, inj) for i, inj in enumerate(injections)]
        if [k for k, _ in self.points] != sorted(k for k, _ in self.points):
            raise ConfigError(f"injections have to be in block order, but got after_block={[k for k, _ in self.points]}")
        self.adapters = nn.ModuleList([self._fusion(inj["fusion"], s, f"injections[{i}].fusion")
                                       for i, (inj, (_, s)) in enumerate(zip(injections, self.points))])
        self.final_fusion = None if final_fusion is None else self._fusion(final_fusion, self.map_pathway.num_stages - 1, "final_fusion")
        self.out_dim = self.token_pathway.dim
        self.set_freeze(freeze)

    def _check_injection(self, i: int, inj: Mapping[str, Any]) -> tuple[int, int]:
        if not isinstance(inj, Mapping) or not {"after_block", "fusion"} <= set(inj) or set(inj) - {"after_block", "map_stage", "fusion"}:
            raise ConfigError(f"injections[{i}] has to be a dict with 'after_block', 'fusion' (and 'map_stage'), but got {inj!r}")
        k, n, stage = inj["after_block"], self.map_pathway.num_stages, inj.get("map_stage", -1)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.token_pathway.num_blocks:
            raise ConfigError(f"injections[{i}]['after_block'] has to be in [1, {self.token_pathway.num_blocks}], but got {k!r}")
        if isinstance(stage, bool) or not isinstance(stage, int) or not -n <= stage < n:
            raise ConfigError(f"injections[{i}]['map_stage'] has to be one stage index in [-{n}, {n - 1}], but got {stage!r}")
        return k, stage % n

    def _fusion(self, fusion: Any, stage: int, where: str) -> nn.Module:
        if isinstance(fusion, str):
            fusion = {"name": fusion}
        if isinstance(fusion, Mapping):
            fusion = {"kind": "fusion", "low_dim": self.token_pathway.dim, "high_dim": self.map_pathway.dims[stage], **fusion}
        module = build_if_config(fusion, "fusion", where)
        if module.low_dim != self.token_pathway.dim or module.out_dim != self.token_pathway.dim:
            raise ConfigError(f"{where} maps width {module.low_dim} -> {module.out_dim}, but the ViT's merger reads width "
                              f"{self.token_pathway.dim}: a fusion here has to keep it")
        if module.high_dim != self.map_pathway.dims[stage]:
            raise ConfigError(f"{where} reads maps of width {module.high_dim}, but map stage {stage} has {self.map_pathway.dims[stage]}")
        return module

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments as plain data (``PackedDualPathwayEncoder(**config)`` rebuilds it)."""
        return {
            "token_pathway": self.token_pathway.config, "map_pathway": self.map_pathway.config,
            "injections": [{"after_block": k, "map_stage": s, "fusion": a.config} for (k, s), a in zip(self.points, self.adapters)],
            "final_fusion": self.final_fusion.config if self.final_fusion is not None else None, "freeze": list(self.frozen),
        }

    @property
    def stride(self) -> int:
        """The map pathway's final stride: high-res sides have to be multiples of it."""
        return int(max(self.map_pathway.strides))

    def parts(self) -> dict[str, nn.Module]:
        """The named parts that run in :meth:`forward`."""
        out: dict[str, nn.Module] = {"token_pathway": self.token_pathway, "map_pathway": self.map_pathway}
        if len(self.adapters):
            out["adapters"] = self.adapters
        if self.final_fusion is not None:
            out["final_fusion"] = self.final_fusion
        return out

    def set_freeze(self, parts: Sequence[str]) -> None:
        """Freeze the named parts (:data:`PACKED_PARTS`), unfreeze the others."""
        unknown = sorted(set(parts) - set(PACKED_PARTS))
        if isinstance(parts, str) or unknown:
            raise ConfigError(f"freeze takes a list of part names from {list(PACKED_PARTS)}, but got {parts!r}")
        self.frozen = tuple(p for p in self.parts() if p in parts)
        for name, module in self.parts().items():
            module.requires_grad_(name not in self.frozen)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute both pathways' activations in the backward pass."""
        for part in (self.token_pathway, self.map_pathway):
            part.set_grad_checkpointing(enable)

    def run_maps(self, high_res: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The map pathway on each high-res view (one batch per distinct size): one list of stage maps per image."""
        out: list[list[torch.Tensor] | None] = [None] * len(high_res)
        sizes: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(high_res):
            sizes.setdefault(tuple(image.shape[-2:]), []).append(i)
        reference = next(self.map_pathway.parameters())
        for index in sizes.values():
            batch = torch.cat([high_res[i] for i in index]).to(reference.dtype)
            with torch.set_grad_enabled(torch.is_grad_enabled() and "map_pathway" not in self.frozen):
                maps = self.map_pathway(batch)
            for j, i in enumerate(index):
                out[i] = [m[j : j + 1] for m in maps]
        return out  # type: ignore[return-value]

    def check_high_res(self, high_res: Sequence[torch.Tensor], num_images: int) -> None:
        """One ``Tensor[1, 3, H_i, W_i]`` per image, sides multiples of :attr:`stride`.

        Raises:
            ShapeError: another count, rank, channel count, or a side the stride does not divide.
        """
        if not isinstance(high_res, (list, tuple)) or len(high_res) != num_images:
            got = len(high_res) if isinstance(high_res, (list, tuple)) else type(high_res).__name__
            raise ShapeError(f"high_res has to be a list of one Tensor[1, 3, H, W] per image ({num_images}), but got {got}")
        for i, image in enumerate(high_res):
            if not isinstance(image, torch.Tensor) or image.ndim != 4 or image.shape[:2] != (1, 3) \
                    or image.shape[2] % self.stride or image.shape[3] % self.stride or 0 in image.shape:
                raise ShapeError(f"high_res[{i}] has to be a Tensor[1, 3, H, W] with H, W multiples of the map pathway's "
                                 f"stride {self.stride}, but got {tuple(getattr(image, 'shape', ()))}")

    def _fuse(self, fusions: Sequence[nn.Module], x: torch.Tensor, layout: Any, maps: list[torch.Tensor]) -> torch.Tensor:
        tp = self.token_pathway
        grids = tp.to_grids(x, layout)
        return tp.from_grids([f(t, g, m) for f, t, g, m in zip(fusions, grids, layout.grids, maps)], layout)

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor, high_res: Sequence[torch.Tensor]) -> tuple[torch.Tensor, Any]:
        """Encode; see the class docstring for shapes.

        Raises:
            ShapeError: bad patches / grid_thw (the token pathway's checks), bad or missing high-res views.
        """
        self.check_high_res(high_res, int(grid_thw.shape[0]) if isinstance(grid_thw, torch.Tensor) else -1)
        maps = self.run_maps(high_res) if len(self.adapters) or self.final_fusion is not None else []
        tp = self.token_pathway
        x, layout = tp.embed(patches, grid_thw)
        done = 0
        for (after, stage), adapter in zip(self.points, self.adapters):
            x = tp.run_blocks(x, done, after, layout)
            x = self._fuse([adapter] * len(maps), x, layout, [m[stage] for m in maps])
            done = after
        x = tp.run_blocks(x, done, tp.num_blocks, layout)
        if self.final_fusion is not None:
            x = self._fuse([self.final_fusion] * len(maps), x, layout, [m[-1] for m in maps])
        return x, layout

    def extra_repr(self) -> str:
        return f"injections=[{', '.join(f'{k}<-stage{s}' for k, s in self.points)}], frozen={list(self.frozen)}"
