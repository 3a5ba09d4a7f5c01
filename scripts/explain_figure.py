"""The figure of docs/tools/explain.md: a tiny encoder trained to find a small item, then explained.

``python scripts/explain_figure.py OUT_DIR`` trains the adapters of ``llava-hr-tiny`` (the
middle MR-Adapter swapped for patch mining on the stride-8 map, so the figure has an attention
panel; both pathways frozen) with a per-token linear head to say which cell of the 8x8 grid
holds a 6x6 px bright square on a dark 256-px image (under one pixel of the 32-px ViT input),
saves the encoder as a ``mixres convert``-style directory (``OUT_DIR/encoder``) and a held-out
image (``OUT_DIR/item.png``), and prints the ``mixres explain`` command. About a minute on CPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

import mixres
from mixres.convert import save_converted
from mixres.integrations.llava.preprocess import CLIP_MEAN, CLIP_STD

SIZE, ITEM = 256, 6


def draw(gen: torch.Generator, grid: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int]]:
    """One dark RGB image in [0, 1] (Tensor[3, 256, 256]) with a bright square; its cell."""
    cell = SIZE // grid[0]
    image = torch.full((3, SIZE, SIZE), 0.08)
    i, j = torch.randint(0, grid[0], (2,), generator=gen).tolist()
    oy, ox = torch.randint(4, cell - ITEM - 4, (2,), generator=gen).tolist()
    colour = torch.rand(3, generator=gen) * 0.5 + 0.5
    image[:, i * cell + oy : i * cell + oy + ITEM, j * cell + ox : j * cell + ox + ITEM] = colour.view(3, 1, 1)
    return image, (i, j)


def normalise(images: torch.Tensor) -> torch.Tensor:
    return (images - torch.tensor(CLIP_MEAN).view(3, 1, 1)) / torch.tensor(CLIP_STD).view(3, 1, 1)


def main(out: Path) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    injections = mixres.ENCODERS.resolve("llava-hr-tiny")["injections"]
    injections[1] = {"after_block": injections[1]["after_block"], "map_stage": 1,
                     "fusion": {"name": "patch_mining", "zero_init": True}}
    encoder = mixres.create_encoder("llava-hr-tiny", injections=injections, freeze=["token_pathway", "map_pathway"])
    grid = encoder.grid_for(SIZE)
    head = nn.Linear(encoder.out_dim, 1)
    params = [p for p in encoder.parameters() if p.requires_grad] + list(head.parameters())
    opt = torch.optim.Adam(params, lr=3e-3)
    for step in range(60):
        batch = [draw(gen, grid) for _ in range(8)]
        images = normalise(torch.stack([b[0] for b in batch]))
        target = torch.zeros(8, grid[0] * grid[1])
        for n, (_, (i, j)) in enumerate(batch):
            target[n, i * grid[1] + j] = 1
        loss = F.binary_cross_entropy_with_logits(head(encoder(images)[0]).squeeze(-1), target,
                                                  pos_weight=torch.tensor(20.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 20 == 0 or step == 59:
            print(f"step {step}: loss {loss.item():.3f}")
    save_converted(out / "encoder", encoder.eval())
    image, cell = draw(torch.Generator().manual_seed(123), grid)
    Image.fromarray((image.permute(1, 2, 0) * 255).round().byte().numpy()).save(out / "item.png")
    print(f"item in cell {cell}; now run:\n  mixres explain --model {out / 'encoder'} --image {out / 'item.png'} "
          f"--token {cell[0]} {cell[1]} --out docs/tools/explain.png")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/explain"))
