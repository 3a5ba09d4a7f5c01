"""The main job on an embedded default: ``python -m mixres.demo`` (``make demo``).

Runs on CPU with nothing downloaded. It grows with the library: today it composes the core
pieces (MR-Adapters between the blocks of a tiny ViT-like stack, the final fusion and the
projector) and reports tokens, parameters and time per resolution.
"""

from __future__ import annotations

import time

import torch

import mixres

__all__ = ["main"]


def main() -> None:
    """Print tokens, parameters and forward time of MR-Adapter fusion at a few resolutions."""
    torch.manual_seed(0)
    low_dim, high_dim, out_dim = 64, 96, 128
    adapters = [mixres.create_fusion("mr_adapter", low_dim=low_dim, high_dim=high_dim) for _ in range(3)]
    final = mixres.create_fusion("mr_final", low_dim=low_dim, high_dim=high_dim)
    projector = mixres.create_projector("mlp2x_gelu", in_dim=low_dim, out_dim=out_dim)
    params = sum(p.numel() for m in [*adapters, final, projector] for p in m.parameters())
    print(f"mixres {mixres.__version__}: fusions {mixres.list_fusions()}")
    print(f"{'image':>6} {'grid':>7} {'map':>7} {'tokens':>7} {'params':>8} {'ms':>7}")
    for image in (384, 768, 1024):
        grid = (max(image // 32 * 14, 336) // 14,) * 2
        side = image // 32
        tokens = torch.randn(1, grid[0] * grid[1], low_dim)
        hires = torch.randn(1, high_dim, side, side)
        start = time.perf_counter()
        with torch.no_grad():
            x = tokens
            for adapter in adapters:
                x = adapter(x, grid, hires)
            out = projector(final(x, grid, hires))
        ms = (time.perf_counter() - start) * 1e3
        print(f"{image:>6} {grid[0]:>3}x{grid[1]:<3} {side:>3}x{side:<3} {out.shape[1]:>7} {params:>8} {ms:>7.1f}")


if __name__ == "__main__":
    main()
