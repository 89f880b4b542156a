"""Shared test fixtures' makers: a random-weight tiny DeepSeek-V3 HF directory with a real tokenizer."""
from __future__ import annotations

import socket
from pathlib import Path

import torch


def make_random_tiny_hf(out: Path, seed: int = 0) -> Path:
    """The tiny architecture with random weights (and a non-zero router expert bias, so routing bugs
    show), a tokenizer trained on a few generated rows; seconds to build, unlike the warmed-up model."""
    import transformers

    from cookbook.config import load_config
    from cookbook.data.generate import generate_rows
    from cookbook.models.hf_config import hf_config_dict
    from cookbook.models.tokenizer import train_tokenizer

    cfg = load_config("tiny")
    rows = generate_rows(300, seed)
    tok = train_tokenizer([r["problem"] for r in rows] + [r["solution"] for r in rows], cfg.model.vocab_size)
    hf_cfg = hf_config_dict(cfg.model, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**hf_cfg))
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.normal_(0, 0.1)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, for a multi-process test's MASTER_PORT."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
