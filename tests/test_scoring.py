"""mixres.scoring: VQA accuracy, exact match and ANLS against hand-computed cases."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mixres.errors import MixresError
from mixres.scoring import anls, exact_match, levenshtein, normalize_vqa_answer, score_answers, vqa_accuracy


@pytest.mark.parametrize(
    "raw,normalised",
    [
        ("Two", "2"),  # number words
        ("none", "0"),
        ("The Cat", "cat"),  # case, articles
        ("an apple a day", "apple day"),
        ("dont", "don't"),  # contractions
        ("isnt it", "isn't it"),
        ("yes.", "yes"),  # a period not followed by a digit goes
        ("3.5", "3.5"),  # a decimal point stays
        ("1,000", "1000"),  # commas go first
        ("left-hand", "left hand"),  # punctuation between words: a space
        ("hello !", "hello"),  # punctuation next to a space: removed
        ("(red)", "red"),
        ("man's", "man 's"),  # 's split off
        ("what?", "what"),
        ("  many\tspaces\n", "many spaces"),
    ],
)
def test_normalisation(raw, normalised):
    assert normalize_vqa_answer(raw) == normalised


@pytest.mark.parametrize(
    "k,expected",
    # 10 answers, k match. Leave out a match: min((k-1)/3, 1); leave out another: min(k/3, 1)
    [(0, 0.0), (1, (1 * 0 + 9 * (1 / 3)) / 10), (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),
     (3, (3 * (2 / 3) + 7 * 1) / 10), (4, 1.0), (10, 1.0)],
)
def test_vqa_accuracy_ten_answer_rule(k, expected):
    answers = ["blue"] * k + ["green"] * (10 - k)
    assert math.isclose(vqa_accuracy("blue", answers), expected, rel_tol=1e-12)  # sums of thirds: float rounding only


def test_vqa_accuracy_hand_values_with_normalisation():
    assert math.isclose(vqa_accuracy("0.3", ["0.3"] + ["none"] * 9), 0.3)
    assert math.isclose(vqa_accuracy("Two.", ["2", "two", "2 ", "3", "3", "3", "3", "4", "4", "4"]), 0.9)
    assert vqa_accuracy("a dog", ["dog"] * 10) == 1.0
    assert vqa_accuracy("dogs", ["dog"] * 10) == 0.0  # no stemming
    # 9 answers: leave-one-out over 9 subsets
    assert math.isclose(vqa_accuracy("x", ["x", "x"] + ["y"] * 7), (2 * (1 / 3) + 7 * (2 / 3)) / 9)


def test_vqa_accuracy_errors():
    with pytest.raises(MixresError, match="needs several human answers"):
        vqa_accuracy("x", ["x"])
    with pytest.raises(MixresError, match="answers is empty"):
        vqa_accuracy("x", [])
    with pytest.raises(TypeError, match="prediction has to be a str"):
        vqa_accuracy(3, ["3", "3"])


@given(st.lists(st.sampled_from(["red", "blue", "two", "2", "the red"]), min_size=2, max_size=12),
       st.sampled_from(["red", "2", "green"]), st.randoms())
def test_vqa_accuracy_contract(answers, prediction, rnd):
    value = vqa_accuracy(prediction, answers)
    assert 0.0 <= value <= 1.0
    shuffled = list(answers)
    rnd.shuffle(shuffled)
    assert math.isclose(vqa_accuracy(prediction, shuffled), value, abs_tol=1e-12)  # order-free up to sum order
    k = sum(normalize_vqa_answer(a) == normalize_vqa_answer(prediction) for a in answers)
    assert (value == 0.0) == (k == 0)
    assert (value == 1.0) == (k >= 4)


def test_exact_match():
    assert exact_match("Seven.", "seven") == 1.0
    assert exact_match(" 7 ", ["six", "7"]) == 1.0
    assert exact_match("seven", "7") == 0.0  # no number words here
    assert exact_match("", "7") == 0.0


@pytest.mark.parametrize(
    "a,b,d", [("kitten", "sitting", 3), ("flaw", "lawn", 2), ("", "", 0), ("abc", "", 3), ("a", "b", 1), ("ab", "ba", 2)]
)
def test_levenshtein(a, b, d):
    assert levenshtein(a, b) == d == levenshtein(b, a)


def test_anls_hand_values():
    assert anls("kitten", "sitting") == pytest.approx(1 - 3 / 7, abs=1e-15)  # one float division
    assert anls("abcd", "abef") == 0.0  # NL = 0.5 exactly: not below the threshold
    assert anls("abcde", "abcdx") == pytest.approx(0.8, abs=1e-15)
    assert anls("  The  Cat ", "the cat") == 1.0  # case and spaces
    assert anls("12/03/2019", ["12/03/2018", "march 12"]) == pytest.approx(0.9, abs=1e-15)  # best reference
    assert anls("", "") == 1.0
    assert anls("x", "abc", threshold=1.0) == 0.0  # NL = 1 is not below 1
    with pytest.raises(MixresError, match="threshold"):
        anls("a", "a", threshold=0)


def test_score_answers_per_type_and_missing_predictions():
    refs = [("1", ["2"] * 10, "count"), ("2", ["red"] * 3 + ["blue"] * 7, "colour"), ("3", ["4"] * 10, "count")]
    report = score_answers({"1": "two", "2": "red"}, refs, "vqa")  # "3" has no prediction: scores 0
    assert report["count"] == {"score": 0.5, "count": 2}
    assert report["colour"]["score"] == pytest.approx(0.9, abs=1e-12)
    assert report["all"]["score"] == pytest.approx((1 + 0.9 + 0) / 3, abs=1e-12)
    assert report["questions"] == {"1": 1.0, "2": pytest.approx(0.9, abs=1e-12), "3": 0.0}
    with pytest.raises(MixresError, match="metric has to be one of"):
        score_answers({}, refs, "bleu")
    with pytest.raises(MixresError, match="no questions"):
        score_answers({}, [], "exact")
