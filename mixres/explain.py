"""Where did the high-res pathway act? Per-token maps of each fusion, read with forward hooks.

For every :class:`~mixres.fusions.mr_adapter.MRAdapter` inside a model, the **high-res term** of
Eq. 3 of LLaVA-HR (arXiv 2403.03003), ``g * f_h(F_h)``, is what the CNN adds to each ViT token;
its L2 norm over channels, laid out on the token grid, is a heat map of how much the high-res
pathway changed each token. The gate ``g`` is reported beside it. For the cross-attention
fusions (:class:`~mixres.fusions.patch_mining.PatchMining`, :class:`~mixres.fusions.sva.SVA`)
the attention of one chosen query token over the map pixels of its window is reported, placed
on the (aligned) map.

Nothing in any ``forward`` changes: forward hooks on the fusions and on the submodules that
produce the terms (``high_proj`` / ``gate`` of an MR-Adapter, ``q_proj`` / ``k_proj`` of the
attention fusions) keep their outputs; the maps are assembled from those outputs with the
fusions' own alignment (:func:`mixres.grid.resample`). ``F.scaled_dot_product_attention``
returns no weights, so the attention is recomputed from the kept queries and keys (the same
``softmax(q k^T / sqrt(d))``, averaged over heads).

With ``merge="concat"`` the term reported is the high half of ``merge_proj`` applied to
``g * f_h(F_h)`` (its contribution to the output, without bias), so a zero-init adapter gives
exactly zero in both merges.

A fusion called several times in one forward (tiles of an AnyRes / S2 encoder) gets one entry
per call: ``name``, then ``name#1``, ``name#2``, ...
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from einops import rearrange
from torch import nn

from .errors import MixresError
from .fusions.mr_adapter import MRAdapter, gate_activation
from .fusions.patch_mining import PatchMining, window_grid
from .fusions.sva import SVA
from .grid import map_to_tokens, resample

__all__ = ["Explanation", "explain", "explain_hooks", "find_encoder", "token_attention"]


@dataclass
class Explanation:
    """The maps of one forward pass (batch ``B``).

    Attributes:
        high_res: per MR-Adapter (module name), ``Tensor[B, h, w]``: the L2 norm over channels
            of its high-res term ``g * f_h(F_h)`` at each token of its grid.
        total: the sum of :attr:`high_res` over adapters, ``Tensor[B, h, w]``; ``None`` when
            there is no adapter or their grids differ.
        gates: per gated MR-Adapter, ``Tensor[B, 1]`` (scalar gate) or ``Tensor[B, C_l]``
            (per-channel gate): ``g`` after its nonlinearity. Adapters with ``gate="none"``
            (``g = 1``) have no entry.
        attention: per cross-attention fusion, ``Tensor[B, p1*h, p2*w]``: the head-averaged
            attention of the chosen token over the aligned map (its window sums to 1, the rest
            is 0). Patch mining: key ``name``; SVA: ``name/layer{l}/source{s}`` (one softmax
            spans all sources, so the windows of one layer sum to 1 together).
        tokens: per cross-attention fusion, the ``(row, col)`` of the chosen token in its grid.
        grids: per cross-attention fusion, that grid ``(h, w)`` (the attention map is
            ``(p1*h, p2*w)``: ``p1 x p2`` map pixels per token).
    """

    high_res: dict[str, torch.Tensor] = field(default_factory=dict)
    gates: dict[str, torch.Tensor] = field(default_factory=dict)
    attention: dict[str, torch.Tensor] = field(default_factory=dict)
    tokens: dict[str, tuple[int, int]] = field(default_factory=dict)
    total: torch.Tensor | None = None
    grids: dict[str, tuple[int, int]] = field(default_factory=dict)

    def finish(self) -> None:
        """Fill :attr:`total` from :attr:`high_res` (called when the hooks are removed)."""
        maps = list(self.high_res.values())
        same = maps and all(m.shape == maps[0].shape for m in maps)
        self.total = torch.stack(maps).sum(0) if same else None


def find_encoder(model: nn.Module) -> nn.Module:
    """The first :class:`~mixres.encoders.Encoder` in ``model`` (itself included).

    Raises:
        MixresError: the model holds no mixres encoder.
    """
    from .encoders.base import Encoder

    for module in model.modules():
        if isinstance(module, Encoder):
            return module
    raise MixresError(f"{type(model).__name__} holds no mixres Encoder; pass an encoder or an mrified model")


def token_attention(q: torch.Tensor, k: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Head-averaged window attention weights ``softmax(q k^T / sqrt(d))``.

    Args:
        q (Tensor[B, N, D]): one query per window.
        k (Tensor[B, N, K, D]): each query's keys.
        num_heads: heads; ``d = D / num_heads``, as in
            :func:`~mixres.fusions.patch_mining.window_attention`.

    Returns:
        Tensor[B, N, K], each row summing to 1.

    Example:
        >>> w = token_attention(torch.randn(2, 6, 8), torch.randn(2, 6, 4, 8), num_heads=2)
        >>> w.shape, torch.allclose(w.sum(-1), torch.ones(2, 6))
        (torch.Size([2, 6, 4]), True)
    """
    q = rearrange(q.float(), "b n (m d) -> b n m d", m=num_heads)
    k = rearrange(k.float(), "b n k (m d) -> b n m k d", m=num_heads)
    scores = torch.einsum("bnmd,bnmkd->bnmk", q, k) / math.sqrt(q.shape[-1])
    return scores.softmax(-1).mean(2)


def _check_token(token: tuple[int, int] | None, grid: tuple[int, int], name: str) -> tuple[int, int]:
    if token is None:
        return grid[0] // 2, grid[1] // 2
    if not (isinstance(token, (tuple, list)) and len(token) == 2 and all(isinstance(t, int) for t in token)):
        raise TypeError(f"token has to be a (row, col) pair of ints, but got {token!r}")
    if not (0 <= token[0] < grid[0] and 0 <= token[1] < grid[1]):
        raise MixresError(f"token {tuple(token)} is outside the grid {grid} of {name}; rows/cols start at 0")
    return int(token[0]), int(token[1])


def _place(weights: torch.Tensor, grid: tuple[int, int], window: tuple[int, int], cell: tuple[int, int]) -> torch.Tensor:
    """Put one token's window weights (Tensor[B, p1*p2]) on the aligned map, zeros elsewhere."""
    (h, w), (p1, p2), (i, j) = grid, window, cell
    out = weights.new_zeros(weights.shape[0], h * p1, w * p2)
    out[:, i * p1 : (i + 1) * p1, j * p2 : (j + 1) * p2] = weights.reshape(-1, p1, p2)
    return out


def _input_grid(args: tuple, kwargs: dict) -> tuple[tuple[int, int], object]:
    """The ``grid`` and ``map`` of a fusion call ``forward(tokens, grid, map)``."""
    grid = args[1] if len(args) > 1 else kwargs["grid"]
    map = args[2] if len(args) > 2 else kwargs["map"]
    return (int(grid[0]), int(grid[1])), map


class _Recorder:
    """Hooks of one model; fills an :class:`Explanation`."""

    def __init__(self, model: nn.Module, token: tuple[int, int] | None) -> None:
        self.token, self.out = token, Explanation()
        self.calls: dict[str, int] = {}
        self.kept: dict[str, dict] = {}
        self.handles: list = []
        for name, module in model.named_modules():
            name = name or type(module).__name__
            if isinstance(module, MRAdapter):
                self._hook_adapter(name, module)
            elif isinstance(module, PatchMining):
                self._hook_attention(name, module, {"q": module.q_proj, "k0": module.k_proj}, self._mining_done)
            elif isinstance(module, SVA):
                for layer_index, layer in enumerate(module.layers):
                    subs = {"q": layer.q_proj, **{f"k{s}": proj for s, proj in enumerate(layer.k_proj)}}
                    self._hook_attention(f"{name}/layer{layer_index}", module, subs, self._sva_done, owner=layer)

    # -- plumbing ---------------------------------------------------------------------
    def _keep(self, name: str, key: str, module: nn.Module) -> None:
        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor) -> None:
            self.kept[name][key] = output.detach()

        self.handles.append(module.register_forward_hook(hook))

    def _start(self, name: str, fusion: nn.Module) -> None:
        def pre(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            grid, map = _input_grid(args, kwargs)
            self.kept[name] = {"grid": grid, "map": map}

        self.handles.append(fusion.register_forward_pre_hook(pre, with_kwargs=True))

    def _key(self, name: str) -> str:
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        return name if n == 0 else f"{name}#{n}"

    # -- MR-Adapter -------------------------------------------------------------------
    def _hook_adapter(self, name: str, adapter: MRAdapter) -> None:
        self._start(name, adapter)
        self._keep(name, "high", adapter.high_proj)
        if adapter.gate is not None:
            self._keep(name, "gate", adapter.gate)
        self.handles.append(adapter.register_forward_hook(lambda m, a, o: self._adapter_done(name, m)))

    def _adapter_done(self, name: str, adapter: MRAdapter) -> None:
        kept = self.kept.pop(name)
        grid = kept["grid"]
        high = map_to_tokens(resample(kept["high"], grid, align_corners=adapter.align_corners))[0]
        key = self._key(name)
        if "gate" in kept:
            gate = gate_activation(kept["gate"], adapter.gate_act)
            self.out.gates[key] = gate
            high = gate.unsqueeze(1) * high
        if adapter.merge_proj is not None:  # the high half of the merge: the term's share of the output
            high = high @ adapter.merge_proj.weight.detach()[:, adapter.low_dim :].T
        self.out.high_res[key] = high.float().norm(dim=-1).reshape(-1, *grid)

    # -- cross-attention fusions --------------------------------------------------------
    def _hook_attention(self, name, fusion, subs, done, owner=None) -> None:
        self._start(name, fusion)
        for key, module in subs.items():
            self._keep(name, key, module)
        target = owner if owner is not None else fusion
        self.handles.append(target.register_forward_hook(lambda m, a, o: done(name, fusion)))

    def _mining_done(self, name: str, fusion: PatchMining) -> None:
        kept = self.kept.pop(name)
        grid, map = kept["grid"], kept["map"]
        cell = _check_token(self.token, grid, name)
        window = window_grid((int(map.shape[2]), int(map.shape[3])), grid)
        weights = token_attention(kept["q"], kept["k0"], fusion.num_heads)[:, cell[0] * grid[1] + cell[1]]
        key = self._key(name)
        self.out.attention[key] = _place(weights, grid, window, cell)
        self.out.tokens[key], self.out.grids[key] = cell, grid

    def _sva_done(self, name: str, fusion: SVA) -> None:
        kept = self.kept.pop(name)  # each layer has its own pre-hook on the SVA
        grid = fusion.output_grid(kept["grid"])
        maps = [kept["map"]] if isinstance(kept["map"], torch.Tensor) else list(kept["map"])
        sizes = [kept[f"k{s}"].shape[2] for s in range(len(maps))]
        cell = _check_token(self.token, grid, name)
        keys = torch.cat([kept[f"k{s}"] for s in range(len(maps))], dim=2)
        weights = token_attention(kept["q"], keys, fusion.num_heads)[:, cell[0] * grid[1] + cell[1]]
        key = self._key(name)
        for s, (m, part) in enumerate(zip(maps, weights.split(sizes, dim=-1))):
            window = window_grid((int(m.shape[2]), int(m.shape[3])), grid)
            self.out.attention[f"{key}/source{s}"] = _place(part, grid, window, cell)
        self.out.tokens[key], self.out.grids[key] = cell, grid

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.out.finish()


@contextmanager
def explain_hooks(model: nn.Module, *, token: tuple[int, int] | None = None) -> Iterator[Explanation]:
    """Hook every MR-Adapter / patch-mining / SVA fusion inside ``model`` while the block runs.

    Run any forward of ``model`` (an encoder, an HF tower, a whole mrified LLaVA) inside the
    ``with``; the yielded :class:`Explanation` is filled as the fusions run, and
    :attr:`Explanation.total` is set when the block exits (the hooks are then removed, also on
    error).

    Args:
        model: any module holding mixres fusions.
        token: ``(row, col)`` of the query token whose attention is reported, in each
            cross-attention fusion's own grid; ``None``: the centre cell ``(h // 2, w // 2)``.

    Raises:
        MixresError: ``token`` is outside a fusion's grid (raised from inside the forward).

    Example:
        >>> import mixres
        >>> encoder = mixres.create_encoder("llava-hr-tiny").eval()
        >>> with explain_hooks(encoder) as exp, torch.no_grad():
        ...     _ = encoder(torch.randn(1, 3, 256, 256))
        >>> sorted(exp.high_res), exp.total.shape, float(exp.total.abs().max())  # zero-init adapters
        (['adapters.0', 'adapters.1', 'adapters.2'], torch.Size([1, 8, 8]), 0.0)
    """
    recorder = _Recorder(model, token)
    try:
        yield recorder.out
    finally:
        recorder.remove()


@torch.no_grad()
def explain(encoder: nn.Module, images: torch.Tensor, *, token: tuple[int, int] | None = None) -> Explanation:
    """Run ``encoder(images)`` once and return the high-res maps, gates and attention.

    Args:
        encoder: a mixres encoder (or any module whose ``forward(images)`` runs mixres fusions).
        images (Tensor[B, 3, H, W]): normalised images at the encoder's input size.
        token: the query token of the cross-attention maps (see :func:`explain_hooks`).

    Returns:
        An :class:`Explanation`. The encoder's train/eval mode is left as it was.

    Example:
        >>> import mixres
        >>> exp = explain(mixres.create_encoder("llava-hr-tiny").eval(), torch.randn(2, 3, 256, 256))
        >>> exp.high_res["adapters.1"].shape, exp.gates["adapters.1"].shape
        (torch.Size([2, 8, 8]), torch.Size([2, 1]))
    """
    with explain_hooks(encoder, token=token) as out:
        encoder(images)
    return out
