"""AnyRes token counts agree with transformers' LLaVA-NeXT: its processor's count, its model's
packing (``pack_image_features``), and a mrified LLaVA-NeXT end to end.

Every oracle is transformers' own code (imported, never copied): ``LlavaNextImageProcessor``'s
default pinpoints, ``select_best_resolution``, ``LlavaNextProcessor._get_number_of_features``,
``LlavaNextModel.pack_image_features`` (which calls ``get_anyres_image_grid_shape`` and
``unpad_image``).
"""

import random

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import LlavaNextImageProcessor, LlavaNextProcessor  # noqa: E402

from mixres.anyres import HF_PINPOINTS, LLAVA_NEXT_PINPOINTS, anyres_layout, pinpoints_from_config  # noqa: E402
from mixres.integrations.hf.tiny import tiny_tokenizer  # noqa: E402

N_SIZES = 1000
_rng = random.Random(0)
# half small (up to two tiles: where the pinpoints tie), half up to 4000 px
SIZES = [(_rng.randint(1, top), _rng.randint(1, top)) for top in (672, 4000) for _ in range(N_SIZES // 2)]


def _processor(patch_size=14):
    image_processor = LlavaNextImageProcessor()  # transformers' defaults: 336-px tiles, its pinpoints
    return LlavaNextProcessor(image_processor=image_processor, tokenizer=tiny_tokenizer(), patch_size=patch_size,
                              vision_feature_select_strategy="full", num_additional_image_tokens=0)


def test_hf_default_pinpoints_are_ours():
    assert pinpoints_from_config(LlavaNextImageProcessor().image_grid_pinpoints, "hf") == list(HF_PINPOINTS)
    assert pinpoints_from_config(LlavaNextImageProcessor().image_grid_pinpoints, "llava_next") == list(LLAVA_NEXT_PINPOINTS)


def test_hf_convention_matches_the_processor_for_1000_sizes():
    processor = _processor()
    pinpoints = pinpoints_from_config(processor.image_processor.image_grid_pinpoints, "hf")
    mismatched, original_differs = [], 0
    for h, w in SIZES:
        theirs = processor._get_number_of_features(h, w, 336, 336)
        ours = anyres_layout((h, w), pinpoints, 336, (24, 24), convention="hf").num_tokens
        if ours != theirs:
            mismatched.append(((h, w), ours, theirs))
        original = anyres_layout((h, w), LLAVA_NEXT_PINPOINTS, 336, (24, 24), convention="llava_next").num_tokens
        original_differs += original != theirs
    assert not mismatched, mismatched[:5]
    # the original release's reading is a real, different option (ties + rounding); measured: 120
    # of these 1000 (229 of 1000 sizes up to 672 px, 11 of 1000 up to 4000 px)
    assert 0.05 * N_SIZES < original_differs < 0.3 * N_SIZES, original_differs


def test_rounding_is_the_difference_for_some_sizes():
    # 47.99999... rows: transformers rounds to 48, the release truncates to 47 (one more padding row off)
    diffs = [(h, w) for h in range(1, 400) for w in range(1, 60)
             if anyres_layout((h, w), [(672, 672)], 336, (24, 24), convention="hf").unpadded_grid
             != anyres_layout((h, w), [(672, 672)], 336, (24, 24), convention="llava_next").unpadded_grid]
    assert diffs, "expected some sizes where int() and int(round(., 7)) disagree"


@pytest.fixture(scope="module")
def mrified():
    from mixres.integrations.hf import mrify
    from mixres.integrations.hf.tiny import tiny_llava_next

    model, processor = tiny_llava_next()
    map_pathway = {"name": "timm_map", "model_name": "convnext_atto", "out_indices": [-1]}
    return mrify(model, map_pathway=map_pathway, image_size=64, processor=processor)


def test_mrified_llava_next_packs_as_many_tokens_as_its_processor_counts(mrified):
    """The model's own packing on features of the tower's grid, for 1000 sizes (no tower run)."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    model, processor = mrified
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    tile = processor.image_processor.size["shortest_edge"]
    pinpoints = model.config.image_grid_pinpoints
    dim = model.config.text_config.hidden_size
    for h, w in SIZES:
        patches = image_size_to_num_patches((h, w), pinpoints, vision.image_size)
        features = [torch.zeros(patches, grid * grid, dim)]
        packed, _ = model.model.pack_image_features(features, torch.tensor([[h, w]]), "full", model.model.image_newline)
        packed = torch.cat(list(packed)) if isinstance(packed, (list, tuple)) else packed
        expected = processor._get_number_of_features(h, w, tile, tile)
        assert packed.shape[0] == expected, ((h, w), packed.shape[0], expected)
        ours = anyres_layout((h, w), pinpoints_from_config(pinpoints, "hf"), tile, (grid, grid), convention="hf")
        assert ours.num_tokens == expected


@pytest.mark.parametrize("size", [(200, 300), (37, 101)])  # a tie of the two 2:1 pinpoints; a thin one
def test_mrified_llava_next_runs_end_to_end(mrified, size):
    """Processor -> model forward: the <image> expansion equals the features the model makes."""
    import numpy as np
    from PIL import Image

    model, processor = mrified
    h, w = size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    inputs = processor(images=[image], text=["USER: <image> describe the picture ASSISTANT:"], return_tensors="pt")
    with torch.no_grad():
        out = model.model.get_image_features(pixel_values=inputs["pixel_values"], image_sizes=inputs["image_sizes"])
    features = out.pooler_output if hasattr(out, "pooler_output") else out
    count = sum(f.shape[0] for f in features)
    assert count == int((inputs["input_ids"] == model.config.image_token_id).sum())
    with torch.no_grad():
        model(**inputs)  # transformers itself checks the features fill the <image> positions
