"""The math reward: extraction, Hendrycks normalisation, math-verify equivalence, and never raising."""
import time

import pytest

from cookbook.data.reward import compute_score, last_boxed, normalize_answer, score_batch

B = "\\boxed"

EXTRACT = [
    (f"so {B}{{5}}", "5"),
    (f"{B}{{1}} then {B}{{2}}", "2"),
    (f"{B}{{\\frac{{1}}{{2}}}}", "\\frac{1}{2}"),
    (f"{B}{{{{a}}+{{b}}}}", "{a}+{b}"),
    ("\\fbox{7}", "7"),
    (f"{B} 5$", "5"),
    (f"{B}{{}}", ""),
    (f"{B}{{5", None),
    ("no box at all", None),
    (f"{B}", None),
    ("", None),
    (f"\\boxed{{x}} and \\fbox{{y}}", "y"),
    (f"{B}{{\\sqrt{{2}}}} done", "\\sqrt{2}"),
]


@pytest.mark.parametrize("text, expected", EXTRACT)
def test_last_boxed(text, expected):
    assert last_boxed(text) == expected


NORMALISE = [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\tfrac{3}{4}", "\\frac{3}{4}"), ("\\frac12", "\\frac{1}{2}"),
    ("\\frac1{2}", "\\frac{1}{2}"), ("0.5", "\\frac{1}{2}"), (".5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"),
    ("\\left(1,2\\right)", "(1,2)"), ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("\\$5", "5"),
    ("x = 5", "5"), ("5.", "5"), ("\\sqrt2", "\\sqrt{2}"), ("10\\%", "10"), (" 3 x ", "3x"),
    ("5\\text{ cm}", "5"), ("\\text{(A)}", "(A)"),
]


@pytest.mark.parametrize("raw, expected", NORMALISE)
def test_normalize_answer(raw, expected):
    assert normalize_answer(raw) == expected


RIGHT = [
    ("12", "12"), ("-19", "-19"), ("\\frac{7}{6}", "\\frac{7}{6}"), ("\\dfrac{7}{6}", "\\frac{7}{6}"),
    ("0.5", "\\frac{1}{2}"), ("\\frac{1}{2}", "0.5"), ("480.5", "480.5"), ("3+2x", "2x+3"),
    ("x^2-x-2", "x^2-x-2"), ("x^{2}-x-2", "x^2-x-2"), ("-x-2+x^2", "x^2-x-2"), ("\\frac{2}{4}", "\\frac{1}{2}"),
    ("1/2", "\\frac{1}{2}"), ("x=5", "5"), ("5.0", "5"), ("\\sqrt{2}", "\\sqrt2"), ("2\\sqrt{2}", "\\sqrt{8}"),
    ("90^\\circ", "90"), ("0.25", "\\frac{1}{4}"), ("\\left(1, 2\\right)", "(1,2)"), ("3.75", "\\frac{15}{4}"),
    ("10", "10.00"), ("-\\frac{3}{4}", "\\frac{-3}{4}"), ("5\\text{ cm}", "5"), ("\\$5", "5"),
]


@pytest.mark.parametrize("pred, truth", RIGHT)
def test_right_answers_in_any_form_score_one(pred, truth):
    result = compute_score(f"The work. The answer is ${B}{{{pred}}}$.", truth)
    assert result.score == 1.0, result


WRONG = [
    ("13", "12"), ("-19", "19"), ("\\frac{7}{5}", "\\frac{7}{6}"), ("0.51", "\\frac{1}{2}"), ("2x+4", "2x+3"),
    ("x^2+x-2", "x^2-x-2"), ("480", "480.5"), ("1", "-1"), ("\\sqrt{3}", "\\sqrt{2}"), ("(1,3)", "(1,2)"),
    ("0", "1"), ("100", "10"), ("x", "y"), ("5", "\\frac{1}{5}"), ("abc", "12"),
]


@pytest.mark.parametrize("pred, truth", WRONG)
def test_wrong_answers_score_zero(pred, truth):
    result = compute_score(f"{B}{{{pred}}}", truth)
    assert result.score == 0.0 and result.method == "wrong", result


MALFORMED = [
    "", "   ", "The answer is 5.", f"{B}{{5", f"{B}", f"{B}{{{{{{}}", "\\boxed{\\frac{1}{2}", "}}}{{{",
    "\x00\x01\x02", "答案是 \\boxed", "\\boxed{\\frac{}{}}", "\\boxed{\\left(}", "\\boxed{$$$}", "\\boxed{\\\\\\\\}",
    "\\boxed{" + "(" * 500 + "}", "\\boxed{1e999999}", "\\boxed{\\infty\\infty}", "\\boxed{?}",
]


@pytest.mark.parametrize("response", MALFORMED)
def test_malformed_outputs_never_raise(response):
    result = compute_score(response, "5")
    assert result.score == 0.0


@pytest.mark.parametrize("response", [None, 5, b"\\boxed{5}"])
def test_non_string_outputs_never_raise(response):
    assert compute_score(response, "5").score == 0.0


def test_no_box_is_reported():
    assert compute_score("I think it is 5", "5").method == "no_box"


def test_huge_outputs_are_fast():
    huge = "blah " * 40_000 + f"{B}{{{'9' * 50_000}}}"
    t = time.perf_counter()
    assert compute_score(huge, "12").score == 0.0
    assert compute_score("x" * 100_000 + f"{B}{{12}}", "12").score == 1.0
    assert time.perf_counter() - t < 5.0


def test_unicode_and_surrounding_text():
    assert compute_score(f"答案：{B}{{42}}。", "42").score == 1.0


def test_score_batch_checks_lengths():
    out = score_batch([f"{B}{{1}}", "none"], ["1", "2"])
    assert [r.score for r in out] == [1.0, 0.0]
    with pytest.raises(ValueError, match="2 responses but 1"):
        score_batch(["a", "b"], ["1"])
