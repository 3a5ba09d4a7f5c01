"""What serving engines' transformers backends ask of a mrified model (vLLM / SGLang themselves
cannot be installed here: no CUDA, and their wheels pin other torch versions).

vLLM's (and SGLang's) transformers backend loads a model through transformers, requires
``_supports_attention_backend`` on it, swaps every attention for its own kernel by registering
a function with transformers' ``AttentionInterface`` and setting ``attn_implementation`` to it,
and counts the placeholder tokens of each image with the processor's
``_get_num_multimodal_tokens(image_sizes)`` before the model runs.
"""

import collections

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("timm")

from transformers import AttentionInterface  # noqa: E402
from transformers.integrations.sdpa_attention import sdpa_attention_forward  # noqa: E402

from mixres.integrations.hf import mrify  # noqa: E402
from mixres.integrations.hf.tiny import tiny_llava  # noqa: E402

CNN = {"name": "timm_map", "model_name": "convnext_atto", "model_kwargs": {"dims": [8, 16, 24, 32], "depths": [1, 1, 1, 1]}}
CALLS: list[str] = []


def _counting_attention(module, *args, **kwargs):
    """An engine's attention kernel stand-in: records the caller, computes with SDPA."""
    CALLS.append(type(module).__name__)
    return sdpa_attention_forward(module, *args, **kwargs)


AttentionInterface.register("mixres_counting", _counting_attention)


@pytest.fixture
def served():
    model, processor = tiny_llava()
    return mrify(model, map_pathway=CNN, image_size=64, processor=processor)


def test_declares_the_attention_backend_support(served):
    model, _ = served
    assert type(model)._supports_attention_backend and model.model.vision_tower._supports_attention_backend


def test_every_attention_runs_through_the_attention_interface(served):
    model, _ = served
    model.set_attn_implementation("mixres_counting")
    encoder = model.model.vision_tower.encoder
    assert encoder.token_pathway.model.config._attn_implementation == "mixres_counting"  # reaches the ViT inside
    n, side = model.config.vision_config.num_image_tokens, model.config.vision_config.image_size
    ids = torch.tensor([[model.config.image_token_index] * n + [5, 6]])
    CALLS.clear()
    with torch.no_grad():
        model(input_ids=ids, pixel_values=torch.randn(1, 3, side, side))
    vit_blocks = encoder.token_pathway.num_selected_blocks  # LLaVA reads the penultimate block: 3 of 4
    assert collections.Counter(CALLS) == {"CLIPAttention": vit_blocks, "LlamaAttention": model.config.text_config.num_hidden_layers}


def test_processor_counts_the_tokens_the_tower_returns(served):
    model, processor = served
    side = model.config.vision_config.image_size
    counts = processor._get_num_multimodal_tokens(image_sizes=[(side, side), (100, 300)])
    n = model.config.vision_config.num_image_tokens
    assert counts.num_image_tokens == [n, n]  # every image is resized to the tower's square input
    with torch.no_grad():
        tokens = model.model.get_image_features(pixel_values=torch.randn(2, 3, side, side), vision_feature_layer=-1,
                                                vision_feature_select_strategy="full").pooler_output
    assert [t.shape[0] for t in tokens] == [n, n]


def test_processor_prompt_expansion_matches_its_count_and_the_model_runs_it(served):
    # an engine replaces each image placeholder by `_get_num_multimodal_tokens` tokens; the processor's own
    # expansion of the prompt and the tower's features have to agree with that count, whatever the image's size
    from PIL import Image

    model, processor = served
    image = Image.new("RGB", (100, 300), (120, 30, 200))  # not square, not the tower's size
    inputs = processor(text=[f"{processor.image_token} what colour?"], images=[image], return_tensors="pt")
    (n,) = processor._get_num_multimodal_tokens(image_sizes=[(300, 100)]).num_image_tokens
    assert int((inputs["input_ids"] == model.config.image_token_index).sum()) == n
    with torch.no_grad():  # transformers checks that the image features fill exactly those positions
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
