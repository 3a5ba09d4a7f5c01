"""Bad input into the LLaVA recipe's data side: untrusted JSON, image files and batches.

A dataset file is untrusted: its image paths stay inside ``image_folder``, its images are
decoded to what they show (16-bit grey is not white) or refused, PIL's decompression-bomb
guard is a bad sample, and JSON errors name the file. Table-driven: each case builds its files
in ``tmp_path`` and must raise our error class with a message naming the bad value.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from PIL import Image
from test_llava_data import _train_tokenizer

from mixres.errors import MixresError
from mixres.integrations.llava import ImagePreprocessor, LlavaCollator, LlavaDataError, LlavaDataset
from mixres.integrations.llava.data import to_rgb

N_IMG = 3


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer()


def sample(image="img.png", **extra):
    turns = [{"from": "human", "value": "<image>\nwhat is this?" if image is not None else "hi"},
             {"from": "gpt", "value": "red"}]
    record = {"id": "s1", "conversations": turns, **extra}
    if image is not None:
        record["image"] = image
    return record


def write_json(folder, records, name="data.json"):
    path = folder / name
    path.write_text(json.dumps(records))
    return path


def dataset(tmp_path, tokenizer, records, **kw):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (16, 16), (255, 0, 0)).save(folder / "img.png")
    return LlavaDataset(write_json(folder, records), tokenizer, num_image_tokens=N_IMG,
                        image_processor=ImagePreprocessor(size=16), **kw)


def save_mode(path, mode, value):
    if mode == "I":
        Image.fromarray(np.full((16, 16), value, dtype=np.int32)).save(path)  # TIFF keeps 32-bit ints
    elif mode == "F":
        Image.fromarray(np.full((16, 16), value, dtype=np.float32)).save(path)
    else:
        Image.fromarray(np.full((16, 16), value, dtype=np.uint16)).save(path)


def item_with_image(tmp_path, tokenizer, filename, mode, value, **kw):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    save_mode(folder / filename, mode, value)
    ds = dataset(tmp_path, tokenizer, [sample(filename)], **kw)
    return ds[0]


def bomb(tmp_path, tokenizer, monkeypatch, **kw):
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (64, 64)).save(folder / "big.png")
    ds = dataset(tmp_path, tokenizer, [sample("big.png"), sample("img.png", id="s2")], **kw)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 64*64 = 4096 > 2 * 500: PIL raises, not warns
    return ds


def collate(shapes, **kw):
    features = [{"input_ids": torch.tensor([1, 2]), "labels": torch.tensor([1, 2]), "id": f"s{k}",
                 "pixel_values": torch.zeros(shape) if shape else None} for k, shape in enumerate(shapes)]
    return LlavaCollator(0, **kw)(features)


# (id, call(tmp_path, tokenizer, monkeypatch), error, fragment)
CASES = [
    # paths leave image_folder
    ("parent-path", lambda t, k, m: dataset(t, k, [sample("../outside.png")]), LlavaDataError, r"image path '\.\./outside\.png' leaves image_folder"),
    ("nested-parent-path", lambda t, k, m: dataset(t, k, [sample("a/../../x.png")]), LlavaDataError, r"'a/\.\./\.\./x\.png' leaves image_folder"),
    ("absolute-path", lambda t, k, m: dataset(t, k, [sample("/etc/hostname")]), LlavaDataError, r"'/etc/hostname' leaves image_folder"),
    ("empty-path", lambda t, k, m: dataset(t, k, [sample("")]), LlavaDataError, r"non-empty file path .* got ''"),
    ("nul-byte-path", lambda t, k, m: dataset(t, k, [sample("a\x00b.png")]), LlavaDataError, r"NUL bytes, but got 'a\\x00b\.png'"),
    ("image-not-str", lambda t, k, m: dataset(t, k, [sample(3)]), LlavaDataError, r"'image' has to be one path \(str\), but got 3"),
    ("image-list", lambda t, k, m: dataset(t, k, [sample(["a.png", "b.png"])]), LlavaDataError, r"got \['a\.png', 'b\.png'\]"),
    ("image-missing", lambda t, k, m: dataset(t, k, [sample("nope.png")]), LlavaDataError, r"nope\.png' not found"),
    # image modes without an agreed conversion, and the decompression-bomb guard
    ("int32-tiff", lambda t, k, m: item_with_image(t, k, "i32.tif", "I", 70000), LlavaDataError, r"i32\.tif' cannot be read .*mode 'I'"),
    ("float-tiff", lambda t, k, m: item_with_image(t, k, "f.tif", "F", 0.5), LlavaDataError, r"f\.tif' cannot be read .*mode 'F'"),
    ("decompression-bomb", lambda t, k, m: bomb(t, k, m)[0], LlavaDataError, r"big\.png' cannot be read \(DecompressionBombError"),
    # JSON: the file and the key are named
    ("invalid-json", lambda t, k, m: _raw(t, k, b'[{"id": 1,}]'), LlavaDataError, r"data\.json' is not valid JSON: .* line 1 column"),
    ("not-utf8", lambda t, k, m: _raw(t, k, b'["\xff\xfe"]'), LlavaDataError, r"data\.json' is not UTF-8"),
    ("top-level-dict", lambda t, k, m: _raw(t, k, b'{"id": "x"}'), LlavaDataError, r"data\.json' has to hold a list of samples, but holds a dict"),
    ("sample-not-dict", lambda t, k, m: dataset(t, k, ["just text"]), LlavaDataError, r"sample '#0': .* but got 'just text'.*data\.json"),
    ("no-conversations", lambda t, k, m: dataset(t, k, [{"id": "q", "image": "img.png"}]), LlavaDataError, r"sample 'q': .*'conversations' list"),
    ("turn-without-value", lambda t, k, m: dataset(t, k, [{"id": "v", "conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]}]), LlavaDataError, r"sample 'v': .*'value', but got NoneType"),
    ("turn-wrong-role", lambda t, k, m: dataset(t, k, [{"id": "r", "conversations": [{"from": "gpt", "value": "x"}, {"from": "gpt", "value": "y"}]}]), LlavaDataError, r"sample 'r': .*from 'human', but got 'gpt'"),
    ("two-placeholders", lambda t, k, m: dataset(t, k, [dict(sample(), conversations=[{"from": "human", "value": "<image> <image>"}, {"from": "gpt", "value": "x"}])]), LlavaDataError, r"exactly one '<image>' placeholder .* but has 2"),
    ("missing-file", lambda t, k, m: LlavaDataset(t / "none.json", k, num_image_tokens=N_IMG), MixresError, r"none\.json' is no file"),
    # dataset and preprocessor arguments
    ("num_image_tokens-0", lambda t, k, m: LlavaDataset([], k, num_image_tokens=0), MixresError, r"num_image_tokens has to be > 0, but got 0"),
    ("max_length-negative", lambda t, k, m: LlavaDataset([], k, num_image_tokens=1, max_length=-5), MixresError, r"max_length has to be > 0, but got -5"),
    ("on_error-unknown", lambda t, k, m: LlavaDataset([], k, num_image_tokens=1, on_error="warn"), MixresError, r"got 'warn'"),
    ("slow-tokenizer", lambda t, k, m: LlavaDataset([], object(), num_image_tokens=1), TypeError, r"fast HF tokenizer .* got object"),
    ("preprocessor-size-0", lambda t, k, m: ImagePreprocessor(size=0), MixresError, r"size has to be > 0, but got 0"),
    ("preprocessor-std-0", lambda t, k, m: ImagePreprocessor(std=(0.2, 0.0, 0.2)), MixresError, r"std has to be > 0 .* \(0\.2, 0\.0, 0\.2\)"),
    ("preprocessor-mean-2", lambda t, k, m: ImagePreprocessor(mean=(0.5, 0.5)), MixresError, r"mean has to have 3 values .* \(0\.5, 0\.5\)"),
    ("preprocessor-aspect", lambda t, k, m: ImagePreprocessor(aspect_ratio="stretch"), MixresError, r"got 'stretch'"),
    ("to_rgb-array", lambda t, k, m: to_rgb(np.zeros((4, 4, 3), np.uint8)), TypeError, r"PIL\.Image, but got ndarray"),
    ("to_rgb-hsv", lambda t, k, m: to_rgb(Image.new("HSV", (4, 4))), MixresError, r"image mode 'HSV' has no agreed conversion"),
    # collator
    ("collate-mixed-sizes", lambda t, k, m: collate([(3, 16, 16), (3, 32, 32)]), MixresError, r"different sizes.*\[3, 16, 16\]: \['s0'\]; \[3, 32, 32\]: \['s1'\]"),
    ("collate-zeros-wrong-size", lambda t, k, m: collate([(3, 16, 16), None], text_only_images="zeros", image_size=32), MixresError, r"expected \[3, 32, 32\].*\[3, 16, 16\]"),
    ("collate-rank2-pixels", lambda t, k, m: collate([(16, 16)]), MixresError, r"pixel_values of sample 's0' has to be a Tensor\[3, S, S\], but got torch\.Size\(\[16, 16\]\)"),
    ("collate-empty", lambda t, k, m: LlavaCollator(0)([]), MixresError, r"empty batch"),
    ("collate-pad-bool", lambda t, k, m: LlavaCollator(True), TypeError, r"pad_token_id has to be an int, but got True"),
    ("collate-multiple-0", lambda t, k, m: LlavaCollator(0, pad_to_multiple_of=0), MixresError, r"pad_to_multiple_of has to be > 0, but got 0"),
]


def _raw(tmp_path, tokenizer, payload: bytes):
    path = tmp_path / "data.json"
    path.write_bytes(payload)
    return LlavaDataset(path, tokenizer, num_image_tokens=N_IMG)


@pytest.mark.parametrize("call, error, fragment", [pytest.param(c, e, f, id=i) for i, c, e, f in CASES])
def test_refused(call, error, fragment, tmp_path, tokenizer, monkeypatch):
    with pytest.raises(error) as info:
        call(tmp_path, tokenizer, monkeypatch)
    assert re.search(fragment, str(info.value)), f"message {str(info.value)!r} lacks {fragment!r}"


@pytest.mark.parametrize("value, expected", [(0, 0), (257, 1), (32768, 128), (65535, 255)])
def test_sixteen_bit_grey_png_keeps_its_values(tmp_path, tokenizer, value, expected):
    """A 16-bit grey PNG (PIL mode I;16) shows v >> 8 in every channel, never a clipped white."""
    path = tmp_path / "g16.png"
    save_mode(path, "I;16", value)
    assert Image.open(path).mode == "I;16"
    item = item_with_image(tmp_path, tokenizer, "g16.png", "I;16", value)
    pixels = item["pixel_values"] * torch.tensor(ImagePreprocessor().std).view(3, 1, 1) + torch.tensor(ImagePreprocessor().mean).view(3, 1, 1)
    # 1/255 tolerance: the float round trip of an 8-bit value through normalise/denormalise
    torch.testing.assert_close(pixels, torch.full_like(pixels, expected / 255), atol=1e-5, rtol=0)


def test_bad_images_are_skipped_as_bad_samples(tmp_path, tokenizer, monkeypatch):
    """With on_error='skip', a bomb or an unconvertible mode is counted and the next sample served."""
    ds = bomb(tmp_path, tokenizer, monkeypatch, on_error="skip")
    item = ds[0]
    assert item["id"] == "s2" and ds.skipped == 1 and ds.skipped_ids == ["s1"]


def test_paths_outside_the_folder_skip_or_pass_when_asked(tmp_path, tokenizer):
    outside = tmp_path / "outside.png"
    Image.new("RGB", (16, 16), (0, 255, 0)).save(outside)
    skipped = dataset(tmp_path, tokenizer, [sample("../outside.png")], on_error="skip")
    assert len(skipped) == 0 and skipped.skipped_ids == ["s1"]
    trusted = dataset(tmp_path, tokenizer, [sample("../outside.png"), sample(str(outside), id="abs")],
                      allow_outside_image_folder=True)
    assert len(trusted) == 2 and trusted[1]["pixel_values"].shape == (3, 16, 16)


def test_a_symlink_placed_inside_the_folder_is_followed(tmp_path, tokenizer):
    """The check is lexical: links the user put in their own folder are theirs to trust."""
    shared = tmp_path / "shared.png"
    Image.new("RGB", (16, 16)).save(shared)
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "link.png").symlink_to(shared)
    assert len(dataset(tmp_path, tokenizer, [sample("link.png")])) == 1
