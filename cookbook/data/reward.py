"""The rule-based math reward: last ``\\boxed{}`` answer, Hendrycks MATH normalisation, then math-verify.

The reference scores 1.0 when the normalised strings are equal; peers add symbolic equivalence
(math-verify) so that a right answer in another form (0.5 vs \\frac{1}{2}, 3+2x vs 2x+3) also scores 1.
The scorer never raises on model output: a reward crash would kill a training step.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Optional, Sequence

MAX_VERIFY_CHARS = 200  # math-verify parses with sympy: bound what it sees so huge outputs stay fast


@dataclass(frozen=True)
class RewardResult:
    score: float
    extracted: Optional[str]
    method: str  # exact | math_verify | no_box | wrong | error


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


def normalize_answer(answer: str) -> str:
    """The Hendrycks MATH string normalisation (what the reference compares)."""
    s = answer.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = s.replace("tfrac", "frac").replace("dfrac", "frac")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("^{\\circ}", "").replace("^\\circ", "")
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\text\{\s*[^}]*\}$", "", s).strip() or s  # trailing units
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


# --- math-verify on top ---------------------------------------------------------------------------

def _math_verify_equal(pred: str, truth: str) -> bool:
    from math_verify import parse, verify

    # math-verify's timeouts use signals, which only work in the main thread.
    main = threading.current_thread() is threading.main_thread()
    timeout = 3 if main else None
    gold = parse(f"${truth}$", parsing_timeout=timeout)
    target = parse(f"${pred}$", parsing_timeout=timeout)
    return bool(gold and target and verify(gold, target, timeout_seconds=timeout))


def compute_score(response: str, ground_truth: str) -> RewardResult:
    """1.0 if the last boxed answer equals the ground truth (normalised, or symbolically), else 0.0."""
    try:
        pred = last_boxed(response)
        if pred is None:
            return RewardResult(0.0, None, "no_box")
        if normalize_answer(pred) == normalize_answer(ground_truth):
            return RewardResult(1.0, pred, "exact")
        if len(pred) <= MAX_VERIFY_CHARS and _math_verify_equal(pred, ground_truth):
            return RewardResult(1.0, pred, "math_verify")
        return RewardResult(0.0, pred, "wrong")
    except Exception:  # noqa: BLE001 - any failure on odd model output scores 0, never crashes a step
        return RewardResult(0.0, None, "error")


def score_batch(responses: Sequence[str], ground_truths: Sequence[str]) -> list[RewardResult]:
    if len(responses) != len(ground_truths):
        raise ValueError(f"{len(responses)} responses but {len(ground_truths)} ground truths")
    return [compute_score(r, g) for r, g in zip(responses, ground_truths)]
