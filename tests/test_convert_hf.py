"""The HF converter (official LLaVA-HR -> transformers Llava with a mixres tower) on tiny
checkpoints in the release's layout (tests/release_checkpoint.py)."""

import json
import stat

import pytest
import torch

pytest.importorskip("transformers")
from release_checkpoint import LAYOUTS, mixres_config, write_release  # noqa: E402
from release_forward import release_forward  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import AutoProcessor, PreTrainedTokenizerFast  # noqa: E402

from mixres import WeightsError  # noqa: E402
from mixres.errors import MixresError  # noqa: E402
from mixres.integrations.hf import load_pretrained  # noqa: E402
from mixres.integrations.hf.convert import convert_llava_hr  # noqa: E402
from mixres.integrations.hf.tiny import WORDS  # noqa: E402

ATOL = 1e-5  # float32 on O(1) features, as in test_convert.py (measured ~1e-6)


def _release_dir(path, name, **kw):
    state = write_release(path, name, **kw)
    words = [w for w in WORDS if w != "<image>"]  # the release has no image token (it splices id -200)
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(path)
    return state


@pytest.mark.parametrize("name", ["7b-1024", "x-1024"])
def test_hf_converter_matches_the_release_forward(tmp_path, name):
    state = _release_dir(tmp_path / "src", name)
    report = convert_llava_hr(tmp_path / "src", tmp_path / "hf", preset=mixres_config(name))
    assert report.ok and not report.unexpected and not report.missing
    model, loaded = load_pretrained(tmp_path / "hf")
    assert model.config.text_config.hidden_size == LAYOUTS[name].llm_dim
    # the tower's config names the release's backend, so load_pretrained (chat, eval) preprocesses as released
    assert model.config.vision_config.image_backend == "pil"
    assert type(loaded.image_processor).__name__ == "LlavaImageProcessorPil"
    assert type(load_pretrained(tmp_path / "hf", backend="torchvision")[1].image_processor).__name__ == "LlavaImageProcessor"
    side = LAYOUTS[name].image_size
    pixels = torch.randn(1, 3, side, side, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        features = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        tokens = release_forward(pixels, state, LAYOUTS[name])
        hidden = torch.nn.functional.gelu(tokens @ state["model.mm_projector.0.weight"].T + state["model.mm_projector.0.bias"])
        expected = hidden @ state["model.mm_projector.2.weight"].T + state["model.mm_projector.2.bias"]
    torch.testing.assert_close(features, expected, rtol=0, atol=ATOL)
    torch.testing.assert_close(model.lm_head.weight[:30], state["lm_head.weight"], rtol=0, atol=0)
    # a plain AutoProcessor gets the PIL backend on request (transformers' default is torchvision)
    processor = AutoProcessor.from_pretrained(tmp_path / "hf", backend="pil")
    assert type(processor.image_processor).__name__ == "LlavaImageProcessorPil"
    assert processor.image_processor.do_pad and processor.image_processor.size["shortest_edge"] == side


def test_hf_converter_keeps_bf16_and_writes_one_unit(tmp_path):
    _release_dir(tmp_path / "src", "7b-1024", dtype=torch.bfloat16)
    convert_llava_hr(tmp_path / "src", tmp_path / "hf", preset=mixres_config("7b-1024"))
    from mixres.convert import read_checkpoint

    dtypes = {v.dtype for v in read_checkpoint(tmp_path / "hf").values() if v.is_floating_point()}
    assert dtypes == {torch.bfloat16}  # no upcast: the output is the size of the input
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "src"]  # no temporary left beside it
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "hf").iterdir()}
    assert len(modes) == 1  # every file the same permissions
    with pytest.raises(MixresError, match="is not empty"):
        convert_llava_hr(tmp_path / "src", tmp_path / "hf", preset=mixres_config("7b-1024"))
    convert_llava_hr(tmp_path / "src", tmp_path / "hf", preset=mixres_config("7b-1024"), overwrite=True, dtype="fp32")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "float32"


def test_hf_converter_errors_name_the_file(tmp_path):
    _release_dir(tmp_path / "src", "7b-1024")
    (tmp_path / "src" / "config.json").write_text('{"hidden_size": 24,')
    with pytest.raises(WeightsError, match=r"release config '.*src/config.json' is not valid JSON"):
        convert_llava_hr(tmp_path / "src", tmp_path / "hf", preset=mixres_config("7b-1024"))
    (tmp_path / "file").write_text("x")
    with pytest.raises(MixresError, match="exists and is not a directory"):
        convert_llava_hr(tmp_path / "src", tmp_path / "file")
