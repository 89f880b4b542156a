"""Raw MATH-lighteval rows -> the tutorial's record schema, one JSON line per problem.

Every row is checked before anything is written: a bad row stops the step with the file, the row
number and the reason, unless ``skip_bad_rows`` is set, in which case it is skipped and counted.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from cookbook.atomic import read_jsonl, write_jsonl
from cookbook.data.reward import last_boxed

DATA_SOURCE = "DigitalLearningGmbH/MATH-lighteval"
REQUIRED = ("problem", "solution")
SPLITS = ("train", "test")


class BadRowError(ValueError):
    """A raw row cannot be used; the message names the file, the row and the reason."""


@dataclass
class SplitReport:
    written: int = 0
    skipped: int = 0
    reasons: Counter = field(default_factory=Counter)


@dataclass
class PreprocessReport:
    out_dir: Path
    splits: dict[str, SplitReport]

    def __str__(self) -> str:
        lines = [f"preprocessed into {self.out_dir}"]
        for name, s in self.splits.items():
            extra = f", skipped {s.skipped} ({dict(s.reasons)})" if s.skipped else ""
            lines.append(f"  {name}: {s.written} records{extra}")
        return "\n".join(lines)


def row_problem(row: Any) -> Optional[str]:
    """Why ``row`` is unusable, or None when it is fine."""
    if not isinstance(row, dict):
        return f"expected an object, got {type(row).__name__}"
    for key in REQUIRED:
        if key not in row or row[key] is None:
            return f"missing field '{key}'"
        if not isinstance(row[key], str) or not row[key].strip():
            return f"field '{key}' is not a non-empty string"
    if last_boxed(row["solution"]) is None:
        return "no \\boxed{...} answer in the solution"
    return None


def to_record(row: dict[str, Any], split: str, index: int, prompt_suffix: str) -> dict[str, Any]:
    """The tutorial's record (recipe-facts.md). ``extra_info`` also keeps level and type for the analysis."""
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": row["problem"] + prompt_suffix}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": last_boxed(row["solution"])},
        "extra_info": {"split": split, "index": index, "level": row.get("level"), "type": row.get("type")},
    }


def preprocess(raw: dict[str, list[Any]], out_dir: str | os.PathLike, prompt_suffix: str,
               skip_bad_rows: bool = False, source_names: Optional[dict[str, str]] = None) -> PreprocessReport:
    """Check every row of every split, then write ``train.jsonl`` and ``test.jsonl`` atomically."""
    out_dir = Path(out_dir)
    source_names = source_names or {}
    records: dict[str, list[dict]] = {}
    reports: dict[str, SplitReport] = {}
    for split in SPLITS:
        if split not in raw:
            raise BadRowError(f"no '{split}' split in the raw data (found: {', '.join(raw) or 'none'})")
        report = SplitReport()
        kept = []
        for n, row in enumerate(raw[split], 1):
            problem = row_problem(row)
            if problem is None:
                kept.append(to_record(row, split, len(kept), prompt_suffix))
            elif skip_bad_rows:
                report.skipped += 1
                report.reasons[problem] += 1
            else:
                where = source_names.get(split, f"{split} split")
                raise BadRowError(f"{where}, row {n}: {problem}. Fix the row, or set data.skip_bad_rows=true "
                                  "to skip and count such rows")
        report.written = len(kept)
        records[split], reports[split] = kept, report
    for split in SPLITS:
        write_jsonl(out_dir / f"{split}.jsonl", records[split])
    return PreprocessReport(out_dir, reports)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a preprocessed JSONL file; a broken line is reported with its number."""
    return read_jsonl(path, BadRowError)
