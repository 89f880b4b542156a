"""The offline generator: MATH schema, determinism, disjoint splits, coverage of types, levels and answer forms."""
import re
from collections import Counter

import pytest

from cookbook.data.generate import LEVELS, TYPES, frac_tex, generate_rows, split_of
from cookbook.data.reward import compute_score, last_boxed

from fractions import Fraction


@pytest.fixture(scope="module")
def rows():
    return generate_rows(1500, seed=11)


def test_schema(rows):
    for r in rows:
        assert set(r) == {"problem", "level", "type", "solution"}
        assert r["level"] in {f"Level {i}" for i in LEVELS} and r["type"] in TYPES
        assert r["solution"].rstrip().endswith("$.") and last_boxed(r["solution"])


def test_deterministic_under_a_seed_and_different_across_seeds():
    assert generate_rows(50, seed=3) == generate_rows(50, seed=3)
    assert generate_rows(50, seed=3) != generate_rows(50, seed=4)


def test_splits_are_disjoint_whatever_the_seeds():
    train = {r["problem"] for r in generate_rows(2000, seed=1, split="train")}
    test = {r["problem"] for r in generate_rows(400, seed=2, split="test")}
    assert not train & test
    assert all(split_of(p) == "test" for p in test)


def test_rows_are_distinct(rows):
    assert len({r["problem"] for r in rows}) == len(rows)


def test_every_type_and_level_appears(rows):
    assert set(Counter(r["type"] for r in rows)) == set(TYPES)
    assert set(Counter(r["level"] for r in rows)) == {f"Level {i}" for i in LEVELS}


def test_answer_forms_are_varied(rows):
    answers = [last_boxed(r["solution"]) for r in rows]
    forms = Counter()
    for a in answers:
        if re.fullmatch(r"\d+", a):
            forms["positive integer"] += 1
        elif re.fullmatch(r"-\d+", a):
            forms["negative"] += 1
        elif "\\frac" in a:
            forms["fraction"] += 1
        elif re.fullmatch(r"-?\d+\.\d+", a):
            forms["decimal"] += 1
        elif "x" in a:
            forms["expression"] += 1
    assert all(forms[f] >= 10 for f in ("positive integer", "negative", "fraction", "decimal", "expression")), forms


def test_reference_solutions_score_one_against_their_own_answers(rows):
    for r in rows[:300]:
        assert compute_score(r["solution"], last_boxed(r["solution"])).score == 1.0


def test_bad_split_name():
    with pytest.raises(ValueError, match="split must be"):
        generate_rows(3, seed=0, split="validation")


@pytest.mark.parametrize("q, tex", [(Fraction(3, 4), "\\frac{3}{4}"), (Fraction(-1, 2), "-\\frac{1}{2}"),
                                    (Fraction(6, 3), "2")])
def test_frac_tex(q, tex):
    assert frac_tex(q) == tex
