"""What notebook 10 shows about the data: counts by level and type, and prompt lengths."""
from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any, Optional

from cookbook.config import CookbookConfig
from cookbook.data.preprocess import prompt_token_count, read_records


def load_split(data_dir: str | os.PathLike, split: str) -> list[dict[str, Any]]:
    return read_records(Path(data_dir) / f"{split}.jsonl")


def counts_table(records: list[dict[str, Any]]):
    """A level x type table of record counts (pandas DataFrame), with totals."""
    import pandas as pd

    pairs = Counter((r["extra_info"].get("level") or "?", r["extra_info"].get("type") or "?") for r in records)
    df = pd.Series(pairs).unstack(fill_value=0).sort_index()
    df["total"] = df.sum(axis=1)
    df.loc["total"] = df.sum(axis=0)
    return df


def prompt_text(record: dict[str, Any]) -> str:
    return "".join(m["content"] for m in record["prompt"])


def prompt_lengths(records: list[dict[str, Any]], tokenizer: Any = None) -> list[int]:
    """Prompt lengths in tokens (with the chat template) when a tokenizer is given, else characters."""
    if tokenizer is None:
        return [len(prompt_text(r)) for r in records]
    return [prompt_token_count(tokenizer, r["prompt"]) for r in records]


def length_summary(records: list[dict[str, Any]], tokenizer: Any = None, limit: Optional[int] = None
                   ) -> dict[str, float]:
    import numpy as np

    lengths = np.array(prompt_lengths(records, tokenizer))
    unit = "tokens" if tokenizer is not None else "characters"
    summary = {"unit": unit, "count": int(len(lengths)), "mean": round(float(lengths.mean()), 1),
               "p50": float(np.percentile(lengths, 50)), "p99": float(np.percentile(lengths, 99)),
               "max": int(lengths.max())}
    if limit and tokenizer is not None:
        summary[f"over {limit}"] = int((lengths > limit).sum())
    return summary


def plot_prompt_lengths(records: list[dict[str, Any]], tokenizer: Any = None,
                        path: Optional[str | os.PathLike] = None, limit: Optional[int] = None):
    """Histogram of prompt lengths, with the recipe's prompt limit drawn when it is in tokens."""
    import matplotlib

    if path is not None and "inline" not in matplotlib.get_backend():
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lengths = prompt_lengths(records, tokenizer)
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.hist(lengths, bins=40, color="#4472c4")
    unit = "tokens (chat template applied)" if tokenizer is not None else "characters"
    ax.set_xlabel(f"prompt length, {unit}")
    ax.set_ylabel("records")
    if limit and tokenizer is not None:
        ax.axvline(limit, color="#c00000", ls="--", label=f"grpo.max_prompt_length = {limit}")
        ax.legend()
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=110)
    return fig


def tokenizer_for(cfg: CookbookConfig):
    """The policy's tokenizer: the tiny build's (built and cached on first use) or the user's HF directory."""
    from transformers import AutoTokenizer

    from cookbook.models.tiny import resolve_hf_dir

    return AutoTokenizer.from_pretrained(str(resolve_hf_dir(cfg)))
