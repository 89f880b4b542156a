"""The rule-based math reward: last ``\\boxed{}`` answer, Hendrycks MATH normalisation, then math-verify.

Two modes (``grpo.reward_mode``):

- ``math_verify`` (default): the normalised strings are equal (Hendrycks' normalisation plus the project's
  unwrapping of ``\\text{}``/``\\mbox{}``/``\\mathrm{}``), or, failing that, math-verify finds them
  symbolically equal, as peers do, so that a right answer in another form (3.75 vs \\frac{15}{4}, 3+2x vs
  2x+3) also scores 1;
- ``strict``: the reference's scoring: Hendrycks' ``strip_string`` on both sides and string equality (the
  raw strings when normalisation fails, as Hendrycks' ``is_equiv`` does); nothing else.

The scorer never raises on model output: a reward crash would kill a training step.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

MAX_VERIFY_CHARS = 200  # math-verify parses with sympy: bound what it sees so huge outputs stay fast
# an integer as written plainly (no sign on zero, no leading zero), up to 15 digits, within which math-verify's
# numeric comparison tells every two integers apart
PLAIN_INTEGER = re.compile(r"0|-?[1-9]\d{0,14}")


@dataclass(frozen=True)
class RewardResult:
    score: float
    extracted: Optional[str]
    method: str  # exact | math_verify (default mode) | strict (strict mode) | no_box | wrong | error


MODES = ("math_verify", "strict")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces), or ``\\boxed 5``; None if absent
    or unbalanced."""
    if not isinstance(text, str):
        return None
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start + (6 if text.startswith("\\boxed", start) else 5):]
    if rest.startswith(" "):  # "\boxed 5": the answer runs to the next space or dollar
        m = re.match(r"\s+([^\s$]+)", rest)
        return m.group(1) if m else None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None


# --- Hendrycks MATH normalisation ----------------------------------------------------------------

def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{2} -> \\frac{1}{2}."""
    parts = s.split("\\frac")
    out = parts[0]
    for part in parts[1:]:
        out += "\\frac"
        if part.startswith("{") or len(part) < 2:
            out += part
            continue
        a, b, tail = part[0], part[1], part[2:]
        out += f"{{{a}}}{{{b}}}{tail}" if b != "{" else f"{{{a}}}{b}{tail}"
    return out


def _fix_a_slash_b(s: str) -> str:
    m = re.fullmatch(r"(-?\d+)/(\d+)", s)
    return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def _fix_sqrt(s: str) -> str:
    return re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", s)


def _remove_right_units(s: str) -> str:
    """Hendrycks' unit rule: a unit is written ``\\text{ unit}`` (a space after the brace); keep what precedes
    it. ``\\text{(A)}`` without the space is not a unit and stays."""
    head = s.split("\\text{ ", 1)[0]
    return head if head.strip() else s  # a lone "\text{ ...}" is the answer itself, not a unit after one


def normalize_answer(answer: str) -> str:
    """The Hendrycks MATH string normalisation, plus unwrapping ``\\text{}``/``\\mbox{}``/``\\mathrm{}`` and a
    few tolerances (plain ``$`` and ``%``, a trailing period): the default mode's first comparison."""
    s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = _remove_right_units(s)
    s = re.sub(r"\\(?:text|mbox|mathrm)\{([^}]*)\}", r"\1", s)
    s = s.replace("\\%", "").replace("%", "")
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if s.startswith("."):
        s = "0" + s
    if s.endswith(".") and not s[:-1].endswith("."):
        s = s[:-1]
    if "=" in s and len(s.split("=")[0].strip()) <= 2:  # "x = 5" -> "5"
        s = s.split("=", 1)[1]
    s = _fix_sqrt(s)
    s = s.replace(" ", "")
    s = _fix_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _fix_a_slash_b(s)


# --- Hendrycks' strip_string, as the reference runs it (strict mode) -------------------------------
# Written from the published rules of hendrycks/math (math_equivalence.py). Where that code raises (an answer
# with two "\text{ " units, a "\frac" or "\sqrt" with nothing after it), strip_string raises ValueError, so
# that strict mode can fall back to comparing the raw strings as the reference's is_equiv does.

def _strict_fracs(s: str) -> str:
    pieces = s.split("\\frac")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise ValueError("\\frac with nothing after it")
        if piece[0] == "{":
            out.append("\\frac" + piece)
        elif len(piece) < 2:
            return s  # "\frac1": the reference gives up and keeps the whole string as it was
        elif piece[1] == "{":
            out.append(f"\\frac{{{piece[0]}}}{piece[1:]}")
        else:
            out.append(f"\\frac{{{piece[0]}}}{{{piece[1]}}}{piece[2:]}")
    return "".join(out)


def _strict_a_slash_b(s: str) -> str:
    parts = s.split("/")
    if len(parts) != 2:
        return s
    try:
        num, den = int(parts[0]), int(parts[1])
    except ValueError:
        return s
    return f"\\frac{{{num}}}{{{den}}}" if s == f"{num}/{den}" else s


def _strict_units(s: str) -> str:
    if "\\text{ " not in s:
        return s
    parts = s.split("\\text{ ")
    if len(parts) != 2:
        raise ValueError("more than one \\text{ unit}")
    return parts[0]


def _strict_sqrt(s: str) -> str:
    pieces = s.split("\\sqrt")
    out = [pieces[0]]
    for piece in pieces[1:]:
        if not piece:
            raise ValueError("\\sqrt with nothing after it")
        out.append("\\sqrt" + piece if piece[0] == "{" else f"\\sqrt{{{piece[0]}}}{piece[1:]}")
    return "".join(out)


def strip_string(answer: str) -> str:
    """Hendrycks' MATH answer normalisation, rule for rule (strict mode); raises ValueError where it raises."""
    s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "")
    s = _strict_units(s)
    s = s.replace("\\%", "").replace("\\%", "")  # twice, as the reference (its "\%" for "%" is "\\%" again)
    s = s.replace(" .", " 0.").replace("{.", "{0.")
    if not s:
        return s
    if s[0] == ".":
        s = "0" + s
    sides = s.split("=")
    if len(sides) == 2 and len(sides[0]) <= 2:  # "x = 5" -> " 5"; no stripping before measuring
        s = sides[1]
    s = _strict_sqrt(s).replace(" ", "")
    s = _strict_fracs(s)
    if s == "0.5":
        s = "\\frac{1}{2}"
    return _strict_a_slash_b(s)


def _strict_equal(pred: str, truth: str) -> bool:
    try:
        return strip_string(pred) == strip_string(truth)
    except Exception:  # noqa: BLE001 - as the reference: normalisation failed, compare the strings as given
        return pred == truth


# --- math-verify on top ---------------------------------------------------------------------------

def _math_verify_equal(pred: str, truth: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use signals, which only work in the main thread.
    main = threading.current_thread() is threading.main_thread()
    timeout = 3 if main else None
    gold = parse(f"${truth}$", parsing_timeout=timeout)
    target = parse(f"${pred}$", parsing_timeout=timeout)
    return bool(gold and target and verify(gold, target, timeout_seconds=timeout))


def _distinct_integers(pred: str, truth: str) -> bool:
    """Two different integers written plainly: math-verify would find them unequal too, after a LaTeX parse and
    sympy (about 5 ms a pair, most of a tiny run's evaluation), so the answer is known without it."""
    pred, truth = pred.strip(), truth.strip()
    return pred != truth and bool(PLAIN_INTEGER.fullmatch(pred)) and bool(PLAIN_INTEGER.fullmatch(truth))


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"grpo.reward_mode={mode!r} is not a reward mode; choose one of {', '.join(MODES)}")


def compute_score(response: str, ground_truth: str, mode: str = "math_verify") -> RewardResult:
    """1.0 if the last boxed answer equals the ground truth, else 0.0.

    ``mode="math_verify"``: normalised equality, then symbolic equality; ``mode="strict"``: the reference's
    Hendrycks string equality only. An unknown mode raises ValueError; odd model output never raises.
    """
    _check_mode(mode)
    try:
        pred = last_boxed(response)
        if pred is None:
            return RewardResult(0.0, None, "no_box")
        if mode == "strict":
            same = _strict_equal(pred, ground_truth)
            return RewardResult(1.0 if same else 0.0, pred, "strict" if same else "wrong")
        if normalize_answer(pred) == normalize_answer(ground_truth):
            return RewardResult(1.0, pred, "exact")
        if _distinct_integers(pred, ground_truth):
            return RewardResult(0.0, pred, "wrong")
        if len(pred) <= MAX_VERIFY_CHARS and _math_verify_equal(pred, ground_truth):
            return RewardResult(1.0, pred, "math_verify")
        return RewardResult(0.0, pred, "wrong")
    except Exception:  # noqa: BLE001 - any failure on odd model output scores 0, never crashes a step
        return RewardResult(0.0, None, "error")


def score_batch(responses: Sequence[str], ground_truths: Sequence[str], mode: str = "math_verify"
                ) -> list[RewardResult]:
    _check_mode(mode)
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    return [compute_score(r, g, mode) for r, g in zip(responses, ground_truths)]
