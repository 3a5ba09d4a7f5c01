"""Answer scorers of the benchmarks LLaVA-HR reports: VQA accuracy, exact match, ANLS.

**VQA accuracy** (VQAv2, TextVQA; Antol et al. 2015, the EvalAI / ``m4c_evaluator`` form that
LLaVA's TextVQA script uses). Every answer, predicted and human, is normalised by
:func:`normalize_vqa_answer`: lower case; ``,`` and ``?`` dropped and ``'s`` split off; the
punctuation ``; / [ ] " { } ( ) = + \\ _ - > < @ ` , ? !`` removed (where it touches a space, or
the text holds a digit comma such as ``1,000``) or replaced by a space; every ``.`` not followed
by a digit removed; number words ``none``/``zero`` ... ``ten`` to digits; the articles
``a an the`` dropped; the contractions of the VQA list restored (``dont -> don't``). Then, with
``n`` human answers (10 in VQAv2 / TextVQA), the score is the mean over the ``n`` leave-one-out
subsets of ``min(#matching answers in the subset / 3, 1)``: 3 or more of 10 matching gives 1,
2 gives 0.6, 1 gives 0.3.

Where we differ from the reference scripts: the GT-Vision-Lab ``vqaEval.py`` normalises only
when the 10 answers disagree (a prediction ``"Two"`` against ten ``"2"`` scores 0 there, 1
here and in EvalAI / m4c); its period rule is a ``re.sub`` whose ``count`` argument is
``re.UNICODE`` (32), so it stops after 32 periods: here it has no limit. The contraction table
is the VQA list verbatim, including its entries that can never match after lower-casing (``Im``).

**Exact match**: 1 when the prediction equals any reference after stripping spaces and a
leading/trailing full stop, case-insensitively (the rule of the recipe's synthetic tasks).

**ANLS** (DocVQA; Biten et al., ICCV 2019, "Scene Text Visual Question Answering", Eq. 1):
``max over references of 1 - NL(a, p)`` when ``NL < 0.5``, else 0, with ``NL`` the Levenshtein
distance divided by the longer length, after lower-casing and collapsing spaces.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal

from .errors import MixresError

__all__ = [
    "normalize_vqa_answer",
    "vqa_accuracy",
    "exact_match",
    "anls",
    "levenshtein",
    "score_answers",
    "METRICS",
    "Metric",
]

Metric = Literal["vqa", "exact", "anls"]

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
            "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = frozenset({"a", "an", "the"})
_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_PERIOD = re.compile(r"\.(?!\d)")  # the reference's "(?!<=\d)(\.)(?!\d)": its first group is a lookahead, a no-op
_DIGIT_COMMA = re.compile(r"(?<=\d),+(?=\d)")
# the VQA evaluation's contraction table (GT-Vision-Lab vqaEval.py), as data: key without -> with apostrophes
_CONTRACTIONS = dict(pair.split(":") for pair in """
aint:ain't arent:aren't cant:can't couldve:could've couldnt:couldn't couldn'tve:couldn't've couldnt've:couldn't've
didnt:didn't doesnt:doesn't dont:don't hadnt:hadn't hadnt've:hadn't've hadn'tve:hadn't've hasnt:hasn't havent:haven't
hed:he'd hed've:he'd've he'dve:he'd've hes:he's howd:how'd howll:how'll hows:how's Id've:I'd've I'dve:I'd've Im:I'm
Ive:I've isnt:isn't itd:it'd itd've:it'd've it'dve:it'd've itll:it'll let's:let's maam:ma'am mightnt:mightn't
mightnt've:mightn't've mightn'tve:mightn't've mightve:might've mustnt:mustn't mustve:must've neednt:needn't
notve:not've oclock:o'clock oughtnt:oughtn't ow's'at:'ow's'at 'ows'at:'ow's'at 'ow'sat:'ow's'at shant:shan't
shed've:she'd've she'dve:she'd've she's:she's shouldve:should've shouldnt:shouldn't shouldnt've:shouldn't've
shouldn'tve:shouldn't've somebody'd:somebodyd somebodyd've:somebody'd've somebody'dve:somebody'd've
somebodyll:somebody'll somebodys:somebody's someoned:someone'd someoned've:someone'd've someone'dve:someone'd've
someonell:someone'll someones:someone's somethingd:something'd somethingd've:something'd've
something'dve:something'd've somethingll:something'll thats:that's thered:there'd thered've:there'd've
there'dve:there'd've therere:there're theres:there's theyd:they'd theyd've:they'd've they'dve:they'd've
theyll:they'll theyre:they're theyve:they've twas:'twas wasnt:wasn't wed've:we'd've we'dve:we'd've weve:we've
werent:weren't whatll:what'll whatre:what're whats:what's whatve:what've whens:when's whered:where'd wheres:where's
whereve:where've whod:who'd whod've:who'd've who'dve:who'd've wholl:who'll whos:who's whove:who've whyll:why'll
whyre:why're whys:why's wont:won't wouldve:would've wouldnt:wouldn't wouldnt've:wouldn't've wouldn'tve:wouldn't've
yall:y'all yall'll:y'all'll y'allll:y'all'll yall'd've:y'all'd've y'alld've:y'all'd've y'all'dve:y'all'd've
youd:you'd youd've:you'd've you'dve:you'd've youll:you'll youre:you're youve:you've
""".split())


def _check_text(name: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{name} has to be a str, but got {type(value).__name__} {value!r}")
    return value


def _references(answers: str | Sequence[str]) -> list[str]:
    refs = [answers] if isinstance(answers, str) else list(answers)
    if not refs:
        raise MixresError("answers is empty; give at least one reference answer")
    return [_check_text("each answer", a) for a in refs]


def _punctuation(text: str) -> str:
    out = text
    glue = _DIGIT_COMMA.search(text) is not None
    for p in _PUNCTUATION:  # the tests look at the text before any replacement, as the reference does
        out = out.replace(p, "" if glue or p + " " in text or " " + p in text else " ")
    return _PERIOD.sub("", out)


def normalize_vqa_answer(text: str) -> str:
    """The EvalAI normalisation of a VQA answer (see the module docstring).

    Example:
        >>> normalize_vqa_answer("Two dogs."), normalize_vqa_answer("the man's hat"), normalize_vqa_answer("dont")
        ('2 dogs', "man 's hat", "don't")
        >>> normalize_vqa_answer("1,000"), normalize_vqa_answer("left-hand side"), normalize_vqa_answer("3.5")
        ('1000', 'left hand side', '3.5')
    """
    text = _check_text("text", text).lower().replace(",", "").replace("?", "").replace("'s", " 's")
    text = _punctuation(text.replace("\n", " ").replace("\t", " ").strip())
    words = [_NUMBERS.get(w, w) for w in text.split()]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQA accuracy: the mean over leave-one-out subsets of ``min(#matches / 3, 1)``.

    Args:
        prediction: the model's answer.
        answers: the human answers (10 in VQAv2 / TextVQA; at least 2, since each subset leaves
            one out).

    Returns:
        A score in ``[0, 1]``; with 10 answers of which ``k`` match: ``1`` for ``k >= 4``,
        ``0.9`` for ``k = 3``, ``0.6`` for ``k = 2``, ``0.3`` for ``k = 1``.

    Raises:
        MixresError: fewer than 2 answers (use :func:`exact_match` for single references).

    Example:
        >>> vqa_accuracy("Two", ["2"] * 3 + ["3"] * 7), vqa_accuracy("yes", ["yes"] * 10)
        (0.9, 1.0)
    """
    refs = [normalize_vqa_answer(a) for a in _references(answers)]
    if len(refs) < 2:
        raise MixresError(f"vqa accuracy needs several human answers (10 in VQAv2/TextVQA), but got {len(refs)}; "
                          "use the 'exact' metric for one reference answer")
    pred = normalize_vqa_answer(_check_text("prediction", prediction))
    matches = sum(r == pred for r in refs)
    # leaving out a matching answer leaves matches - 1 in the subset, any other leaves all of them
    per_subset = [min((matches - (r == pred)) / 3, 1.0) for r in refs]
    return sum(per_subset) / len(per_subset)


def _strip(text: str) -> str:
    return text.strip().strip(".").strip().lower()


def exact_match(prediction: str, answers: str | Sequence[str]) -> float:
    """1.0 when ``prediction`` equals a reference after stripping spaces and full stops, any case.

    Example:
        >>> exact_match("Seven.", "seven"), exact_match("7", ["six", "7"]), exact_match("a 7", "7")
        (1.0, 1.0, 0.0)
    """
    pred = _strip(_check_text("prediction", prediction))
    return float(any(pred == _strip(a) for a in _references(answers)))


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character cost 1).

    Written out (the row-by-row dynamic programme) so that ANLS needs no extra dependency.

    Example:
        >>> levenshtein("kitten", "sitting"), levenshtein("", "abc"), levenshtein("same", "same")
        (3, 3, 0)
    """
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        current = [i]
        for j, cb in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, answers: str | Sequence[str], threshold: float = 0.5) -> float:
    """Average Normalised Levenshtein Similarity of one answer (DocVQA's metric, per question).

    Args:
        prediction: the model's answer.
        answers: the reference answer(s); the best one counts.
        threshold: ``tau``; a normalised distance at or above it scores 0 (0.5 in DocVQA).

    Returns:
        ``max_a (1 - NL(a, p))`` over references with ``NL < threshold``, else 0.

    Example:
        >>> anls("kitten", "sitting")  # NL = 3 / 7
        0.5714285714285714
        >>> anls("abcd", "abef"), anls(" ABC ", ["xyz", "abc"])  # NL = 0.5 is not below 0.5
        (0.0, 1.0)
    """
    if not 0 < threshold <= 1:
        raise MixresError(f"threshold has to be in (0, 1], but got {threshold}")
    pred = " ".join(_check_text("prediction", prediction).strip().lower().split())
    best = 0.0
    for ref in _references(answers):
        ref = " ".join(ref.strip().lower().split())
        longest = max(len(ref), len(pred))
        distance = levenshtein(ref, pred) / longest if longest else 0.0
        if distance < threshold:
            best = max(best, 1.0 - distance)
    return best


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {"vqa": vqa_accuracy, "exact": exact_match, "anls": anls}


def score_answers(
    predictions: Mapping[str, str],
    references: Iterable[tuple[str, Sequence[str], str]],
    metric: Metric = "vqa",
) -> dict[str, dict[str, float]]:
    """Score predictions question by question and average overall and per question type.

    Args:
        predictions: question id -> answer; a question with no prediction scores as ``""``.
        references: ``(question id, reference answers, question type)`` per question.
        metric: ``"vqa"``, ``"exact"`` or ``"anls"``.

    Returns:
        ``{"all": {"score": mean, "count": n}, "<type>": {...}, ...}`` (types sorted), and the
        per-question scores under ``"questions"`` (id -> score).

    Example:
        >>> refs = [("q1", ["7"], "digit"), ("q2", ["red"], "colour"), ("q3", ["3"], "digit")]
        >>> report = score_answers({"q1": "7", "q2": "blue", "q3": "3."}, refs, "exact")
        >>> colour = report["colour"]
        >>> report["all"], report["digit"], colour["score"]
        ({'score': 0.6666666666666666, 'count': 3}, {'score': 1.0, 'count': 2}, 0.0)
    """
    if metric not in METRICS:
        raise MixresError(f"metric has to be one of {list(METRICS)}, but got {metric!r}")
    fn = METRICS[metric]
    per_question: dict[str, float] = {}
    by_type: dict[str, list[float]] = {}
    for qid, answers, qtype in references:
        value = fn(predictions.get(qid, ""), answers)
        per_question[qid] = value
        by_type.setdefault(str(qtype), []).append(value)
    if not per_question:
        raise MixresError("no questions to score")
    scores = list(per_question.values())
    report: dict = {"all": {"score": sum(scores) / len(scores), "count": len(scores)}}
    for qtype in sorted(by_type):
        report[qtype] = {"score": sum(by_type[qtype]) / len(by_type[qtype]), "count": len(by_type[qtype])}
    report["questions"] = per_question
    return report
