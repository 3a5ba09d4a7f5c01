"""MR-Adapter: the mixture-of-resolution adapter of LLaVA-HR.

Source: Luo et al., "Feast Your Eyes: Mixture-of-Resolution Adaptation for Multimodal Large
Language Models", arXiv 2403.03003, Sec. 3.2, Eq. 3-4; released code
``llava_hr/model/multimodal_encoder/multipath_encoder_wapper.py`` (``S2FStitchAlignModuleV2``)
of github.com/luogen1996/LLaVA-HR.

Paper (Eq. 3-4), with ``F_l`` the ViT tokens and ``F_h`` the CNN map::

    F_l' = F_l + f_l(F_l) + g * f_h(F_h)
    g    = delta(W2 sigma(W1 [avg(f_l(F_l)); avg(f_h(F_h))]))

``f_l`` is a convolutional block on the token grid, ``f_h`` an MLP on the map, ``delta`` the
gate nonlinearity (tanh; sigmoid / hard-sigmoid ablated), ``sigma`` GELU.

Released form (the default here):

- ``f_h``: 1x1 conv ``C_h -> C_h`` (xavier, zero bias) -> GELU -> 1x1 conv ``C_h -> C_l``
  (zero init), computed at the map's resolution, then resampled to the token grid
  (:func:`mixres.grid.resample`: average-pool down, bilinear ``align_corners=True`` up);
- ``f_l``: depthwise 7x7 conv (xavier, zero bias) -> GELU -> 1x1 conv (zero init), residual;
- gate: ``Linear(2C_l -> C_l/2) -> GELU -> Linear(C_l/2 -> 1)``, tanh, one scalar per image
  computed from the token-mean of ``[F_l + f_l(F_l); f_h(F_h)]``;
- output ``F_l + f_l(F_l) + tanh(g) * f_h(F_h)``: the identity at init.

The paper's per-channel gate is ``gate="channel"`` (``Linear(C_l/2 -> C_l)``); the preset
``mr_adapter_paper`` selects it. The fusion ablation "concat" is ``merge="concat"``: a linear
layer maps ``[low; g * high]`` back to ``C_l`` (initialised ``[I, 0]`` when ``zero_init``, so the
identity at init holds there too; the high branch's last conv then keeps its xavier init, since
zeroing both would leave each with no gradient).

Official weights: :data:`OFFICIAL_KEYS` maps the release's parameter names onto ours
(``slow_* -> high_*``, ``fast_* -> low_*``, ``gate.{0,2}`` unchanged);
:func:`convert_official_state_dict` applies it.

Shapes: ``tokens (Tensor[B, h*w, C_l])``, ``map (Tensor[B, C_h, H, W])`` -> ``Tensor[B, h*w, C_l]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .._utils import check_choice, check_positive_int
from ..errors import MixresError
from ..grid import map_to_tokens, resample, tokens_to_map
from ..pathways._weights import gathered
from ..registry import register_fusion, register_fusion_preset
from .base import Fusion

__all__ = [
    "MRAdapter",
    "MRFinalFusion",
    "gate_activation",
    "convert_official_state_dict",
    "OFFICIAL_KEYS",
    "GATE_KINDS",
    "GATE_ACTIVATIONS",
    "MERGES",
]

GateKind = Literal["scalar", "channel", "none"]
GateActivation = Literal["tanh", "sigmoid", "hard_sigmoid"]
Merge = Literal["sum", "concat"]
GATE_KINDS: tuple[str, ...] = ("scalar", "channel", "none")
GATE_ACTIVATIONS: tuple[str, ...] = ("tanh", "sigmoid", "hard_sigmoid")
MERGES: tuple[str, ...] = ("sum", "concat")

# release name -> mixres name, for S2FStitchAlignModuleV2 and MultiPathAlignModule
OFFICIAL_KEYS: dict[str, str] = {
    "slow_conv": "high_conv",
    "slow_proj": "high_proj",
    "fast_conv": "low_conv",
    "fast_proj": "low_proj",
    "gate.0": "gate.0",
    "gate.2": "gate.2",
}


def gate_activation(x: torch.Tensor, name: GateActivation) -> torch.Tensor:
    """The gate nonlinearity ``delta`` of Eq. 4: ``tanh``, ``sigmoid`` or ``hard_sigmoid``."""
    if name == "tanh":
        return torch.tanh(x)
    if name == "sigmoid":
        return torch.sigmoid(x)
    return F.hardsigmoid(x)


def convert_official_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename one released adapter's (or final fusion's) parameters to mixres names.

    Args:
        state_dict: keys such as ``slow_conv.weight`` or ``gate.0.bias`` (no module prefix).

    Returns:
        The same tensors under ``high_conv.weight``, ``gate.0.bias``, ...

    Raises:
        KeyError: a key whose first part is not in :data:`OFFICIAL_KEYS`.
    """
    out = {}
    for key, value in state_dict.items():
        for old, new in OFFICIAL_KEYS.items():
            if key.startswith(old + "."):
                out[new + key[len(old):]] = value
                break
        else:
            raise KeyError(f"{key!r} is not a released MR-Adapter key; expected a prefix in {list(OFFICIAL_KEYS)}")
    return out


def _init_conv(conv: nn.Conv2d, zero: bool) -> None:
    if zero:
        nn.init.zeros_(conv.weight)
    else:
        nn.init.xavier_uniform_(conv.weight)
    nn.init.zeros_(conv.bias)


class MRAdapter(Fusion):
    """Mixture-of-resolution adapter: inject a high-res map into low-res ViT tokens.

    Args:
        low_dim: ``C_l``, the ViT width.
        high_dim: ``C_h``, the CNN map width.
        kernel_size: the depthwise kernel of the low branch (7 in the release; odd).
        gate: ``"scalar"`` (release), ``"channel"`` (paper), or ``"none"`` (g = 1).
        gate_act: ``"tanh"`` (release and paper), ``"sigmoid"`` or ``"hard_sigmoid"``.
        merge: ``"sum"`` (release) or ``"concat"`` (paper ablation).
        zero_init: zero-init the last layer of both branches (identity at init), as released.
        align_corners: for the bilinear up-sampling of the high branch.
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Shape:
        tokens (Tensor[B, h*w, C_l]), grid (h, w), map (Tensor[B, C_h, H, W]) ->
        Tensor[B, h*w, C_l]. Any (h, w) and (H, W), square or not.

    NaN/inf are not checked (that would cost a device sync): they propagate to the output of
    the sample that holds them and of no other sample.

    Example:
        >>> adapter = MRAdapter(low_dim=32, high_dim=64)
        >>> tokens, map = torch.randn(2, 6 * 4, 32), torch.randn(2, 64, 5, 3)
        >>> out = adapter(tokens, (6, 4), map)
        >>> out.shape, torch.equal(out, tokens)  # the identity at init
        (torch.Size([2, 24, 32]), True)
    """

    def __init__(
        self,
        low_dim: int,
        high_dim: int,
        *,
        kernel_size: int = 7,
        gate: GateKind = "scalar",
        gate_act: GateActivation = "tanh",
        merge: Merge = "sum",
        zero_init: bool = True,
        align_corners: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(low_dim, high_dim)
        check_positive_int("kernel_size", kernel_size)
        if kernel_size % 2 == 0:
            raise MixresError(f"kernel_size has to be odd (to keep the grid), but got {kernel_size}")
        check_choice("gate", gate, GATE_KINDS)
        check_choice("gate_act", gate_act, GATE_ACTIVATIONS)
        check_choice("merge", merge, MERGES)
        if low_dim < 2:
            raise MixresError(f"low_dim has to be >= 2 (the gate's hidden width is low_dim // 2), but got {low_dim}")
        kw = dict(device=device, dtype=dtype)
        self.kernel_size, self.gate_kind, self.gate_act = kernel_size, gate, gate_act
        self.merge, self.zero_init, self.align_corners = merge, zero_init, align_corners
        self.high_conv = nn.Conv2d(high_dim, high_dim, 1, **kw)
        self.high_proj = nn.Conv2d(high_dim, low_dim, 1, **kw)
        self.low_conv = nn.Conv2d(low_dim, low_dim, kernel_size, padding=kernel_size // 2, groups=low_dim, **kw)
        self.low_proj = nn.Conv2d(low_dim, low_dim, 1, **kw)
        self.gate = None
        if gate != "none":
            gate_out = 1 if gate == "scalar" else low_dim
            self.gate = nn.Sequential(
                nn.Linear(2 * low_dim, low_dim // 2, **kw), nn.GELU(), nn.Linear(low_dim // 2, gate_out, **kw)
            )
        self.merge_proj = nn.Linear(2 * low_dim, low_dim, **kw) if merge == "concat" else None
        with gathered(self):  # under deepspeed.zero.Init the layers above are partitioned already
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """The release's init: xavier first layers, zero (or xavier) last layers, zero biases."""
        _init_conv(self.high_conv, zero=False)
        _init_conv(self.low_conv, zero=False)
        # with concat, zeroing both high_proj and the high half of merge_proj would leave each
        # the other's gradient at zero forever; the [I, 0] merge alone gives the identity
        _init_conv(self.high_proj, zero=self.zero_init and self.merge_proj is None)
        _init_conv(self.low_proj, zero=self.zero_init)
        if self.merge_proj is not None:
            with torch.no_grad():
                if self.zero_init:  # [I, 0]: pass the low half through, ignore the high half
                    self.merge_proj.weight.zero_()
                    self.merge_proj.weight[:, : self.low_dim].copy_(torch.eye(self.low_dim))
                else:
                    nn.init.xavier_uniform_(self.merge_proj.weight)
                self.merge_proj.bias.zero_()

    def high_branch(self, map: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``f_h``: MLP on the map at its own resolution, then aligned: Tensor[B, h*w, C_l]."""
        high = self.high_proj(F.gelu(self.high_conv(map)))
        return map_to_tokens(resample(high, grid, align_corners=self.align_corners))[0]

    def low_branch(self, tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """``F_l + f_l(F_l)``: residual depthwise-conv block on the token grid."""
        low = tokens_to_map(tokens, grid)
        low = low + self.low_proj(F.gelu(self.low_conv(low)))
        return map_to_tokens(low)[0]

    def gate_value(self, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor | None:
        """Eq. 4: ``delta(W2 GELU(W1 [avg low; avg high]))``: Tensor[B, 1, 1 or C_l] (None: no gate)."""
        if self.gate is None:
            return None
        pooled = torch.cat([low, high], dim=-1).mean(dim=1)
        return gate_activation(self.gate(pooled), self.gate_act).unsqueeze(1)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], map: torch.Tensor) -> torch.Tensor:
        """Fuse; see the class docstring for shapes."""
        grid = self.check_inputs(tokens, grid, map)
        high = self.high_branch(map, grid)
        low = self.low_branch(tokens, grid)
        gate = self.gate_value(low, high)
        if gate is not None:
            high = gate * high
        if self.merge_proj is not None:
            return self.merge_proj(torch.cat([low, high], dim=-1))
        return low + high

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, kernel_size={self.kernel_size}, gate={self.gate_kind!r}, "
            f"gate_act={self.gate_act!r}, merge={self.merge!r}, zero_init={self.zero_init}"
        )


class MRFinalFusion(Fusion):
    """The final fusion of LLaVA-HR: ``Linear(tokens) + Linear(aligned map)``.

    Source: ``MultiPathAlignModule`` in the LLaVA-HR release (see the module docstring). The map
    is aligned to the token grid first (:func:`mixres.grid.resample`), then both sides are
    projected to ``out_dim`` and summed. Default ``nn.Linear`` init, as released.

    Args:
        low_dim: ``C_l``.
        high_dim: ``C_h``.
        out_dim: the output width (default ``C_l``, as released).
        align_corners: for the bilinear up-sampling of the map.
        device: where to create the parameters.
        dtype: the parameters' dtype.

    Shape:
        tokens (Tensor[B, h*w, C_l]), grid (h, w), map (Tensor[B, C_h, H, W]) -> Tensor[B, h*w, out_dim].

    Example:
        >>> final = MRFinalFusion(low_dim=32, high_dim=64, out_dim=48)
        >>> final(torch.randn(2, 16, 32), (4, 4), torch.randn(2, 64, 8, 8)).shape
        torch.Size([2, 16, 48])
    """

    def __init__(
        self,
        low_dim: int,
        high_dim: int,
        out_dim: int | None = None,
        *,
        align_corners: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(low_dim, high_dim, out_dim)
        self.align_corners = align_corners
        self.low_proj = nn.Linear(low_dim, self.out_dim, device=device, dtype=dtype)
        self.high_proj = nn.Linear(high_dim, self.out_dim, device=device, dtype=dtype)

    def forward(self, tokens: torch.Tensor, grid: tuple[int, int], map: torch.Tensor) -> torch.Tensor:
        """Fuse; see the class docstring for shapes."""
        grid = self.check_inputs(tokens, grid, map)
        high = map_to_tokens(resample(map, grid, align_corners=self.align_corners))[0]
        return self.low_proj(tokens) + self.high_proj(high)


register_fusion("mr_adapter")(MRAdapter)
register_fusion("mr_final")(MRFinalFusion)
register_fusion_preset("mr_adapter_paper", {"name": "mr_adapter", "gate": "channel"})
