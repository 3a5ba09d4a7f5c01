"""mixres plan: budgets, the recommendation, and equality with benchmarks/cost.py to the digit."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # benchmarks/ is a source-checkout package

from mixres.cli import main  # noqa: E402
from mixres.errors import MixresError  # noqa: E402
from mixres.flops import on_meta  # noqa: E402
from mixres.plan import candidates, measure, plan  # noqa: E402

NUMBERS = ("tokens", "width", "params", "encoder", "projector", "prefill", "enc_prefill", "kv_cache")
PATTERN = "*102[24]"  # clip-vit-l-14 @1022, llava-hr-7b-1024, llava-hr-x-1024


@pytest.fixture(scope="module")
def result():
    return plan(tokens=1024, pattern=PATTERN)


def test_tokens_1024_fits_mra_1024_not_the_single_vit_at_1022(result):
    rows = {r["name"]: r for r in result["rows"]}
    assert sorted(rows) == ["clip-vit-l-14 @1022", "llava-hr-7b-1024", "llava-hr-x-1024"]
    assert rows["llava-hr-7b-1024"]["fits"] and rows["llava-hr-7b-1024"]["tokens"] == 1024  # 32x32
    vit = rows["clip-vit-l-14 @1022"]
    assert not vit["fits"] and vit["tokens"] == 73 * 73 and vit["why"] == "5329 tokens > 1024"
    # both fitting rows read 1024 px; the 7B preset (ConvNeXt-L) is cheaper than -X (ConvNeXt-XXL)
    assert result["recommended"] == "llava-hr-7b-1024"


def test_numbers_equal_benchmarks_cost_to_the_digit(result):
    from benchmarks import cost

    rows = {r["name"]: r for r in result["rows"]}
    for c in candidates(PATTERN)[:2]:  # the ViT at 1022 and llava-hr-7b-1024, counted again by cost.measure
        module = on_meta(c.build)
        ref = cost.measure(c.family, c.name, c.image, "-", module, c.call)
        assert {k: rows[c.name][k] for k in NUMBERS} == {k: ref[k] for k in NUMBERS}
    published = ROOT / "benchmarks" / "results" / "cost.json"
    if published.exists():  # and the committed table of `python -m benchmarks.cost`
        table = {r["name"]: r for r in json.loads(published.read_text())["rows"]}
        for name in rows:
            assert {k: rows[name][k] for k in NUMBERS} == {k: table[name][k] for k in NUMBERS}


def test_kv_cache_and_prefill_by_hand(result):
    mra = next(r for r in result["rows"] if r["name"] == "llava-hr-7b-1024")
    n, d, ff, layers, vocab = 1024 + 64, 4096, 11008, 32, 32000
    per_layer = 4 * 2 * n * d * d + 3 * 2 * n * d * ff + 2 * 2 * n * n * d
    assert mra["prefill"] == layers * per_layer + 2 * d * vocab  # LM head on the last token
    assert mra["kv_cache"] == 2 * layers * d * n * 2  # K and V, bf16
    assert mra["enc_prefill"] == mra["encoder"] + mra["prefill"]


def test_other_budgets_and_llm():
    by_flops = plan(tflops=20, pattern=PATTERN)
    assert [r["name"] for r in by_flops["rows"] if r["fits"]] == ["llava-hr-7b-1024"]  # 16.91 T; -X 21.86 T
    assert plan(image_size=2000, pattern=PATTERN)["recommended"] is None
    big = plan(pattern="llava-hr-7b-1024", llm="13b")["rows"][0]
    assert big["kv_cache"] == 2 * 40 * 5120 * (1024 + 64) * 2
    with pytest.raises(MixresError, match="llm has to be one of"):
        plan(llm="70b")
    with pytest.raises(MixresError, match="tokens has to be > 0"):
        plan(tokens=0)
    with pytest.raises(MixresError, match="no candidate matches"):
        plan(pattern="nothing*")


def test_cli_json(capsys):
    assert main(["plan", "--tokens", "1024", "--only", "llava-hr-7b-1024", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["recommended"] == "llava-hr-7b-1024" and out["budget"]["tokens"] == 1024
    assert main(["plan", "--tokens", "1024", "--only", "llava-hr-7b-1024"]) == 0
    assert "recommended: **llava-hr-7b-1024**" in capsys.readouterr().out
    assert main(["plan", "--only", "nope"]) == 2


def test_measure_one_candidate_is_a_dict_of_ints():
    row = measure(candidates("clip-vit-l-14 @336")[0])
    assert row["tokens"] == 24 * 24 and row["vit_px"] == 336 and isinstance(row["encoder"], int)
