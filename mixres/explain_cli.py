"""``mixres explain``: a PNG of where the high-res pathway changed the tokens of one image.

::

    mixres explain --model runs/s2 --image photo.png --out explain.png
    mixres explain --encoder llava-hr-7b-1024 --image photo.png   # random weights: zero maps

The encoder comes from a model directory (a recipe / mrified ``save_pretrained`` output, or a
``mixres convert`` output with ``mixres_config.json``) or from a preset (random weights; its
zero-init MR-Adapters give exactly zero maps, which the figure says). The image goes through
the processor saved with the model (as in training and evaluation), or, for a preset or a
converted encoder, the recipe's preprocessing (pad to a square with the mean colour, resize to
the encoder's input size, CLIP normalisation); the maps come from :func:`mixres.explain.explain`, and the figure shows the
image, the summed high-res heat map over it, one panel per adapter with its gate, and one
panel per cross-attention map (the chosen token's cell outlined). Each panel is coloured from
its own minimum to its maximum (both printed), so a map that is nearly constant still shows
where it is largest: read the range before reading the colours. Needs matplotlib and Pillow.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import MixresError
from .explain import Explanation, explain, find_encoder

__all__ = ["load_encoder", "plot_explanation", "build_parser", "run", "main"]


def _recipe_images(side: int, aspect_ratio: str = "pad") -> tuple[Any, tuple, tuple]:
    from mixres.integrations.llava.preprocess import ImagePreprocessor

    prep = ImagePreprocessor(side, aspect_ratio=aspect_ratio)
    return prep, tuple(prep.mean), tuple(prep.std)


def load_encoder(model: str | None = None, encoder: str | None = None) -> tuple[torch.nn.Module, Any, tuple, tuple]:
    """``(encoder, prepare, mean, std)`` from a model directory or an encoder preset.

    ``prepare`` turns a PIL image into the encoder's ``Tensor[3, S, S]``: the processor saved
    with a ``save_pretrained`` model (what training and evaluation used), else the recipe's
    preprocessing (pad to square, resize to the encoder's size, CLIP normalisation).

    Raises:
        MixresError: neither or both given, or a directory that holds no model.
    """
    if (model is None) == (encoder is None):
        raise MixresError("give exactly one of --model DIR and --encoder PRESET")
    if encoder is not None:
        import mixres

        built = mixres.create_encoder(encoder)
        return (built.eval(), *_recipe_images(int(built.image_size[0])))
    directory = Path(model)
    if (directory / "mixres_config.json").is_file():
        from .convert import load_converted

        built = load_converted(directory)[0]
        return (built.eval(), *_recipe_images(int(built.image_size[0])))
    if not (directory / "config.json").is_file():
        raise MixresError(f"{model!r} holds neither config.json (a save_pretrained model) nor mixres_config.json "
                          "(a mixres convert output)")
    from mixres.integrations.hf import load_pretrained
    from mixres.integrations.llava.model import ProcessorImages

    hf_model, processor = load_pretrained(directory)
    images = ProcessorImages(processor)
    ip = images.image_processor
    return find_encoder(hf_model).eval(), images, tuple(ip.image_mean), tuple(ip.image_std)


def _prepare(image_path: str, prepare: Any, mean: tuple, std: tuple) -> tuple[torch.Tensor, Any]:
    """The normalised tensor the encoder reads and the RGB picture it shows (same geometry)."""
    from PIL import Image

    with Image.open(image_path) as opened:
        pixels = prepare(opened.convert("RGB"))
    shown = (pixels * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)).clamp(0, 1)
    return pixels[None], shown.permute(1, 2, 0).numpy()


def _overlay(ax: Any, shown: Any, heat: torch.Tensor, title: str, cell: tuple[int, int] | None = None,
             grid: tuple[int, int] | None = None) -> Any:
    """The heat map over the picture, scaled to its own [min, max] (printed in the title)."""
    side = shown.shape[0]
    low, high = float(heat.min()), float(heat.max())
    ax.imshow(shown)
    im = ax.imshow(heat.numpy(), cmap="inferno", alpha=0.6, extent=(0, side, side, 0), vmin=low,
                   vmax=high if high > low else low + 1.0, interpolation="nearest")
    if cell is not None and grid is not None:  # outline the chosen token's cell of its grid
        from matplotlib.patches import Rectangle

        h, w = grid
        ax.add_patch(Rectangle((cell[1] * side / w, cell[0] * side / h), side / w, side / h, fill=False, ec="cyan", lw=1.5))
    ax.set_title(f"{title}\n[{low:.4g}, {high:.4g}]", fontsize=8)
    ax.axis("off")
    return im


def plot_explanation(exp: Explanation, shown: Any, path: str | Path, *, title: str = "") -> Path:
    """Draw ``exp`` over the picture ``shown`` (H x W x 3 in [0, 1]) and save a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    adapters = list(exp.high_res)
    attention = list(exp.attention)
    panels = 1 + (exp.total is not None) + len(adapters) + len(attention)
    fig, axes = plt.subplots(1, panels, figsize=(2.6 * panels, 3.0), squeeze=False)
    axes = list(axes[0])
    axes[0].imshow(shown)
    axes[0].set_title("input (as the encoder reads it)", fontsize=8)
    axes[0].axis("off")
    k = 1
    vmax = max([float(m[0].max()) for m in exp.high_res.values()] + [0.0])
    if exp.total is not None:
        im = _overlay(axes[k], shown, exp.total[0], "sum over adapters of |g f_h(F_h)|")
        fig.colorbar(im, ax=axes[k], fraction=0.046)
        k += 1
    for name in adapters:
        gate = exp.gates.get(name)
        note = "g = 1" if gate is None else f"g = {float(gate[0].mean()):+.3f}" + (" (mean)" if gate.shape[-1] > 1 else "")
        _overlay(axes[k], shown, exp.high_res[name][0], f"{name}: |g f_h|, {note}")
        k += 1
    for name in attention:
        owner = name.split("/source")[0]
        _overlay(axes[k], shown, exp.attention[name][0], f"{name}: attention of token {exp.tokens[owner]}",
                 exp.tokens[owner], exp.grids[owner])
        k += 1
    if vmax == 0 and adapters:
        title = (title + "\n" if title else "") + "all high-res maps are exactly 0 (zero-init adapters: untrained?)"
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The arguments of ``mixres explain`` (added to ``parser`` when given)."""
    p = parser or argparse.ArgumentParser(prog="mixres explain", description=__doc__.split("\n")[0])
    p.add_argument("--model", help="model directory (save_pretrained output or mixres convert output)")
    p.add_argument("--encoder", help="encoder preset instead (random weights)")
    p.add_argument("--image", required=True, help="the image file")
    p.add_argument("--token", type=int, nargs=2, metavar=("ROW", "COL"), help="query token of attention maps (default: centre)")
    p.add_argument("--out", help="PNG path (default: <image stem>-explain.png next to the image)")
    p.add_argument("--json", action="store_true", help="also write the maps as JSON lists beside the PNG")
    return p


def run(args: argparse.Namespace) -> int:
    """Run ``mixres explain`` from parsed arguments; returns the exit code."""
    try:
        encoder, prepare, mean, std = load_encoder(args.model, args.encoder)
        pixels, shown = _prepare(args.image, prepare, mean, std)
        exp = explain(encoder, pixels.to(next(encoder.parameters()).dtype), token=tuple(args.token) if args.token else None)
    except (MixresError, OSError) as err:  # OSError: missing or unreadable image (PIL raises its subclasses)
        print(f"mixres explain: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.image).with_name(Path(args.image).stem + "-explain.png")
    plot_explanation(exp, shown, out, title=f"{args.model or args.encoder} on {Path(args.image).name}")
    if args.json:
        maps = {"high_res": {k: v[0].tolist() for k, v in exp.high_res.items()},
                "gates": {k: v[0].tolist() for k, v in exp.gates.items()},
                "attention": {k: v[0].tolist() for k, v in exp.attention.items()}, "tokens": exp.tokens}
        out.with_suffix(".json").write_text(json.dumps(maps) + "\n")
    for name, heat in exp.high_res.items():
        gate = exp.gates.get(name)
        print(f"{name}: max |g f_h| {float(heat.max()):.4g} at cell {divmod(int(heat[0].argmax()), heat.shape[-1])}"
              + ("" if gate is None else f", gate {float(gate.mean()):+.4f}"))
    print(f"wrote {out}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mixres.explain_cli (--model DIR | --encoder PRESET) --image IMG [--out PNG]``."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
