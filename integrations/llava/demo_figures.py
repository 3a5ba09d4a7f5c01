"""The demo's two figures: accuracy vs visual tokens, and one test image with each model's answer.

Used by :mod:`.demo` and ``benchmarks/effect.py``; matplotlib (the ``hf`` extra) is imported
only here, with the non-interactive ``Agg`` backend.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["effect_plot", "sample_figure", "high_res_map"]


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def effect_plot(runs: Mapping[str, Mapping[str, Any]], path: str | Path, *, title: str = "", chance: float = 0.25) -> Path:
    """Accuracy (y) vs visual tokens (x, log scale); bubble area proportional to train time.

    ``runs`` maps a variant name to ``{"image_tokens", "accuracy": {"all"}, "train_time_s"}``
    (one run) or ``{"image_tokens", "accuracy_mean", "accuracy_std", "train_time_s"}``
    (several seeds: drawn with an error bar).
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    biggest = max(float(r["train_time_s"]) for r in runs.values()) or 1.0
    for name, r in runs.items():
        mean = r["accuracy_mean"] if "accuracy_mean" in r else r["accuracy"]["all"]
        x, size = r["image_tokens"], 60 + 1400 * float(r["train_time_s"]) / biggest
        ax.scatter([x], [100 * mean], s=size, alpha=0.45)
        if "accuracy_std" in r:
            ax.errorbar([x], [100 * mean], yerr=[100 * r["accuracy_std"]], fmt="none", ecolor="black", capsize=4)
        ax.annotate(f"{name}\n{100 * mean:.0f} %, {float(r['train_time_s']):.0f} s", (x, 100 * mean),
                    textcoords="offset points", xytext=(12, -4), fontsize=9)
    ax.axhline(100 * chance, color="grey", linestyle="--", linewidth=1)
    ax.text(min(r["image_tokens"] for r in runs.values()), 100 * chance + 1.5, "chance", color="grey", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_xlim(min(r["image_tokens"] for r in runs.values()) / 1.6, max(r["image_tokens"] for r in runs.values()) * 2.5)
    ax.set_ylim(0, 105)
    ax.set_xlabel("visual tokens per image (LLM input)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title or "hatch task: accuracy vs visual tokens (bubble area: train time)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


@torch.no_grad()
def high_res_map(model: Any, image: Any) -> tuple[torch.Tensor | None, dict[str, float]]:
    """The MR-Adapters' summed high-res term ``|g f_h|`` per token and each adapter's mean gate.

    Args:
        model: a trained LLaVA holding a mixres tower.
        image: a PIL image.

    Returns:
        ``(Tensor[h, w] or None when the model has no adapter, {adapter: mean gate})``.
    """
    from mixres.explain import explain

    from .preprocess import ImagePreprocessor

    encoder = model.model.vision_tower.encoder
    side = int(model.config.vision_config.image_size)
    pixels = ImagePreprocessor(side)(image)[None].to(next(encoder.parameters()).dtype)
    was_training = encoder.training
    exp = explain(encoder.eval(), pixels)
    encoder.train(was_training)
    gates = {k: float(v.float().mean()) for k, v in exp.gates.items()}
    return (exp.total[0] if exp.total is not None else None), gates


def sample_figure(runs: Mapping[str, Mapping[str, Any]], data: Mapping[str, Path], path: str | Path,
                  *, index: int = 0, overlay: str = "MRA") -> Path:
    """One held-out image, its question, the truth and each model's answer; the ``overlay`` model's
    high-res contribution per token drawn over the image (with its adapters' gates)."""
    from PIL import Image

    plt = _pyplot()
    record = json.loads(Path(data["test"]).read_text())[index]
    with Image.open(Path(data["root"]) / record["image"]) as im:
        image = im.convert("RGB")
    question = record["conversations"][0]["value"].replace("<image>", "").strip()
    truth = record["conversations"][1]["value"]
    heat, gates = (None, {})
    if overlay in runs and "model" in runs[overlay]:
        heat, gates = high_res_map(runs[overlay]["model"], image)
    fig, axes = plt.subplots(1, 2, figsize=(8.4, 4.6))
    axes[0].imshow(image, interpolation="nearest")
    axes[0].set_title("test image", fontsize=9)
    axes[1].imshow(image, interpolation="nearest")
    if heat is not None:
        shown = axes[1].imshow(heat.float().numpy(), cmap="magma", alpha=0.6, extent=(0, image.width, image.height, 0),
                               interpolation="nearest")
        fig.colorbar(shown, ax=axes[1], fraction=0.046, label="|g f_h| summed over adapters")
        axes[1].set_title(f"{overlay}: high-res contribution per token\ngates "
                          + ", ".join(f"{v:+.2f}" for v in gates.values()), fontsize=9)
    x0, y0, x1, y1 = record["meta"]["bbox"]
    for ax in axes:
        ax.add_patch(plt.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="cyan", linewidth=1))
        ax.set_xticks([])
        ax.set_yticks([])
    answers = "   ".join(f"{name}: {r['predictions'].get(record['id'], '')!r}" for name, r in runs.items())
    fig.suptitle(f"Q: {question}   truth: {truth!r}\n{answers}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
