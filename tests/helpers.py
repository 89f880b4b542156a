"""Shared test helpers: a random-weight tiny DeepSeek-V3 HF directory with a real tokenizer, a free port, and
the runner of the multi-process probes (``tests/integration/*_probe.py``)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).parents[1]


def make_random_tiny_hf(out: Path, seed: int = 0, preset: str = "tiny") -> Path:
    """The tiny architecture (or ``preset``'s, e.g. tiny-deepseek-v3) with random weights (and a non-zero router expert bias, so routing bugs
    show), a tokenizer trained on a few generated rows; seconds to build, unlike the warmed-up model."""
    import transformers

    from cookbook.config import load_config
    from cookbook.data.generate import generate_rows
    from cookbook.models.hf_config import hf_config_dict
    from cookbook.models.tokenizer import train_tokenizer

    cfg = load_config(preset)
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



def make_base_and_perturbed(root: Path, preset: str = "tiny") -> tuple[Path, Path]:
    """A random tiny HF checkpoint and a copy with every weight moved by N(0, 0.02): what a weight sync must carry."""
    import torch
    import transformers

    base = make_random_tiny_hf(root / "base", preset=preset)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(base, dtype=torch.float32)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model.save_pretrained(root / "perturbed")
    return base, root / "perturbed"

def free_port() -> int:
    """A TCP port free right now on 127.0.0.1, for a multi-process test's MASTER_PORT."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_ranks(probe: Path, args: tuple, world: int, env: dict, timeout: float) -> tuple[list, list, list]:
    """Start ``world`` ranks; as soon as one fails, stop the others (they would wait for it in a collective
    until gloo's 30-minute timeout). Returns exit codes, stdouts, stderrs."""
    with tempfile.TemporaryDirectory() as logs:
        outs = [(open(f"{logs}/{r}.out", "w+"), open(f"{logs}/{r}.err", "w+")) for r in range(world)]
        procs = [subprocess.Popen([sys.executable, str(probe), *args], env=dict(env, RANK=str(r)), stdout=o, stderr=e,
                                  text=True) for r, (o, e) in enumerate(outs)]
        deadline = time.monotonic() + timeout
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
                        p.wait()
                break
            time.sleep(0.2)
        texts = []
        for o, e in outs:
            o.seek(0), e.seek(0)
            texts.append((o.read(), e.read()))
            o.close(), e.close()
    return [p.returncode for p in procs], [t[0] for t in texts], [t[1] for t in texts]


def run_probe(probe: Path, *args: str, world: int = 1, extra_env: Optional[dict] = None,
              timeout: float = 900) -> dict:
    """Run ``probe`` as ``world`` processes of one job (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT, as
    torchrun sets them), or one plain process; rank 0's ``RESULT <json>`` line. A port taken between
    ``free_port`` and the rendezvous (other jobs start servers too) gets one more try on another."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore", **(extra_env or {}))
    env.pop("RANK", None)
    for attempt in (1, 2):
        if world > 1:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(world))
        codes, stdouts, stderrs = _run_ranks(probe, args, world, env, timeout)
        if all(c == 0 for c in codes):
            line = next(ln for ln in stdouts[0].splitlines() if ln.startswith("RESULT "))
            return json.loads(line[len("RESULT "):])
        errors = "\n".join(f"rank {r} (exit {c}): {err[-3000:]}" for r, (c, err) in enumerate(zip(codes, stderrs)))
        if attempt == 1 and world > 1 and "EADDRINUSE" in errors:
            continue
        raise AssertionError(errors)
