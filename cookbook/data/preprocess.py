"""Raw MATH-lighteval rows -> the tutorial's record schema, one JSON line per problem.

Every row is checked before anything is written: a bad row stops the step with the file, the row
number and the reason, unless ``skip_bad_rows`` is set, in which case it is skipped and counted.
Given the policy's tokenizer and ``grpo.max_prompt_length``, a record whose chat-templated prompt is longer
than the limit is dropped and counted (``too_long``, apart from bad rows), as the reference drops such
prompts when it loads the data; it is never an error.
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
SPLITS = ("train", "test")  # what MATH-lighteval ships
OUTPUT_SPLITS = ("train", "validation", "test")  # what preprocessing writes (validation when held out)
TOO_LONG_EXAMPLES = 5  # per split, kept in the report and the manifest


class BadRowError(ValueError):
    """A raw row cannot be used; the message names the file, the row and the reason."""


@dataclass
class SplitReport:
    written: int = 0
    skipped: int = 0  # bad rows (skip_bad_rows)
    reasons: Counter = field(default_factory=Counter)
    too_long: int = 0  # prompts over max_prompt_length tokens, dropped
    too_long_examples: list[dict[str, Any]] = field(default_factory=list)  # {"split", "row", "tokens"}


@dataclass
class PreprocessReport:
    out_dir: Path
    splits: dict[str, SplitReport]
    max_prompt_length: Optional[int] = None

    def __str__(self) -> str:
        lines = [f"preprocessed into {self.out_dir}"]
        for name, s in self.splits.items():
            extra = f", skipped {s.skipped} ({dict(s.reasons)})" if s.skipped else ""
            if s.too_long:
                rows = ", ".join(f"row {e['row']} ({e['tokens']} tokens)" for e in s.too_long_examples)
                extra += (f", dropped {s.too_long} too long (over grpo.max_prompt_length={self.max_prompt_length} "
                          f"tokens; e.g. {rows})")
            lines.append(f"  {name}: {s.written} records{extra}")
        return "\n".join(lines)


def prompt_token_count(tokenizer: Any, messages: list[dict[str, str]]) -> int:
    """Tokens of the chat-templated prompt, by the call the rollout engine makes (``encode``)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return len(ids["input_ids"] if hasattr(ids, "keys") else ids)


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
               skip_bad_rows: bool = False, source_names: Optional[dict[str, str]] = None,
               tokenizer: Any = None, max_prompt_length: Optional[int] = None) -> PreprocessReport:
    """Check every row of every split, then write ``train.jsonl``, ``test.jsonl`` (and ``validation.jsonl`` when
    ``raw`` has one) atomically.

    With ``tokenizer`` and ``max_prompt_length``, records whose chat-templated prompt is longer than
    ``max_prompt_length`` tokens are dropped and counted per split (``SplitReport.too_long``).
    """
    out_dir = Path(out_dir)
    source_names = source_names or {}
    if max_prompt_length is not None and tokenizer is None:
        raise ValueError("preprocess: max_prompt_length needs the policy's tokenizer to count prompt tokens")
    limit = max_prompt_length if tokenizer is not None else None
    records: dict[str, list[dict]] = {}
    reports: dict[str, SplitReport] = {}
    for split in SPLITS:
        if split not in raw:
            raise BadRowError(f"no '{split}' split in the raw data (found: {', '.join(raw) or 'none'})")
    for split in [s for s in OUTPUT_SPLITS if s in raw]:
        report = SplitReport()
        kept = []
        for n, row in enumerate(raw[split], 1):
            problem = row_problem(row)
            if problem is None:
                record = to_record(row, split, len(kept), prompt_suffix)
                tokens = prompt_token_count(tokenizer, record["prompt"]) if limit is not None else 0
                if limit is not None and tokens > limit:
                    report.too_long += 1
                    if len(report.too_long_examples) < TOO_LONG_EXAMPLES:
                        report.too_long_examples.append({"split": split, "row": n, "tokens": tokens})
                else:
                    kept.append(record)
            elif skip_bad_rows:
                report.skipped += 1
                report.reasons[problem] += 1
            else:
                where = source_names.get(split, f"{split} split")
                raise BadRowError(f"{where}, row {n}: {problem}. Fix the row, or set data.skip_bad_rows=true "
                                  "to skip and count such rows")
        report.written = len(kept)
        records[split], reports[split] = kept, report
    (out_dir / "validation.jsonl").unlink(missing_ok=True)  # a previous run's, if this one has none
    for split in records:
        write_jsonl(out_dir / f"{split}.jsonl", records[split])
    return PreprocessReport(out_dir, reports, limit)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a preprocessed JSONL file; a broken line is reported with its number."""
    return read_jsonl(path, BadRowError)
