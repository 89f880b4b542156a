"""Offline MATH-lighteval-schema problems for the tiny preset.

Rows have the raw dataset's fields (``problem``, ``level``, ``type``, ``solution`` ending in
``\\boxed{...}``) and go through the same preprocessing as the real data.

They are built for what a few-million-parameter model can learn on 2 CPU cores in minutes. Every
solution is a chain of elementary facts written out (``7+5=12. 12*2=24. $\\boxed{24}$.``) over small
tables (sums of small numbers, the multiplication table), and the same facts recur across the seven
types. A test problem is a text never seen in training, but its facts were seen inside other
problems' solutions: a model that learns to copy operands and recall facts generalises to it, one
that only memorises problems does not. The level is the number of chained facts and the size of the
numbers, so a warmed-up model solves most level-1 problems and few level-5 ones: room for GRPO.
Answers come in MATH's forms: integers, negatives, fractions, decimals, tuples and simple
expressions (``7x+3``, ``5\\sqrt{2}``, ``x^2+5x+6``).

Train and test are disjoint: a problem's split is decided by a hash of its text, so a test problem
can never be drawn for training, whatever the seeds.
"""
from __future__ import annotations

import hashlib
import random
from fractions import Fraction
from math import gcd
from typing import Callable

TYPES = ("Prealgebra", "Algebra", "Number Theory", "Counting & Probability", "Geometry",
         "Intermediate Algebra", "Precalculus")
LEVELS = (1, 2, 3, 4, 5)
TEST_FRACTION = 0.15  # share of all possible problem texts reserved for the test split


def frac_tex(q: Fraction) -> str:
    """MATH's answer form for a rational: an integer, or \\frac{p}{q} with the sign in front."""
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def linear_tex(a: int, b: int, var: str = "x") -> str:
    """ax+b as MATH writes it (no 1x, no +-, no +0)."""
    if a == 0:
        return str(b)
    head = {1: var, -1: f"-{var}"}.get(a, f"{a}{var}")
    return head if b == 0 else f"{head}{'+' if b > 0 else '-'}{abs(b)}"


def _dec(tenths: int) -> str:
    """An integer count of tenths as a decimal: 12 -> 1.2, 7 -> 0.7."""
    return f"{'-' if tenths < 0 else ''}{abs(tenths) // 10}.{abs(tenths) % 10}"


# Each maker returns (problem, worked steps, answer) for a level; steps are facts "a+b=c." in order.
Maker = Callable[[random.Random, int], tuple[str, str, str]]


def _d(r: random.Random, lo: int = 1, hi: int = 9) -> int:
    return r.randint(lo, hi)


def _prealgebra(r: random.Random, level: int) -> tuple[str, str, str]:
    a, b, c, d = _d(r), _d(r), _d(r), _d(r)
    if level == 1:
        return f"What is ${a}+{b}$?", f"{a}+{b}={a + b}.", str(a + b)
    if level == 2:
        if r.random() < 0.5:
            a, b = _d(r, 2), _d(r, 2)
            return f"What is ${a} \\times {b}$?", f"{a}*{b}={a * b}.", str(a * b)
        return f"What is $0.{a}+0.{b}$?", f"{a}+{b}={a + b}.", _dec(a + b)
    if level == 3:
        s = a + b
        return f"What is ${a}+{b}+{c}$?", f"{a}+{b}={s}. {s}+{c}={s + c}.", str(s + c)
    a, b = _d(r, 2), _d(r, 2)
    p = a * b
    if level == 4:
        return f"What is ${a} \\times {b}+{c}$?", f"{a}*{b}={p}. {p}+{c}={p + c}.", str(p + c)
    c, d = _d(r, 2), _d(r, 2)
    q = c * d
    return (f"What is ${a} \\times {b}-{c} \\times {d}$?", f"{a}*{b}={p}. {c}*{d}={q}. {p}-{q}={p - q}.",
            str(p - q))


def _algebra(r: random.Random, level: int) -> tuple[str, str, str]:
    x, a, b = _d(r), _d(r), _d(r)
    if level == 1:
        return f"Solve for $x$: $x+{a}={x + a}$.", f"x={x + a}-{a}={x}.", str(x)
    if level == 2:
        if r.random() < 0.5:  # a negative answer
            a = _d(r, 2)
            b = _d(r, 1, a - 1)
            return f"Solve for $x$: $x+{a}={b}$.", f"x={b}-{a}={b - a}.", str(b - a)
        return f"Solve for $x$: $x-{a}={b}$.", f"x={b}+{a}={a + b}.", str(a + b)
    a = _d(r, 2)
    if level == 3:
        if r.random() < 0.5:
            return f"Solve for $x$: ${a}x={a * x}$.", f"x={a * x}/{a}={x}.", str(x)
        n = r.choice([n for n in range(1, 10) if gcd(n, a) == 1 and n % a])  # a fraction answer
        return f"Solve for $x$: ${a}x={n}$.", f"x={n}/{a}.", frac_tex(Fraction(n, a))
    c = a * x + b
    if level == 4:
        return f"Solve for $x$: ${a}x+{b}={c}$.", f"{a}x={c}-{b}={a * x}. x={a * x}/{a}={x}.", str(x)
    return (f"If $f(x)={a}x+{b}$, what is $f({x})$?", f"{a}*{x}={a * x}. {a * x}+{b}={c}.", str(c))


def _number_theory(r: random.Random, level: int) -> tuple[str, str, str]:
    a, b, c = _d(r), _d(r, 0), _d(r, 0)
    if level == 1:
        return f"What is the sum of the digits of ${a}{b}$?", f"{a}+{b}={a + b}.", str(a + b)
    if level == 2:
        a, b = _d(r, 2), _d(r, 2)
        return (f"What is the units digit of ${a} \\times {b}$?", f"{a}*{b}={a * b}.", str(a * b % 10))
    if level == 3:
        s = a + b
        return (f"What is the sum of the digits of ${a}{b}{c}$?", f"{a}+{b}={s}. {s}+{c}={s + c}.", str(s + c))
    a, b = _d(r, 2), _d(r, 2)
    p = a * b
    if level == 4:
        t, u = divmod(p, 10)
        return (f"What is the sum of the digits of ${a} \\times {b}$?", f"{a}*{b}={p}. {t}+{u}={t + u}.",
                str(t + u))
    m = _d(r, 3)
    q, rem = _d(r, 1), _d(r, 1, m - 1)
    n = m * q + rem
    return (f"What is the remainder when ${n}$ is divided by ${m}$?", f"{m}*{q}={m * q}. {n}-{m * q}={rem}.",
            str(rem))


def _counting(r: random.Random, level: int) -> tuple[str, str, str]:
    a, b = _d(r), _d(r)
    if level == 1:
        return (f"A bag has ${a}$ red and ${b}$ blue marbles. How many marbles are in the bag?",
                f"{a}+{b}={a + b}.", str(a + b))
    if level == 2:
        a, b = _d(r, 2), _d(r, 2)
        return (f"How many outfits can be made from ${a}$ shirts and ${b}$ hats?", f"{a}*{b}={a * b}.",
                str(a * b))
    if level == 3:
        while gcd(a, a + b) != 1:  # an already reduced fraction
            a, b = _d(r), _d(r)
        return (f"A bag has ${a}$ red and ${b}$ blue marbles. What is the probability that a marble drawn at "
                f"random is red?", f"{a}+{b}={a + b}.", frac_tex(Fraction(a, a + b)))
    if level == 4:
        a, b, c = _d(r, 2), _d(r, 2), _d(r, 2)
        p = a * b
        return (f"How many outfits can be made from ${a}$ shirts, ${b}$ hats and ${c}$ scarves?",
                f"{a}*{b}={p}. {p}*{c}={p * c}.", str(p * c))
    n = _d(r, 3, 10)
    p = n * (n - 1)
    return (f"How many ways are there to choose $2$ of ${n}$ people?", f"{n}*{n - 1}={p}. {p}/2={p // 2}.",
            str(p // 2))


def _geometry(r: random.Random, level: int) -> tuple[str, str, str]:
    a, b = _d(r, 2), _d(r, 2)
    if level == 1:
        return f"A square has side length ${a}$. What is its perimeter?", f"4*{a}={4 * a}.", str(4 * a)
    if level == 2:
        return f"A rectangle has sides ${a}$ and ${b}$. What is its area?", f"{a}*{b}={a * b}.", str(a * b)
    if level == 3:
        s = a + b
        return (f"A rectangle has sides ${a}$ and ${b}$. What is its perimeter?", f"{a}+{b}={s}. 2*{s}={2 * s}.",
                str(2 * s))
    if level == 4:  # odd products give a decimal answer
        p = a * b
        area = str(p // 2) if p % 2 == 0 else _dec(5 * p)
        return (f"A right triangle has legs ${a}$ and ${b}$. What is its area?", f"{a}*{b}={p}. {p}/2={area}.",
                area)
    return (f"A rectangle has perimeter ${2 * (a + b)}$ and width ${b}$. What is its length?",
            f"{2 * (a + b)}/2={a + b}. {a + b}-{b}={a}.", str(a))


def _intermediate_algebra(r: random.Random, level: int) -> tuple[str, str, str]:
    a, b, c = _d(r), _d(r), _d(r)
    if level == 1:
        return f"Simplify ${a}x+{b}x$.", f"{a}+{b}={a + b}.", linear_tex(a + b, 0)
    if level == 2:
        return f"Simplify ${a}x+{b}x+{c}$.", f"{a}+{b}={a + b}.", linear_tex(a + b, c)
    if level == 3:
        a = _d(r, 2)
        return f"Expand ${a}(x+{b})$.", f"{a}*{b}={a * b}.", linear_tex(a, a * b)
    if level == 4:  # often a negative coefficient
        return f"Simplify ${a}x-{b}x+{c}$.", f"{a}-{b}={a - b}.", linear_tex(a - b, c)
    p, q = _d(r), _d(r)
    return (f"Expand $(x+{p})(x+{q})$.", f"{p}+{q}={p + q}. {p}*{q}={p * q}.", f"x^2+{p + q}x+{p * q}")


def _precalculus(r: random.Random, level: int) -> tuple[str, str, str]:
    a, b, c, d = _d(r), _d(r), _d(r), _d(r)
    if level == 1:
        return f"Simplify ${a}\\sqrt{{2}}+{b}\\sqrt{{2}}$.", f"{a}+{b}={a + b}.", f"{a + b}\\sqrt{{2}}"
    if level == 2:
        s = a - b
        ans = {0: "0", 1: "\\sqrt{3}", -1: "-\\sqrt{3}"}.get(s, f"{s}\\sqrt{{3}}")
        return f"Simplify ${a}\\sqrt{{3}}-{b}\\sqrt{{3}}$.", f"{a}-{b}={s}.", ans
    if level == 3:
        return (f"Compute $({a}, {b})+({c}, {d})$.", f"{a}+{c}={a + c}. {b}+{d}={b + d}.",
                f"({a + c}, {b + d})")
    p, q = a * c, b * d
    if level == 4:
        return (f"Compute the dot product of $({a}, {b})$ and $({c}, {d})$.",
                f"{a}*{c}={p}. {b}*{d}={q}. {p}+{q}={p + q}.", str(p + q))
    p, q = a * d, b * c
    return (f"Compute the determinant of the matrix with rows $({a}, {b})$ and $({c}, {d})$.",
            f"{a}*{d}={p}. {b}*{c}={q}. {p}-{q}={p - q}.", str(p - q))


MAKERS: dict[str, Maker] = {
    "Prealgebra": _prealgebra,
    "Algebra": _algebra,
    "Number Theory": _number_theory,
    "Counting & Probability": _counting,
    "Geometry": _geometry,
    "Intermediate Algebra": _intermediate_algebra,
    "Precalculus": _precalculus,
}


def split_of(problem: str) -> str:
    """'test' for a fixed share of problem texts, else 'train' (seed-independent, so splits never overlap)."""
    h = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "little")
    return "test" if (h % 10_000) < TEST_FRACTION * 10_000 else "train"


def make_row(r: random.Random, type_: str, level: int) -> dict[str, str]:
    problem, steps, answer = MAKERS[type_](r, level)
    return {"problem": problem, "level": f"Level {level}", "type": type_,
            "solution": f"{steps} $\\boxed{{{answer}}}$."}


def generate_rows(n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` distinct raw rows of ``split`` ("train" or "test"), deterministic under ``seed``.

    Types take turns and levels are drawn uniformly, so every type and level is present once ``n`` is
    a few dozen. Small problem spaces (level 1 has under a hundred texts per type) run out first; the
    draw then moves on, so a large ``n`` holds more of the higher levels.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    r = random.Random(f"{seed}:{split}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    turn, misses = 0, 0
    while len(rows) < n:
        row = make_row(r, TYPES[turn % len(TYPES)], r.choice(LEVELS))
        if row["problem"] in seen or split_of(row["problem"]) != split:
            misses += 1
            if misses % 50 == 0:  # this type's space is used up at the levels drawn: yield the turn
                turn += 1
            if misses > 100 * n + 1000:
                raise ValueError(f"could not draw {n} distinct {split} problems; ask for fewer")
            continue
        seen.add(row["problem"])
        rows.append(row)
        turn += 1
    return rows
