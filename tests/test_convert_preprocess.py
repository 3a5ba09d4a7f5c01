"""Preprocessing as the LLaVA-HR release ran it, against a re-derivation from PIL's own calls.

The release (``llava_hr/train/train.py``, ``mm_utils.process_images``) pads to a square with
``tuple(int(x * 255) for x in image_mean)`` and then calls transformers 4.31's
``CLIPImageProcessor`` (``size=R``, ``crop_size=R``, ``resample=3``): PIL bicubic resize of the
shortest edge to ``R`` (the other ``int(R * long / short)``), centre crop (``(H - R) // 2``),
``uint8 * (1/255)`` in float64 cast to float32, ``(x - mean) / std`` in float32.

Run as a script to print the measured differences of each path (docs/converting.md quotes them):
``.venv/bin/python tests/test_convert_preprocess.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from mixres.integrations.hf.images import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, reference_pixel_values

SIZES = [(640, 480), (500, 375), (333, 1000), (1024, 1024), (1600, 900), (300, 301)]  # (w, h)


def pil_reference(image: Image.Image, side: int, pad: bool = True) -> np.ndarray:
    """The release's steps, each written with PIL / NumPy directly: float32 [3, side, side]."""
    image = image.convert("RGB")
    if pad and image.width != image.height:  # mm_utils.expand2square
        big = max(image.size)
        canvas = Image.new("RGB", (big, big), tuple(int(m * 255) for m in OPENAI_CLIP_MEAN))
        canvas.paste(image, ((big - image.width) // 2, (big - image.height) // 2))
        image = canvas
    w, h = image.size
    if w <= h:
        new_w, new_h = side, int(side * h / w)
    else:
        new_w, new_h = int(side * w / h), side
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
    top, left = (new_h - side) // 2, (new_w - side) // 2
    image = image.crop((left, top, left + side, top + side))
    x = (np.asarray(image).astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.array(OPENAI_CLIP_MEAN, dtype=np.float32)) / np.array(OPENAI_CLIP_STD, dtype=np.float32)
    return x.transpose(2, 0, 1)


def photo(w: int, h: int, seed: int) -> Image.Image:
    """Smooth colour fields with sharp edges and fine noise: resampling differences show at all scales."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([np.sin(xx * (5 + c) + yy * (3 - c) + c) for c in range(3)], -1) * 90 + 128
    base[(xx * 7).astype(int) % 2 == 0] += 40
    return Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8))


def _torch_bicubic(image: Image.Image, side: int) -> np.ndarray:
    """The path mixres used before (torch bicubic + antialias on the padded square), for the record."""
    big = max(image.size)
    canvas = Image.new("RGB", (big, big), tuple(int(m * 255) for m in OPENAI_CLIP_MEAN))
    canvas.paste(image, ((big - image.width) // 2, (big - image.height) // 2))
    x = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True).clamp(0, 1)[0]
    return ((x - torch.tensor(OPENAI_CLIP_MEAN).view(3, 1, 1)) / torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)).numpy()


def _hf(backend: str, side: int):
    from transformers import LlavaImageProcessor, LlavaImageProcessorPil

    cls = LlavaImageProcessorPil if backend == "pil" else LlavaImageProcessor
    proc = cls(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, do_pad=True)
    return lambda image: proc(image, return_tensors="pt")["pixel_values"][0].numpy()


def measure(side: int) -> dict[str, float]:
    """Max |difference| of each path from :func:`pil_reference`, in units of 1/255 of a pixel
    (normalised difference times std, times 255), over :data:`SIZES`."""
    paths = {"reference_pixel_values": lambda im: reference_pixel_values([im], side)[0].numpy(),
             "LlavaImageProcessorPil": _hf("pil", side), "LlavaImageProcessor (torchvision)": _hf("torchvision", side),
             "torch bicubic (old mixres)": lambda im: _torch_bicubic(im, side)}
    std = np.array(OPENAI_CLIP_STD, dtype=np.float32).reshape(3, 1, 1)
    out = dict.fromkeys(paths, 0.0)
    for seed, (w, h) in enumerate(SIZES):
        image = photo(w, h, seed)
        expected = pil_reference(image, side)
        for name, path in paths.items():
            out[name] = max(out[name], float(np.abs((path(image) - expected) * std).max() * 255))
    return out


@pytest.mark.parametrize("side", [64, 336])
def test_reference_pixel_values_is_the_release_preprocessing(side):
    # identical steps in float32: the only freedom left is the order of (x - mean) / std, i.e.
    # float32 rounding of values up to ~2.2: 1e-6 bounds it (4 ulp)
    for seed, (w, h) in enumerate(SIZES):
        image = photo(w // 4, h // 4, seed)
        np.testing.assert_allclose(reference_pixel_values([image], side)[0].numpy(), pil_reference(image, side),
                                   rtol=0, atol=1e-6)


def test_pad_colour_normalises_to_about_zero():
    wide = Image.fromarray(np.full((16, 64, 3), 255, dtype=np.uint8))
    pixels = reference_pixel_values([wide], 32)
    assert pixels[0, :, :6].abs().max() < 0.02  # int(m * 255) / 255 is within 1/255 of the mean
    assert pixels[0, :, 14:18].min() > 1.5  # the white image


def test_converted_processor_loads_with_the_pil_backend(tmp_path):
    from transformers import AutoImageProcessor

    from mixres.integrations.hf.images import release_image_processor

    release_image_processor(64).save_pretrained(tmp_path)
    proc = AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    image = photo(90, 50, 3)
    np.testing.assert_allclose(proc(image, return_tensors="pt")["pixel_values"][0].numpy(), pil_reference(image, 64),
                               rtol=0, atol=1e-6)


if __name__ == "__main__":
    for side in (1024, 1536):
        for name, diff in measure(side).items():
            print(f"R={side}  {name:36s} max |diff| = {diff:.2e} / 255")
