"""The math reward: extraction, Hendrycks normalisation, math-verify equivalence, the strict (reference) mode, and never
raising."""
import time

import pytest

from cookbook.data.reward import compute_score, last_boxed, normalize_answer, score_batch, strip_string

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


# two plain integers that differ, up to 15 digits: decided without math-verify, which agrees on every one
DISTINCT_INTEGERS = [("13", "12"), ("-19", "19"), ("0", "1"), ("0", "-1"), ("100", "10"), (" 7", "8 "),
                     ("100000000000000", "100000000000001"), ("999999999999998", "999999999999999"),
                     ("-100000000000000", "-100000000000001")]
# not plain (a sign on zero, a leading zero, a plus, a separator, 16 digits): math-verify decides
NOT_PLAIN = [("-0", "1"), ("007", "8"), ("+5", "6"), ("1,000", "1001"), ("1000000000000000", "1000000000000001")]


def test_distinct_plain_integers_skip_math_verify(monkeypatch):
    from cookbook.data import reward

    assert not any(reward._math_verify_equal(p, t) for p, t in DISTINCT_INTEGERS)
    monkeypatch.setattr(reward, "_math_verify_equal", lambda p, t: pytest.fail(f"math-verify called on {p}, {t}"))
    for pred, truth in DISTINCT_INTEGERS:
        assert compute_score(f"{B}{{{pred}}}", truth).method == "wrong"
    monkeypatch.setattr(reward, "_math_verify_equal", lambda p, t: True)
    for pred, truth in NOT_PLAIN:
        assert compute_score(f"{B}{{{pred}}}", truth).method == "math_verify", (pred, truth)


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


# --- units, the strict (reference) mode, and the mode switch -------------------------------------

CHOICES = "The options that work are $\\boxed{\\text{(A)}, \\text{(E)}}$."


@pytest.mark.parametrize("mode", ["math_verify", "strict"])
def test_a_trailing_text_is_not_a_unit(mode):
    """Only "\\text{ " (a space after the brace) marks a unit, as in Hendrycks' _remove_right_units: the
    last choice of a multiple-choice answer must not be cut off."""
    assert compute_score(CHOICES, "\\text{(A)}, \\text{(C)}", mode=mode).score == 0.0
    assert compute_score(CHOICES, "\\text{(A)}, \\text{(E)}", mode=mode).score == 1.0


@pytest.mark.parametrize("mode", ["math_verify", "strict"])
@pytest.mark.parametrize("pred, truth", [("10\\text{ cm}", "10"), ("10", "10\\text{ cm}"),
                                         ("4\\text{ inches}^2", "4")])
def test_units_after_text_space_are_dropped(mode, pred, truth):
    assert compute_score(f"{B}{{{pred}}}", truth, mode=mode).score == 1.0


def test_normalize_answer_keeps_what_precedes_the_unit():
    assert normalize_answer("\\text{(A)}, \\text{(E)}") == "(A),(E)"
    assert normalize_answer("12\\text{ square units}") == "12"


def test_strict_mode_is_string_equality_only():
    result = compute_score(f"{B}{{2x+3}}", "3+2x", mode="strict")
    assert (result.score, result.method) == (0.0, "wrong")
    result = compute_score(f"{B}{{2x+3}}", "3+2x")
    assert (result.score, result.method) == (1.0, "math_verify")
    assert compute_score(f"{B}{{2x+3}}", "3+2x", mode="math_verify").score == 1.0


@pytest.mark.parametrize("pred, truth, default, strict", [
    ("\\dfrac{1}{2}", "\\frac12", 1.0, 1.0),      # Hendrycks' own rewrites hold in both modes
    ("0.5", "\\frac{1}{2}", 1.0, 1.0),
    ("x = 5", "5", 1.0, 1.0),
    ("10\\%", "10", 1.0, 1.0),
    ("\\text{(A)}", "(A)", 1.0, 0.0),              # \text{} unwrapping is the project's addition
    ("\\mbox{even}", "even", 1.0, 0.0),
    ("ab = 5", "5", 1.0, 0.0),                     # Hendrycks drops a prefix of at most 2 characters
    ("3.75", "\\frac{15}{4}", 1.0, 0.0),           # only math-verify sees these
    ("-x-2+x^2", "x^2-x-2", 1.0, 0.0),
])
def test_default_and_strict_modes(pred, truth, default, strict):
    response = f"{B}{{{pred}}}"
    assert compute_score(response, truth).score == default
    r = compute_score(response, truth, mode="strict")
    assert r.score == strict and r.method == ("strict" if strict else "wrong"), r


@pytest.mark.parametrize("raw, expected", [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"), ("\\frac12", "\\frac{1}{2}"), ("\\frac1{2}", "\\frac{1}{2}"),
    ("\\frac{1}2", "\\frac{1}2"), ("0.5", "\\frac{1}{2}"), (".5", "\\frac{1}{2}"), ("1/2", "\\frac{1}{2}"),
    ("-1/2", "\\frac{-1}{2}"), ("01/2", "01/2"), ("a/b", "a/b"), ("1/2/3", "1/2/3"),
    ("\\left(1,2\\right)", "(1,2)"), ("90^\\circ", "90"), ("\\$5", "5"), ("$5", "$5"), ("10\\%", "10"),
    ("10%", "10%"), ("x = 5", "5"), ("ab = 5", "ab=5"), ("x=1=2", "x=1=2"), ("\\sqrt2", "\\sqrt{2}"),
    ("\\sqrt23", "\\sqrt{2}3"), ("5\\text{ cm}", "5"), ("\\text{(A)}", "\\text{(A)}"), ("5.", "5."),
    ("{.5}", "{0.5}"), ("", ""), ("a\\\\b", "a\\b"), ("\\frac1", "\\frac1"),
    ("\\\\\\%%", ""),  # the reference removes "\%" twice
])
def test_hendrycks_strip_string(raw, expected):
    assert strip_string(raw) == expected


@pytest.mark.parametrize("raw", ["\\frac", "1\\text{ m}\\text{ s}", "\\sqrt", "\\sqrt\\sqrt2"])
def test_hendrycks_strip_string_raises_where_the_reference_does(raw):
    with pytest.raises(ValueError):
        strip_string(raw)


def test_strict_mode_compares_raw_strings_when_normalisation_fails():
    two_units = "1\\text{ m}\\text{ s}"
    r = compute_score(f"{B}{{{two_units}}}", two_units, mode="strict")
    assert (r.score, r.method) == (1.0, "strict")
    assert compute_score(f"{B}{{{two_units}}}", "1", mode="strict").score == 0.0
    assert compute_score(f"{B}{{\\sqrt}}", "\\sqrt", mode="strict").score == 1.0


@pytest.mark.parametrize("response", MALFORMED + [None, 5])
def test_strict_mode_never_raises(response):
    assert compute_score(response, "5", mode="strict").score == 0.0


def test_strict_mode_no_box():
    assert compute_score("it is 5", "5", mode="strict").method == "no_box"


def test_unknown_mode_names_the_config_key():
    with pytest.raises(ValueError, match="grpo.reward_mode"):
        compute_score(f"{B}{{1}}", "1", mode="sympy")
    with pytest.raises(ValueError, match="grpo.reward_mode.*math_verify.*strict"):
        score_batch([f"{B}{{1}}"], ["1"], mode="Strict")


def test_score_batch_passes_the_mode():
    out = score_batch([f"{B}{{2x+3}}", f"{B}{{5}}"], ["3+2x", "5"], mode="strict")
    assert [r.score for r in out] == [0.0, 1.0]
    assert [r.score for r in score_batch([f"{B}{{2x+3}}"], ["3+2x"])] == [1.0]
