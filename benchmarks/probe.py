"""A vision-side probe: can an encoder alone read the hatch task? (no LLM in the way)

``python -m benchmarks.probe`` trains each encoder preset + mean pooling over its tokens + a
linear head on the hatch task (:func:`mixres.integrations.llava.synthetic.make_hatch_example`,
4 orientations, 25 % by chance) with the same optimiser, steps and data for every preset, and
prints held-out accuracy. It tells whether a setting can work at all before the LLaVA recipe
(LLM, templates, Trainer) is involved: if the probe cannot read the lines, neither can the MLLM.

The helpers (:func:`hatch_tensors`, :class:`Probe`, :func:`train_probe`) are reused by the
mechanism test (``tests/test_effect.py``).
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["PRESETS", "hatch_tensors", "Probe", "train_probe", "main"]

PRESETS: tuple[str, ...] = ("llava-hr-tiny-128-lowres", "llava-hr-tiny-128-vit4x", "llava-hr-tiny-128")


def hatch_tensors(num: int, seed: int, image_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``num`` hatch samples as the recipe feeds them (CLIP-normalised).

    Returns:
        ``images (Tensor[num, 3, S, S])``, ``labels (LongTensor[num])`` (index into
        ``ORIENTATIONS``) and ``boxes (LongTensor[num, 4])`` (the patch, ``x0, y0, x1, y1``).
    """
    from mixres.integrations.llava.preprocess import ImagePreprocessor
    from mixres.integrations.llava.synthetic import ORIENTATIONS, make_hatch_example

    prep = ImagePreprocessor(image_size)
    examples = [make_hatch_example(random.Random(f"probe/{seed}/{i}"), image_size=image_size) for i in range(num)]
    images = torch.stack([prep(ex.image) for ex in examples])
    labels = torch.tensor([ORIENTATIONS.index(ex.turns[0][1]) for ex in examples])
    return images, labels, torch.tensor([ex.bbox for ex in examples])


class Probe(nn.Module):
    """An encoder, the mean of its tokens and a linear head: ``images -> logits (Tensor[B, classes])``."""

    def __init__(self, encoder: nn.Module, num_classes: int = 4) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.out_dim, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens, _ = self.encoder(images)
        return self.head(tokens.mean(dim=1))


def train_probe(preset: str, data: tuple[torch.Tensor, ...], test: tuple[torch.Tensor, ...], *, steps: int,
                batch_size: int = 32, lr: float = 2e-3, betas: tuple[float, float] = (0.9, 0.95),
                seed: int = 0, **encoder: Any) -> dict[str, Any]:
    """Train a :class:`Probe` on ``preset`` (``encoder``: overrides of the preset) and score it on ``test``.

    Returns:
        ``{"preset", "accuracy", "train_time_s", "model"}``.
    """
    import mixres

    torch.manual_seed(seed)
    model = Probe(mixres.create_encoder(preset, **encoder))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr, betas=betas)
    images, labels = data[0], data[1]
    order = torch.Generator().manual_seed(seed)
    start = time.perf_counter()
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(images), (batch_size,), generator=order)
        loss = nn.functional.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    elapsed = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        hits = sum(int((model(x).argmax(-1) == y).sum()) for x, y in zip(test[0].split(64), test[1].split(64)))
    return {"preset": preset, "accuracy": hits / len(test[1]), "train_time_s": round(elapsed, 1), "model": model}


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Probe every preset for every seed and print the accuracies."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.probe", description=__doc__.split("\n")[0])
    parser.add_argument("--presets", nargs="+", default=list(PRESETS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--num_train", type=int, default=2000)
    args = parser.parse_args(argv)
    data, test = hatch_tensors(args.num_train, seed=0), hatch_tensors(200, seed=1)
    rows = []
    for preset in args.presets:
        runs = [train_probe(preset, data, test, steps=args.steps, seed=s) for s in args.seeds]
        acc = [r["accuracy"] for r in runs]
        rows.append({"preset": preset, "accuracy": acc, "train_time_s": statistics.mean(r["train_time_s"] for r in runs)})
        print(f"{preset:<26} accuracy {statistics.mean(acc):.1%} (seeds: {', '.join(f'{a:.0%}' for a in acc)}), "
              f"{rows[-1]['train_time_s']:.0f} s per run", flush=True)
    return rows


if __name__ == "__main__":
    main()
