"""Offline MATH-lighteval-schema problems for the tiny preset.

Rows have the raw dataset's fields (``problem``, ``level``, ``type``, ``solution`` ending in
``\\boxed{...}``) and go through the same preprocessing as the real data. They are built for what a
few-million-parameter model can learn on 2 CPU cores in minutes: short problems, short worked
solutions, answers of few tokens. Difficulty grows with the level (larger numbers, more steps), so a
warmed-up tiny model solves most level-1 problems, some level-3 ones and few level-5 ones: room for
GRPO to improve. Answers come in the forms MATH has: integers, negatives, fractions, decimals and
simple expressions.

Train and test are disjoint: a problem's split is decided by a hash of its text, so a test problem
can never be drawn for training.
"""
from __future__ import annotations

import hashlib
import random
from fractions import Fraction
from math import comb, gcd
from typing import Callable

TYPES = ("Prealgebra", "Algebra", "Number Theory", "Counting & Probability", "Geometry",
         "Intermediate Algebra", "Precalculus")
LEVELS = (1, 2, 3, 4, 5)
TEST_FRACTION = 0.15  # share of all possible problem texts reserved for the test split


def _hi(level: int) -> int:
    """Largest operand at each level."""
    return (5, 9, 15, 25, 40)[level - 1]


def frac_tex(q: Fraction) -> str:
    """MATH's answer form for a rational: an integer, or \\frac{p}{q} with the sign in front."""
    if q.denominator == 1:
        return str(q.numerator)
    sign = "-" if q < 0 else ""
    return f"{sign}\\frac{{{abs(q.numerator)}}}{{{q.denominator}}}"


def _poly_tex(a: int, b: int, c: int) -> str:
    """ax^2 + bx + c written as MATH writes it (no 1x, no +-)."""
    terms = []
    for coef, var in ((a, "x^2"), (b, "x"), (c, "")):
        if coef == 0:
            continue
        mag = abs(coef)
        body = var if (mag == 1 and var) else f"{mag}{var}"
        sign = "-" if coef < 0 else "+"
        terms.append((sign, body))
    if not terms:
        return "0"
    first_sign, first = terms[0]
    out = ("-" if first_sign == "-" else "") + first
    for sign, body in terms[1:]:
        out += f"{sign}{body}"
    return out


# Each maker returns (problem, solution steps, answer) for a level.
Maker = Callable[[random.Random, int], tuple[str, str, str]]


def _prealgebra(r: random.Random, level: int) -> tuple[str, str, str]:
    hi = _hi(level)
    a, b = r.randint(1, hi), r.randint(1, hi)
    kind = r.choice(("+", "-", "*")) if level > 1 else r.choice(("+", "-"))
    if kind == "*":
        a, b = r.randint(2, min(hi, 9 + 3 * level)), r.randint(2, 9)
        return f"What is ${a} \\times {b}$?", f"{a}*{b}={a * b}.", str(a * b)
    if kind == "-":
        return f"What is ${a} - {b}$?", f"{a}-{b}={a - b}.", str(a - b)
    return f"What is ${a} + {b}$?", f"{a}+{b}={a + b}.", str(a + b)


def _algebra(r: random.Random, level: int) -> tuple[str, str, str]:
    hi = _hi(level)
    x = r.randint(-hi // 3 if level > 2 else 1, max(2, hi // 2))
    a = r.randint(2, 3 + level) if level > 1 else 1
    b = r.randint(1, hi)
    c = a * x + b
    lhs = f"{a}x + {b}" if a != 1 else f"x + {b}"
    step = f"{a}x={c - b}" if a != 1 else f"x={c - b}"
    return f"Solve for $x$: ${lhs} = {c}$.", f"{step}, so x={x}.", str(x)


def _number_theory(r: random.Random, level: int) -> tuple[str, str, str]:
    hi = _hi(level)
    if r.random() < 0.5:
        n, m = r.randint(hi // 2 + 2, 2 * hi + 5), r.randint(2, 3 + 2 * level)
        return (f"What is the remainder when ${n}$ is divided by ${m}$?",
                f"{n}={m}*{n // m}+{n % m}.", str(n % m))
    g = r.randint(2, 2 + 2 * level)
    a, b = g * r.randint(1, 3 + level), g * r.randint(1, 3 + level)
    return f"What is the greatest common divisor of ${a}$ and ${b}$?", f"gcd({a},{b})={gcd(a, b)}.", str(gcd(a, b))


def _counting(r: random.Random, level: int) -> tuple[str, str, str]:
    if r.random() < 0.3:
        n = r.randint(3 + level // 2, 4 + level)
        k = r.randint(1, min(3, n - 1)) if level < 4 else r.randint(2, n - 2)
        return (f"How many ways are there to choose ${k}$ items from ${n}$ distinct items?",
                f"C({n},{k})={comb(n, k)}.", str(comb(n, k)))
    if r.random() < 0.6:
        red, blue = r.randint(1, 3 + 3 * level), r.randint(1, 3 + 3 * level)
        p = Fraction(red, red + blue)
        return (f"A bag has ${red}$ red marbles and ${blue}$ blue marbles. What is the probability that a marble "
                "drawn at random is red?", f"{red}/({red}+{blue})={frac_tex(p)}.", frac_tex(p))
    sides = r.choice((6, 8, 10, 12)[: 1 + level // 2])
    good = r.randint(1, sides - 1)
    p = Fraction(good, sides)
    return (f"A fair {sides}-sided die is rolled. What is the probability of rolling a number at most ${good}$?",
            f"{good}/{sides}={frac_tex(p)}.", frac_tex(p))


def _geometry(r: random.Random, level: int) -> tuple[str, str, str]:
    hi = min(_hi(level), 40)
    a, b = r.randint(1, hi), r.randint(1, hi)
    kind = r.choice(("rectangle", "triangle", "perimeter") if level > 1 else ("rectangle", "perimeter"))
    if kind == "triangle":
        area = Fraction(a * b, 2)
        ans = str(area.numerator) if area.denominator == 1 else f"{float(area):.1f}"
        return (f"A right triangle has legs of length ${a}$ and ${b}$. What is its area?",
                f"{a}*{b}/2={ans}.", ans)
    if kind == "perimeter":
        return (f"A rectangle has side lengths ${a}$ and ${b}$. What is its perimeter?",
                f"2*({a}+{b})={2 * (a + b)}.", str(2 * (a + b)))
    return f"A rectangle has side lengths ${a}$ and ${b}$. What is its area?", f"{a}*{b}={a * b}.", str(a * b)


def _intermediate_algebra(r: random.Random, level: int) -> tuple[str, str, str]:
    hi = 2 + level
    p, q = r.randint(-hi, hi) or 1, r.randint(-hi, hi) or 1
    if level <= 2:
        a, b = r.randint(1, 5 + level), r.randint(1, 5 + level)
        c = r.randint(1, 9)
        return (f"Simplify ${a}x + {b}x + {c}$.", f"{a}x+{b}x={a + b}x.", _poly_tex(0, a + b, c))
    left = f"(x {'+' if p > 0 else '-'} {abs(p)})"
    right = f"(x {'+' if q > 0 else '-'} {abs(q)})"
    ans = _poly_tex(1, p + q, p * q)
    return f"Expand ${left}{right}$.", f"x^2+({p}+{q})x+({p})({q}).", ans


def _precalculus(r: random.Random, level: int) -> tuple[str, str, str]:
    hi = 3 + 2 * level
    a, b, c, d = (r.randint(-hi if level > 2 else 0, hi) for _ in range(4))
    if r.random() < 0.5:
        return (f"Compute the dot product of $({a}, {b})$ and $({c}, {d})$.",
                f"{a}*{c}+{b}*{d}={a * c + b * d}.", str(a * c + b * d))
    det = a * d - b * c
    return (f"Compute the determinant of the matrix with rows $({a}, {b})$ and $({c}, {d})$.",
            f"{a}*{d}-{b}*{c}={det}.", str(det))


def _decimals(r: random.Random, level: int) -> tuple[str, str, str]:
    """A Prealgebra variant whose answer is a decimal."""
    scale = 10 if level < 3 else 100
    a, b = r.randint(1, 10 * level) / scale, r.randint(1, 10 * level) / scale
    fmt = "{:.1f}" if scale == 10 else "{:.2f}"
    total = fmt.format(a + b)
    return f"What is ${fmt.format(a)} + {fmt.format(b)}$?", f"{fmt.format(a)}+{fmt.format(b)}={total}.", total


def _fractions(r: random.Random, level: int) -> tuple[str, str, str]:
    """An Algebra variant whose answer is a fraction."""
    d1, d2 = r.randint(2, 2 + level), r.randint(2, 2 + level)
    n1, n2 = r.randint(1, d1), r.randint(1, d2)
    s = Fraction(n1, d1) + Fraction(n2, d2)
    return (f"What is $\\frac{{{n1}}}{{{d1}}} + \\frac{{{n2}}}{{{d2}}}$? Express your answer as a common fraction.",
            f"{n1}/{d1}+{n2}/{d2}={frac_tex(s)}.", frac_tex(s))


MAKERS: dict[str, tuple[Maker, ...]] = {
    "Prealgebra": (_prealgebra, _prealgebra, _decimals),
    "Algebra": (_algebra, _algebra, _fractions),
    "Number Theory": (_number_theory,),
    "Counting & Probability": (_counting,),
    "Geometry": (_geometry,),
    "Intermediate Algebra": (_intermediate_algebra,),
    "Precalculus": (_precalculus,),
}


def split_of(problem: str) -> str:
    """'test' for a fixed share of problem texts, else 'train' (seed-independent, so splits never overlap)."""
    h = int.from_bytes(hashlib.sha256(problem.encode()).digest()[:8], "little")
    return "test" if (h % 10_000) < TEST_FRACTION * 10_000 else "train"


def make_row(r: random.Random, type_: str, level: int) -> dict[str, str]:
    maker = r.choice(MAKERS[type_])
    problem, steps, answer = maker(r, level)
    return {"problem": problem, "level": f"Level {level}", "type": type_,
            "solution": f"{steps} The answer is $\\boxed{{{answer}}}$."}


def generate_rows(n: int, seed: int, split: str = "train") -> list[dict[str, str]]:
    """``n`` distinct raw rows of ``split`` ("train" or "test"), deterministic under ``seed``.

    Types take turns and levels are drawn uniformly, so every type and level is present once ``n`` is
    a few dozen.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    r = random.Random(f"{seed}:{split}")
    rows: list[dict[str, str]] = []
    seen: set[str] = set()
    turn, misses = 0, 0
    while len(rows) < n:
        # Types take turns; a type whose small problem space is used up (few distinct dice or
        # binomial questions exist) yields its turn after repeated misses.
        type_ = TYPES[turn % len(TYPES)]
        row = make_row(r, type_, r.choice(LEVELS))
        if row["problem"] in seen or split_of(row["problem"]) != split:
            misses += 1
            if misses % 50 == 0:
                turn += 1
            if misses > 100 * n + 1000:
                raise ValueError(f"could not draw {n} distinct {split} problems; ask for fewer")
            continue
        seen.add(row["problem"])
        rows.append(row)
        turn += 1
    return rows
