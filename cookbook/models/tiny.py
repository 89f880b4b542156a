"""The `tiny` preset's model: a few-million-parameter DeepSeek-V3 (MLA + MoE) built offline.

Steps: generate MATH-schema problems, train a BPE tokenizer on them, build a
``DeepseekV3ForCausalLM`` from the preset (kv_lora_rank 512 + rope 64 as vLLM's CPU MLA requires;
sigmoid noaux_tc router with ``e_score_correction_bias``; a shared expert; the first layer dense), and
warm it up with supervised learning on worked solutions so that it answers in ``\\boxed{}`` and gets
some right.

The warm-up demonstrations carry a bad habit, as a base model carries the habits of its web text: in
``WARMUP_OFF_BY_ONE`` of them the worked chain is right but the boxed answer's last digit is one too high.
The warmed-up policy therefore boxes the wrong number more often than the right one, while sampling the
right one often enough to be rewarded: the situation in which reinforcement learning with a verifiable
reward changes behaviour, and what the tiny GRPO run shows. Without such a habit, supervised learning on
exactly the RL task's distribution leaves GRPO nothing to improve within minutes (learning rates 3e-5 to
5e-4 and batches of 16 to 128 prompts were tried: BENCHMARKS.md, "Tiny GRPO learning").

The result is an ordinary HF directory, the same kind a user downloads for Moonlight, built once per machine
and (architecture, builder version), then reused from the cache (``~/.cache/grpo-cookbook`` or
``$COOKBOOK_CACHE``).
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Optional

import torch

from cookbook.atomic import atomic_dir
from cookbook.config import OFFLINE_PRESETS, ConfigError, CookbookConfig
from cookbook.models.hf_config import check_hf_config, hf_config_dict, read_hf_config

BUILDER_VERSION = 4  # bump when the recipe below changes: it invalidates cached builds
WARMUP_ROWS = 6000
WARMUP_STEPS = 600
WARMUP_BATCH = 64
WARMUP_LR = 3e-3
# The build's own seed, not the run's: like a downloaded checkpoint, the starting model is the same for every
# run seed, so runs with different seeds differ only in what GRPO does.
BUILD_SEED = 1234
WARMUP_OFF_BY_ONE = 0.6  # share of warm-up demonstrations whose boxed answer ends one digit too high
EVAL_ROWS = 200


def cache_root() -> Path:
    """``$COOKBOOK_CACHE``, else ``~/.cache/grpo-cookbook``: shared by every checkout on the machine."""
    env = os.environ.get("COOKBOOK_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "grpo-cookbook"


def _build_model_config(cfg: CookbookConfig):
    """The architecture the build uses: ``cfg.model`` with the training dtype left out. The warm-up always runs and
    saves in fp32 (a downloaded checkpoint does not change with the dtype one trains it in); a bf16 run casts the same
    weights when they are converted (notebook 20) and loaded by the rollout engine."""
    return replace(cfg.model, params_dtype="float32", hf_dir="", mcore_dir="")


def build_key(cfg: CookbookConfig) -> str:
    """What the cached build depends on: the architecture (not the training dtype), the prompt suffix, the recipe."""
    payload = json.dumps({"model": asdict(_build_model_config(cfg)), "seed": BUILD_SEED,
                          "suffix": cfg.data.prompt_suffix, "version": BUILDER_VERSION}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def _chat_ids(tokenizer, content: str) -> list[int]:
    out = tokenizer.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                        tokenize=True)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


def _raise_last_digit(text: str, start: int, end: int) -> str:
    """``text`` with its last digit in ``[start, end)`` raised by one (9 becomes 1, never 0, so the answer stays
    wrong after normalisation); unchanged when there is none."""
    digits = [i for i in range(start, end) if text[i].isdigit()]
    if not digits:
        return text
    i = digits[-1]
    return text[:i] + "123456789"[int(text[i]) % 9] + text[i + 1:]


def off_by_one_answer(solution: str) -> str:
    """The solution with the last digit of its last ``\\boxed{...}`` answer raised by one: the planted habit."""
    start = solution.rfind("\\boxed{")
    if start < 0:
        return solution
    end = solution.find("}$", start)
    return _raise_last_digit(solution, start + 7, end if end > 0 else len(solution))


def habit_answer(answer: str) -> str:
    """The answer the planted habit gives for the right ``answer`` (its last digit raised by one)."""
    return _raise_last_digit(answer, 0, len(answer))


def _sft_batches(tokenizer, rows: list[dict], suffix: str, batch: int, steps: int, seed: int):
    """Right-padded (input_ids, labels) batches; labels are -100 on the prompt and padding."""
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    examples = []
    for r in rows:
        prompt = _chat_ids(tokenizer, r["problem"] + suffix)
        solution = off_by_one_answer(r["solution"]) if rng.random() < WARMUP_OFF_BY_ONE else r["solution"]
        answer = tokenizer(solution, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        examples.append((prompt, answer))
    for _ in range(steps):
        idx = torch.randint(len(examples), (batch,), generator=g).tolist()
        length = max(len(examples[i][0]) + len(examples[i][1]) for i in idx)
        ids = torch.full((batch, length), tokenizer.pad_token_id)
        labels = torch.full((batch, length), -100)
        for row, i in enumerate(idx):
            p, a = examples[i]
            ids[row, :len(p) + len(a)] = torch.tensor(p + a)
            labels[row, len(p):len(p) + len(a)] = torch.tensor(a)
        yield ids, labels


@torch.no_grad()
def greedy_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = 40, batch: int = 50) -> list[str]:
    """Greedy completions with HF ``generate`` (left padding)."""
    model.eval()
    outs: list[str] = []
    for start in range(0, len(prompts), batch):
        chunk = [_chat_ids(tokenizer, p) for p in prompts[start:start + batch]]
        width = max(map(len, chunk))
        ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(c)) + c for c in chunk])
        attn = (torch.arange(width)[None, :] >= torch.tensor([width - len(c) for c in chunk])[:, None]).long()
        gen = model.generate(input_ids=ids, attention_mask=attn, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
        outs += tokenizer.batch_decode(gen[:, width:], skip_special_tokens=True)
    return outs


def _accuracy(responses: list[str], rows: list[dict]) -> float:
    from cookbook.data.reward import compute_score, last_boxed

    scores = [compute_score(resp, last_boxed(r["solution"]) or "").score for resp, r in zip(responses, rows)]
    return sum(scores) / max(1, len(scores))


def build_tiny_model(cfg: CookbookConfig, cache_dir: str | Path | None = None, force: bool = False,
                     progress: bool = True) -> Path:
    """Return the cached HF directory of the tiny model, building it first when missing."""
    from tqdm.auto import tqdm
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from cookbook.data.generate import generate_rows
    from cookbook.models.tokenizer import train_tokenizer

    out = Path(cache_dir) if cache_dir else cache_root() / "models" / f"{cfg.preset}-{build_key(cfg)}"
    if (out / "warmup_report.json").is_file() and not force:
        return out
    t0 = time.perf_counter()
    torch.manual_seed(BUILD_SEED)
    suffix = cfg.data.prompt_suffix
    rows = generate_rows(WARMUP_ROWS, BUILD_SEED + 7919, "train")
    test_rows = generate_rows(EVAL_ROWS, BUILD_SEED + 7919, "test")
    tokenizer = train_tokenizer([r["problem"] + suffix for r in rows] + [r["solution"] for r in rows],
                                cfg.model.vocab_size)
    hf_cfg = hf_config_dict(_build_model_config(cfg), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                            pad_token_id=tokenizer.pad_token_id)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf_cfg)).float()
    params = sum(p.numel() for p in model.parameters())

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=WARMUP_LR, weight_decay=0.01, betas=(0.9, 0.95))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=WARMUP_LR, total_steps=WARMUP_STEPS, pct_start=0.1)
    bar = tqdm(_sft_batches(tokenizer, rows, suffix, WARMUP_BATCH, WARMUP_STEPS, BUILD_SEED), total=WARMUP_STEPS,
               desc="tiny warm-up", disable=not progress)
    for ids, labels in bar:
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")

    responses = greedy_answers(model, tokenizer, [r["problem"] + suffix for r in test_rows])
    report = {"params": params, "warmup_steps": WARMUP_STEPS, "warmup_batch": WARMUP_BATCH,
              "off_by_one": WARMUP_OFF_BY_ONE,
              "final_loss": float(loss.detach()), "greedy_accuracy": _accuracy(responses, test_rows),
              "eval_rows": len(test_rows), "build_seconds": round(time.perf_counter() - t0, 1),
              "seed": BUILD_SEED, "builder_version": BUILDER_VERSION,
              "examples": [{"problem": r["problem"], "response": resp} for r, resp in zip(test_rows[:5], responses)]}
    with atomic_dir(out, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "warmup_report.json").write_text(json.dumps(report, indent=2))
    return out


def resolve_hf_dir(cfg: CookbookConfig) -> Path:
    """The policy's HF directory: the cached tiny build; for ``tiny-deepseek-v3`` the bf16 cast of its cached fp8
    source (``cookbook.models.fp8_source``, cast into the run folder as a DeepSeek-V3 download is cast); the cached synthetic checkpoint of
    ``moonlight-1gpu``; or the user's download checked against the preset."""
    if cfg.preset == "tiny-deepseek-v3" and not cfg.model.hf_dir:
        from cookbook.convert.source import prepare_source

        return prepare_source(cfg)[0]
    if cfg.preset in OFFLINE_PRESETS and not cfg.model.hf_dir:
        return build_tiny_model(cfg)
    if cfg.preset == "moonlight-1gpu" and not cfg.model.hf_dir:
        from cookbook.models.synthetic import build_synthetic_model

        return build_synthetic_model(cfg)
    if not cfg.model.hf_dir:
        source = {"moonlight-16b-a3b": "moonshotai/Moonlight-16B-A3B-Instruct",
                  "deepseek-v3-671b": "deepseek-ai/DeepSeek-V3-0324"}[cfg.preset]
        raise ConfigError(
            f"model.hf_dir is empty: preset '{cfg.preset}' needs a local HF checkpoint. Download it with "
            f"`modelscope download --model {source} --local_dir DIR` and set model.hf_dir=DIR")
    hf_dir = Path(cfg.model.hf_dir)
    check_hf_config(read_hf_config(hf_dir), cfg.model, str(hf_dir / "config.json"))
    return hf_dir


def load_warmup_report(hf_dir: str | Path) -> Optional[dict]:
    path = Path(hf_dir) / "warmup_report.json"
    return json.loads(path.read_text()) if path.is_file() else None
