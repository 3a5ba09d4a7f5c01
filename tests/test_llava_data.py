"""The data side of the LLaVA-HR recipe: synthetic dataset, templates, dataset, collator.

A tiny byte-level BPE tokenizer is trained here on the recipe's own words (no downloads).
"""

import json
import logging
import random

import pytest
import torch
import transformers
from PIL import Image

from mixres.errors import MixresError, UnknownNameError
from mixres.integrations.llava import (
    ANSWERS,
    CLIP_MEAN,
    CLIP_STD,
    IGNORE_INDEX,
    TEMPLATES,
    VICUNA_SYSTEM,
    ImagePreprocessor,
    LlavaCollator,
    LlavaDataError,
    LlavaDataset,
    TemplateError,
    exact_match,
    expand2square,
    generate_dataset,
    get_template,
    make_example,
    synthetic,
)
from mixres.integrations.llava.synthetic import make_hatch_example

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
N_IMG = 7  # image tokens per image in these tests


def _train_tokenizer(with_image_token=True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    specials = ["<unk>", "<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + (["<image>"] if with_image_token else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [VICUNA_SYSTEM, "USER: ASSISTANT: user assistant", synthetic._FOLLOW_UP,
              *synthetic._QUESTIONS.values(), *(f"the {r} corner" for r in synthetic.REGIONS), " ".join(sorted(ANSWERS))]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus * 2, trainer)
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)]),
    ])
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                              unk_token="<unk>", pad_token="<pad>")
    hf.chat_template = CHATML
    return hf


@pytest.fixture(scope="module")
def tokenizer():
    return _train_tokenizer()


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("synth"), num_train=10, num_test=6, image_size=(512, 640), seed=3)


@pytest.fixture()
def image_dir(tmp_path):
    Image.new("RGB", (40, 20), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    return tmp_path


def _sample(sid, question, answer, image=None, more=()):
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    for q, a in more:
        turns += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    return {"id": sid, **({"image": image} if image else {}), "conversations": turns}


def _dataset(records, tokenizer, folder, **kw):
    kw.setdefault("num_image_tokens", N_IMG)
    kw.setdefault("image_processor", ImagePreprocessor(size=32))
    return LlavaDataset(records, tokenizer, image_folder=folder, **kw)


def _answer_runs(tokenizer, labels):
    """Decode each contiguous run of unmasked labels."""
    runs, current = [], []
    for label in labels.tolist() + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(tokenizer.decode(current, skip_special_tokens=False))
            current = []
    return runs


def _pixels(path):
    with Image.open(path) as im:
        return im.size, im.convert("RGB").tobytes()


# -- synthetic dataset -------------------------------------------------------------------------


def test_generator_is_deterministic(tmp_path, synth):
    again = generate_dataset(tmp_path / "a", num_train=10, num_test=6, image_size=(512, 640), seed=3)
    other = generate_dataset(tmp_path / "b", num_train=10, num_test=6, image_size=(512, 640), seed=4)
    for name in ("train_json", "test_json"):
        assert getattr(again, name).read_bytes() == getattr(synth, name).read_bytes()
        assert getattr(other, name).read_bytes() != getattr(synth, name).read_bytes()
    images = sorted(p.name for p in synth.image_folder.iterdir())
    assert images == sorted(p.name for p in again.image_folder.iterdir())
    for name in images:
        assert _pixels(synth.image_folder / name) == _pixels(again.image_folder / name)


def test_generated_json_is_llava_format_with_closed_answers(synth):
    train, test = json.loads(synth.train_json.read_text()), json.loads(synth.test_json.read_text())
    assert len(train) == 10 and len(test) == 6
    text_only = [r for r in train if "image" not in r]
    assert len(text_only) == 1 and "<image>" not in json.dumps(text_only)
    for record in train + test:
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(t["value"] in ANSWERS for t in turns[1::2])
        if "image" in record:
            assert turns[0]["value"].startswith("<image>\n") and (synth.root / record["image"]).is_file()
    assert all("image" in r and len(r["conversations"]) == 2 for r in test)
    sizes = {Image.open(synth.root / r["image"]).size for r in train + test if "image" in r}
    assert all(512 <= s <= 640 for size in sizes for s in size)
    assert any(w != h for w, h in sizes) and any(w == h for w, h in sizes)


def _region_box(region, size):
    W, H = size
    x = (0, W // 3) if region.endswith("left") else (W - W // 3, W)
    y = (0, H // 3) if region.startswith("top") else (H - H // 3, H)
    return x[0], y[0], x[1], y[1]


def test_detail_is_small_and_in_the_region_the_question_names(synth):
    for record in json.loads(synth.test_json.read_text()):
        question = record["conversations"][0]["value"]
        (region,) = [r for r in synthetic.REGIONS if f"the {r} corner" in question]
        image = Image.open(synth.root / record["image"]).convert("RGB")
        background = max(image.getcolors(1 << 20))[1]
        named = image.crop(_region_box(region, image.size))
        opposite = image.crop(_region_box(synthetic.OPPOSITE[region], image.size))
        assert opposite.getcolors(1 << 20) == [(opposite.width * opposite.height, background)]
        mask = Image.frombytes("L", named.size, bytes(255 * (p != background) for p in named.getdata()))
        x0, y0, x1, y1 = mask.getbbox()
        assert 6 <= max(x1 - x0, y1 - y0) <= 40  # small: <= 4% of a 1024 image, a few px at 336


def test_glyph_height_is_detail_px_on_a_1024_image():
    rng = random.Random(0)
    example = make_example(rng, image_size=1024, detail_px=(10, 10))
    while example.task != "word":
        example = make_example(rng, image_size=1024, detail_px=(10, 10))
    ink = example.image.crop(example.bbox).convert("L").point(lambda v: 255 * (v < 200)).getbbox()
    assert ink[3] - ink[1] == 10  # 10 px letters on 1024 px: ~3 px in a 336 view


def test_generator_rejects_bad_arguments(tmp_path):
    with pytest.raises(MixresError, match=r"num_train has to be an int >= 0, but got -1"):
        generate_dataset(tmp_path, -1, 1)
    with pytest.raises(MixresError, match=r"image_size .* lo >= 24"):
        generate_dataset(tmp_path, 1, 1, image_size=(100, 200))
    with pytest.raises(MixresError, match=r"text_only_fraction has to be in \[0, 1\], but got 2"):
        generate_dataset(tmp_path, 1, 1, text_only_fraction=2)


def test_exact_match_scores_per_task(synth):
    test = json.loads(synth.test_json.read_text())
    truth = {r["id"]: r["conversations"][1]["value"] for r in test}
    assert exact_match(truth, test)["all"] == 1.0
    wrong = dict(truth, **{test[0]["id"]: "nonsense"})
    assert exact_match(wrong, test)["all"] == pytest.approx(5 / 6)


# -- the hatch task --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hatch(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("hatch"), num_train=12, num_test=8, seed=5, kind="hatch",
                            text_only_fraction=0.0)


def _ink(image, background):
    """(x, y) of every pixel that is not the background colour."""
    w = image.width
    return {(i % w, i // w) for i, p in enumerate(image.getdata()) if p != background}


def test_hatch_dataset_is_deterministic_and_closed(tmp_path, hatch):
    again = generate_dataset(tmp_path, num_train=12, num_test=8, seed=5, kind="hatch", text_only_fraction=0.0)
    assert again.train_json.read_bytes() == hatch.train_json.read_bytes()
    records = json.loads(hatch.train_json.read_text()) + json.loads(hatch.test_json.read_text())
    for r in records:
        turns = r["conversations"]
        assert [t["value"] for t in turns[:1]] == ["<image>\n" + synthetic.HATCH_QUESTION] and len(turns) == 2
        assert turns[1]["value"] in synthetic.ORIENTATIONS and turns[1]["value"] in ANSWERS
        assert r["meta"]["task"] == "hatch" and r["meta"]["detail_px"] in (3, 4)
        assert Image.open(hatch.root / r["image"]).size == (128, 128)
    assert _pixels(hatch.root / records[0]["image"]) == _pixels(again.root / records[0]["image"])


def test_hatch_ink_lies_in_the_patch_and_runs_the_answer_s_way(hatch):
    for r in json.loads(hatch.train_json.read_text()):
        image = Image.open(hatch.root / r["image"]).convert("RGB")
        background = max(image.getcolors(1 << 16))[1]
        ink, (x0, y0, x1, y1) = _ink(image, background), r["meta"]["bbox"]
        assert all(x0 <= x < x1 and y0 <= y < y1 for x, y in ink)  # nothing outside the patch
        assert 0.03 < len(ink) / ((x1 - x0) * (y1 - y0)) < 0.2  # a sparse hatching, not a filled box
        # the answer's step joins far more ink pixels to an ink neighbour than any other step does
        pairs = {o: sum((x + dx, y + dy) in ink for x, y in ink) for o, (dx, dy) in synthetic._STEP.items()}
        answer = r["conversations"][1]["value"]
        assert pairs[answer] > 2 * max(v for o, v in pairs.items() if o != answer), (answer, pairs)


def test_hatch_segments_have_the_same_ink_whatever_the_orientation():
    # density must carry no class information: a lone segment has L ink pixels in every orientation
    for orientation in synthetic.ORIENTATIONS:
        rng = random.Random(orientation)
        example = make_hatch_example(rng, density=(3e-4, 3e-4))  # 1-3 segments in the patch, seeded: no overlap
        while example.turns[0][1] != orientation:
            example = make_hatch_example(rng, density=(3e-4, 3e-4))
        background = max(example.image.getcolors(1 << 16))[1]
        segments = round((example.bbox[2] - example.bbox[0]) * (example.bbox[3] - example.bbox[1]) * 3e-4)
        assert segments >= 1 and len(_ink(example.image, background)) == segments * example.detail_px


def test_hatch_rejects_bad_arguments(tmp_path):
    with pytest.raises(MixresError, match=r"kind has to be one of \['corner', 'hatch'\], but got 'stripes'"):
        generate_dataset(tmp_path, 1, 1, kind="stripes")
    with pytest.raises(MixresError, match=r"image_size 12 .* lo >= 4 \* detail_px\[1\] = 16"):
        generate_dataset(tmp_path, 1, 1, image_size=12, kind="hatch")


# -- templates -------------------------------------------------------------------------------


def test_template_strings(tokenizer):
    turns = _sample("x", "<image>\nWhat number?", "7", more=[("Which corner?", "top-left")])["conversations"]
    vicuna = get_template("vicuna_v1").render(turns, tokenizer)
    assert vicuna.text == (f"{VICUNA_SYSTEM} USER: <image>\nWhat number? ASSISTANT: 7</s>"
                           "USER: Which corner? ASSISTANT: top-left</s>")
    assert vicuna.target_text() == ["7</s>", "top-left</s>"]
    plain = get_template("plain").render(turns[:2], tokenizer)
    assert (plain.text, plain.target_text()) == ("<image>7\n", ["7\n"])
    chat = get_template("chat_template").render(turns, tokenizer)
    assert chat.text.startswith("<|im_start|>user\n<image>\nWhat number?<|im_end|>\n<|im_start|>assistant\n7")
    assert chat.target_text() == ["7<|im_end|>\n", "top-left<|im_end|>\n"]


def test_template_errors(tokenizer):
    assert set(TEMPLATES) == {"plain", "vicuna_v1", "chat_template"}
    with pytest.raises(UnknownNameError, match=r"unknown template 'vicuna'.*\['chat_template', 'plain', 'vicuna_v1'\]"):
        get_template("vicuna")
    with pytest.raises(TemplateError, match=r"turn 1 has to be from 'gpt', but got 'human'"):
        get_template("vicuna_v1").render([{"from": "human", "value": "a"}, {"from": "human", "value": "b"}], tokenizer)
    no_chat = _train_tokenizer()
    no_chat.chat_template = None
    with pytest.raises(TemplateError, match=r"needs a tokenizer with a chat_template"):
        get_template("chat_template").render(_sample("x", "q", "a")["conversations"], no_chat)


# -- dataset ---------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["vicuna_v1", "chat_template", "plain"])
def test_labels_are_the_answers_only(template, synth, tokenizer):
    end = {"vicuna_v1": "</s>", "chat_template": "<|im_end|>\n", "plain": "\n"}[template]
    ds = LlavaDataset(synth.train_json, tokenizer, num_image_tokens=N_IMG, template=template,
                      image_processor=ImagePreprocessor(size=32), on_error="skip")
    records = json.loads(synth.train_json.read_text())
    unfit = [r["id"] for r in records if "image" not in r or len(r["conversations"]) > 2]  # plain: 1 image, 1 turn
    assert ds.skipped_ids == (unfit if template == "plain" else []) and len(ds) == 10 - ds.skipped
    for i in range(len(ds)):
        item, record = ds[i], ds.record(i)
        answers = [t["value"] for t in record["conversations"][1::2]]
        runs = _answer_runs(tokenizer, item["labels"])
        assert [r.removeprefix(" ") if template == "vicuna_v1" else r for r in runs] == [a + end for a in answers]
        assert item["input_ids"].shape == item["labels"].shape
        kept = item["labels"] != IGNORE_INDEX
        assert torch.equal(item["input_ids"][kept], item["labels"][kept])


def test_image_token_expansion(synth, tokenizer):
    ds = LlavaDataset(synth.train_json, tokenizer, num_image_tokens=N_IMG, image_processor=ImagePreprocessor(size=32))
    image_id = tokenizer.convert_tokens_to_ids("<image>")
    for i in range(len(ds)):
        item = ds[i]
        where = (item["input_ids"] == image_id).nonzero().flatten()
        if item["has_image"]:
            assert len(where) == N_IMG and torch.equal(where, torch.arange(N_IMG) + where[0])
            assert (item["labels"][where] == IGNORE_INDEX).all()
            assert item["pixel_values"].shape == (3, 32, 32)
        else:
            assert len(where) == 0 and "pixel_values" not in item
        assert ds.lengths[i] == len(item["input_ids"])
        assert ds.modality_lengths[i] == (1 if item["has_image"] else -1) * ds.lengths[i]


def test_pad_to_square_uses_the_mean_colour():
    red = Image.new("RGB", (40, 20), (255, 0, 0))
    background = tuple(int(x * 255) for x in CLIP_MEAN)
    assert background == (122, 116, 104)
    square = expand2square(red, background)
    assert square.size == (40, 40) and square.getpixel((0, 0)) == background and square.getpixel((20, 20)) == (255, 0, 0)
    out = ImagePreprocessor(size=32)(red)
    mean, std = torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD)
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    assert torch.equal(out[:, 0, 0], (torch.tensor(background, dtype=torch.float32) / 255 - mean) / std)
    assert torch.allclose(out[:, 16, 16], (torch.tensor([1.0, 0.0, 0.0]) - mean) / std, atol=1e-6)
    cropped = ImagePreprocessor(size=32, aspect_ratio="crop")(red)
    assert torch.allclose(cropped[:, 0, 0], out[:, 16, 16])  # no padding when cropping


BAD = [
    ("missing", _sample("bad-missing", "<image>\nq", "a", image="nope.png"), r"sample 'bad-missing': image file .*nope.png' not found"),
    ("no-image", _sample("bad-noimg", "<image>\nq", "a"), r"sample 'bad-noimg': the text has 1 '<image>' placeholder\(s\) but the sample has no 'image'"),
    ("no-placeholder", _sample("bad-noph", "q", "a", image="red.png"), r"sample 'bad-noph': a sample with an image needs exactly one '<image>' placeholder .* but has 0"),
    ("roles", {"id": "bad-roles", "conversations": [{"from": "gpt", "value": "a"}, {"from": "gpt", "value": "b"}]}, r"sample 'bad-roles': template 'vicuna_v1': turn 0 has to be from 'human'"),
    ("too-long", _sample("bad-long", "<image>\n" + "word " * 200, "a", image="red.png"), r"sample 'bad-long': \d+ tokens \(7 of them image tokens\) exceed max_length=64"),
]


@pytest.mark.parametrize("case,record,message", BAD, ids=[b[0] for b in BAD])
def test_bad_sample_raises_naming_its_id(case, record, message, tokenizer, image_dir):
    good = _sample("good", "<image>\nWhat number?", "7", image="red.png")
    with pytest.raises(LlavaDataError, match=message):
        _dataset([good, record], tokenizer, image_dir, max_length=64)


def test_bad_samples_are_skipped_and_counted(tokenizer, image_dir, caplog):
    good = [_sample("good-img", "<image>\nWhat number?", "7", image="red.png"), _sample("good-txt", "What is 3 plus 4?", "7")]
    with caplog.at_level(logging.WARNING):
        ds = _dataset(good + [b[1] for b in BAD], tokenizer, image_dir, max_length=64, on_error="skip")
    assert len(ds) == 2 and ds.skipped == len(BAD)
    assert ds.skipped_ids == [b[1]["id"] for b in BAD]
    assert sum("skipping sample" in r.message for r in caplog.records) == len(BAD)


def test_corrupt_image_raises_or_is_skipped(tokenizer, image_dir):
    records = [_sample("bad-corrupt", "<image>\nq", "a", image="corrupt.png"), _sample("next", "<image>\nq", "7", image="red.png")]
    strict = _dataset(records, tokenizer, image_dir)
    with pytest.raises(LlavaDataError, match=r"sample 'bad-corrupt': image file .*corrupt.png' cannot be read"):
        strict[0]
    lenient = _dataset(records, tokenizer, image_dir, on_error="skip")
    assert lenient[0]["id"] == "next" and lenient.skipped == 1 and lenient.skipped_ids == ["bad-corrupt"]
    assert lenient[0]["id"] == "next" and lenient.skipped == 1  # counted once
    with pytest.raises(IndexError, match="out of range"):
        lenient[2]


def test_bad_arguments(tokenizer, image_dir):
    records = [_sample("a", "q", "a")]
    with pytest.raises(UnknownNameError, match=r"unknown template 'vicuna_v2'.*did you mean 'vicuna_v1'"):
        _dataset(records, tokenizer, image_dir, template="vicuna_v2")
    with pytest.raises(MixresError, match=r"on_error has to be one of \['raise', 'skip'\], but got 'ignore'"):
        _dataset(records, tokenizer, image_dir, on_error="ignore")
    with pytest.raises(MixresError, match=r"has to encode '<image>' as one token"):
        _dataset(records, _train_tokenizer(with_image_token=False), image_dir)
    with pytest.raises(MixresError, match=r"num_image_tokens has to be > 0, but got 0"):
        _dataset(records, tokenizer, image_dir, num_image_tokens=0)


# -- collator --------------------------------------------------------------------------------


def test_collator_pads_right_and_stacks_images(tokenizer, image_dir):
    records = [_sample("txt", "What is 3 plus 4?", "7"), _sample("img", "<image>\nWhat number?", "7", image="red.png")]
    ds = _dataset(records, tokenizer, image_dir)
    items = [ds[0], ds[1]]
    n0, n1 = (len(i["input_ids"]) for i in items)
    batch = LlavaCollator.from_dataset(ds)(items)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, max(n0, n1))
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert (batch["input_ids"][row, n:] == tokenizer.pad_token_id).all()
        assert torch.equal(batch["labels"][row, :n], item["labels"]) and (batch["labels"][row, n:] == IGNORE_INDEX).all()
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (max(n0, n1) - n)
    assert torch.equal(batch["pixel_values"], items[1]["pixel_values"][None]) and "image_flags" not in batch
    zeros = LlavaCollator.from_dataset(ds, text_only_images="zeros", return_image_flags=True, pad_to_multiple_of=16)(items)
    assert zeros["pixel_values"].shape == (2, 3, 32, 32) and not zeros["pixel_values"][0].any()
    assert zeros["image_flags"].tolist() == [False, True] and zeros["input_ids"].shape[1] % 16 == 0
    text_only = LlavaCollator.from_dataset(ds)([items[0]])
    assert "pixel_values" not in text_only
    assert LlavaCollator.from_dataset(ds, text_only_images="zeros")([items[0]])["pixel_values"].shape == (1, 3, 32, 32)
    with pytest.raises(MixresError, match="empty batch"):
        LlavaCollator(0)([])
