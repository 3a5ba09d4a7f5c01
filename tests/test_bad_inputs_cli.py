"""Bad input at the command lines (``mixres``, ``mixres chat``) and the inference helpers.

A user error is exactly one line on stderr that names the bad value, and exit status 2; the
traceback comes only with ``--debug``. Table-driven: argv, the fragment of that one line.
"""

from __future__ import annotations

import re

import pytest
from PIL import Image

from mixres.cli import main
from mixres.errors import MixresError
from mixres.integrations.hf import chat
from mixres.integrations.hf.errors import ImageInputError, ModelPathError
from mixres.integrations.hf.inference import generate, load_pretrained


def _image(tmp_path, name="cat.png", size=(16, 16)):
    path = tmp_path / name
    Image.new("RGB", size).save(path)
    return str(path)


def _model_dir(tmp_path, config_text):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text(config_text)
    return str(d)


def _chat(tmp_path, *extra, model=None, image=None):
    return ["chat", "--model", model or str(tmp_path / "no-model"), "--image", image or _image(tmp_path),
            "--prompt", "what?", *extra]


# (id, argv(tmp_path), fragment of the one stderr line)
CASES = [
    ("describe-unknown-preset", lambda t: ["describe", "llava-hr-7b-999"], r"^mixres: error: unknown encoder 'llava-hr-7b-999'"),
    ("describe-zero-size", lambda t: ["describe", "llava-hr-tiny", "--image-size", "0", "64"], r"^mixres: error: image_size has to be > 0, but got 0"),
    ("describe-negative-size", lambda t: ["describe", "llava-hr-tiny", "--image-size", "-64", "64"], r"got -64"),
    ("chat-no-model-dir", lambda t: _chat(t), r"^mixres chat: error: model directory '.*no-model' does not exist"),
    ("chat-missing-image", lambda t: _chat(t, image=str(t / "none.png")), r"image file '.*none\.png' does not exist"),
    ("chat-not-an-image", lambda t: _chat(t, image=_text(t)), r"'.*notes\.png' is not an image PIL can read"),
    ("chat-zero-tokens", lambda t: _chat(t, "--max-new-tokens", "0"), r"--max-new-tokens has to be > 0, but got 0"),
    ("chat-negative-temperature", lambda t: _chat(t, "--temperature", "-0.5"), r"--temperature has to be a finite number >= 0, but got -0\.5"),
    ("chat-nan-temperature", lambda t: _chat(t, "--temperature", "nan"), r"but got nan"),
    ("chat-bad-device", lambda t: _chat(t, "--device", "gpu0"), r"--device 'gpu0' is not a torch device"),
    ("chat-config-not-json", lambda t: _chat(t, model=_model_dir(t, "{not json")), r"config\.json' is not valid JSON"),
    ("chat-config-no-model-type", lambda t: _chat(t, model=_model_dir(t, '{"hidden_size": 4}')), r"'.*model' could not be loaded as a model \+ processor"),
    ("chat-no-config", lambda t: _chat(t, model=_empty_dir(t)), r"'.*empty' holds no config\.json"),
    ("via-mixres-chat", lambda t: ["chat", *_chat(t, "--max-new-tokens", "-3")[1:]], r"--max-new-tokens has to be > 0, but got -3"),
]


def _text(tmp_path):
    path = tmp_path / "notes.png"
    path.write_text("not an image at all")
    return str(path)


def _empty_dir(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    return str(d)


@pytest.mark.parametrize("argv, fragment", [pytest.param(a, f, id=i) for i, a, f in CASES])
def test_one_line_and_status_2(argv, fragment, tmp_path, capsys):
    status = main(argv(tmp_path))
    err = capsys.readouterr().err
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert re.search(fragment, lines[0]), f"{lines[0]!r} lacks {fragment!r}"


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(MixresError, match="unknown encoder 'nope'"):
        main(["--debug", "describe", "nope"])
    with pytest.raises(MixresError, match="unknown encoder 'nope'"):
        main(["describe", "nope", "--debug"])
    with pytest.raises(MixresError, match="--max-new-tokens has to be > 0"):
        main(_chat(tmp_path, "--max-new-tokens", "0", "--debug"))


def test_a_bug_is_one_line_and_status_1(monkeypatch, capsys):
    """An unexpected exception is not a user error: status 1, one line that points at --debug."""
    import mixres.cli as cli

    def broken(args):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr(cli, "cmd_list", broken)
    assert main(["list"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "internal error (ZeroDivisionError: division by zero)" in err[0] and "--debug" in err[0]


def test_a_decompression_bomb_is_refused_by_chat(tmp_path, monkeypatch):
    path = _image(tmp_path, "big.png", (64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 4096 px > 2 * 500: PIL raises, not warns
    with pytest.raises(ImageInputError, match=r"big\.png' is refused as a decompression bomb"):
        chat.open_image(path)


INFERENCE_CASES = [
    ("image-not-in-a-list", lambda t: generate(None, None, Image.new("RGB", (16, 16)), ["<image>"]), ImageInputError, r"list of PIL images, but got Image"),
    ("no-images", lambda t: generate(None, None, [], ["<image>"]), ImageInputError, r"images is empty"),
    ("max-new-tokens-0", lambda t: generate(None, None, [Image.new("RGB", (16, 16))], ["<image>"], max_new_tokens=0), MixresError, r"max_new_tokens has to be an int > 0, but got 0"),
    ("max-new-tokens-float", lambda t: generate(None, None, [Image.new("RGB", (16, 16))], ["<image>"], max_new_tokens=2.5), MixresError, r"but got 2\.5"),
    ("load-missing-dir", lambda t: load_pretrained(t / "absent"), ModelPathError, r"'.*absent' does not exist"),
    ("load-config-not-json", lambda t: load_pretrained(_model_dir(t, "[1, 2")), ModelPathError, r"config\.json' is not valid JSON"),
]


@pytest.mark.parametrize("call, error, fragment", [pytest.param(c, e, f, id=i) for i, c, e, f in INFERENCE_CASES])
def test_inference_refuses(call, error, fragment, tmp_path):
    with pytest.raises(error) as info:
        call(tmp_path)
    assert re.search(fragment, str(info.value)), str(info.value)
