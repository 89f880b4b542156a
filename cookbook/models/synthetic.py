"""Synthetic policies: a preset's architecture with random weights, in the real on-disk HF layout, for presets
that measure the system rather than learning (``moonlight-1gpu``). The tokenizer is the tiny model's byte-level
BPE, trained on the generated problems, with reserved special tokens up to the preset's vocabulary (163840 for
Moonlight's), as real tokenizers reserve theirs. Built once per machine and architecture, then reused from the
cache, like the tiny model."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from cookbook.atomic import atomic_dir
from cookbook.config import CookbookConfig

SEED = 1234
VERSION = 1  # bump when the recipe below changes


def synthetic_dir(cfg: CookbookConfig) -> Path:
    from cookbook.models.tiny import cache_root

    key = json.dumps({"model": asdict(cfg.model) | {"hf_dir": "", "mcore_dir": ""}, "seed": SEED,
                      "version": VERSION}, sort_keys=True)
    return cache_root() / "models" / f"{cfg.preset}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def build_synthetic_model(cfg: CookbookConfig) -> Path:
    """The cached HF directory of ``cfg.model`` with random weights, built first when missing."""
    from cookbook.convert.synthetic import write_random_hf_checkpoint
    from cookbook.data.generate import generate_rows
    from cookbook.models.tokenizer import train_tokenizer

    out = synthetic_dir(cfg)
    if (out / "config.json").is_file():
        return out
    rows = generate_rows(2000, SEED, "train")
    tokenizer = train_tokenizer([r["problem"] + cfg.data.prompt_suffix for r in rows] + [r["solution"] for r in rows],
                                512)
    tokenizer.add_tokens([f"<|reserved_{i}|>" for i in range(cfg.model.vocab_size - len(tokenizer))],
                         special_tokens=True)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
           "pad_token_id": tokenizer.pad_token_id}
    with atomic_dir(out, overwrite=True) as tmp:
        write_random_hf_checkpoint(cfg.model, tmp, max_shard_bytes=1 << 30, seed=SEED, extra_config=ids)
        tokenizer.save_pretrained(tmp)
    return out
