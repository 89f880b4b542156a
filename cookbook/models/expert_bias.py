"""A start model for the MoE stability study: the tiny model with the expert bias a pre-training leaves.

DeepSeek-V3 and Moonlight balance their experts without an auxiliary loss: during pre-training every router's
``e_score_correction_bias`` moves by a small step against each expert's load (``b_i += u * sign(mean load - load_i)``)
until the experts take about equal shares of the tokens; the bias decides which experts a token goes to (not the
gate values), and the released checkpoints carry it. The tiny model's warm-up never updated its bias, so the bias is
0, and a study of what happens when a trainer and a rollout engine treat that bias differently (the trainer built
without it, as ChatLearn builds Moonlight; a bias updated on one side only) would compare identical runs.

``balanced_bias_checkpoint`` gives the tiny model the bias such a balancing leaves: layer by layer (a layer's bias
changes the inputs of the layers after it, never its own), it records the router's logits for the tokens of
training problems with their worked solutions, then runs the bias updates on those logits with a step that shrinks
until every expert's share is as even as the step allows. The weights are the warm-up's, untouched; the result is
an HF directory like the source, with ``expert_bias.json`` saying what was done.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from cookbook.atomic import atomic_dir
from cookbook.config import CookbookConfig

BALANCE_PROBLEMS = 256  # training problems (with worked solutions) whose tokens the balancing sees
BALANCE_SEED = 4242  # the problems' draw; fixed, like the start model it makes
SCHEDULE = ((1e-2, 300), (3e-3, 300), (1e-3, 300), (3e-4, 300))  # (step u, updates), as pre-training's shrinking rate


def route(scores: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1
          ) -> torch.Tensor:
    """The experts DeepSeek-V3's ``noaux_tc`` router picks ([tokens, top_k]): the top-k of ``scores + bias`` within
    the ``topk_group`` best groups (a group scored by its two best experts), as HF and vLLM route."""
    choice = scores + bias
    if n_group > 1:
        t, e = choice.shape
        group_scores = choice.view(t, n_group, e // n_group).topk(2, dim=-1)[0].sum(-1)
        keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(topk_group, dim=-1)[1], 1.0)
        choice = choice.masked_fill(~keep.bool().repeat_interleave(e // n_group, dim=1), float("-inf"))
    return choice.topk(top_k, dim=-1)[1]


def loads(scores: torch.Tensor, bias: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1
          ) -> torch.Tensor:
    """Each expert's share of the routed (token, slot) pairs, relative to an even share (1 = balanced)."""
    counts = torch.bincount(route(scores, bias, top_k, n_group, topk_group).flatten(), minlength=scores.shape[1])
    return counts.float() / counts.sum() * scores.shape[1]


def balance(scores: torch.Tensor, top_k: int, n_group: int = 1, topk_group: int = 1,
            schedule=SCHEDULE) -> torch.Tensor:
    """The aux-loss-free balancing updates on fixed router scores ``[tokens, experts]``, from a zero bias."""
    bias = torch.zeros(scores.shape[1], dtype=torch.float32)
    for step, updates in schedule:
        for _ in range(updates):
            bias += step * torch.sign(1.0 - loads(scores, bias, top_k, n_group, topk_group))
    return bias


def _calibration_ids(cfg: CookbookConfig, tokenizer) -> torch.Tensor:
    from cookbook.data.generate import generate_rows
    from cookbook.models.tiny import _chat_ids

    suffix = cfg.data.prompt_suffix
    ids: list[int] = []
    for row in generate_rows(BALANCE_PROBLEMS, BALANCE_SEED, "train"):
        ids += _chat_ids(tokenizer, row["problem"] + suffix)
        ids += tokenizer(row["solution"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return torch.tensor(ids)


def balanced_bias_checkpoint(cfg: CookbookConfig, src: str | os.PathLike, out: str | os.PathLike,
                             segment: int = 128) -> Path:
    """``src`` (an HF DeepSeek-V3 directory) with every router's ``e_score_correction_bias`` set by the balancing
    above, written to ``out`` (atomically; an existing complete ``out`` is returned as it is)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    src, out = Path(src), Path(out)
    if (out / "expert_bias.json").is_file():
        return out
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(src)
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    routers = {int(n.split(".")[2]): m for n, m in model.named_modules() if n.endswith("mlp.gate")
               and hasattr(m, "e_score_correction_bias")}
    ids = _calibration_ids(cfg, tokenizer)
    ids = ids[: len(ids) // segment * segment].view(-1, segment)  # independent segments of the token stream
    m = cfg.model
    report: dict[str, Any] = {"source": str(src.resolve()), "problems": BALANCE_PROBLEMS, "seed": BALANCE_SEED,
                              "tokens": int(ids.numel()), "schedule": [list(s) for s in SCHEDULE], "layers": {}}
    for layer in sorted(routers):
        router, captured = routers[layer], []
        hook = router.register_forward_hook(lambda mod, inp, outp: captured.append(outp[0].detach()))
        with torch.no_grad():
            for start in range(0, len(ids), 32):
                model(input_ids=ids[start:start + 32])
        hook.remove()
        scores = torch.cat(captured).float().sigmoid()
        before = loads(scores, router.e_score_correction_bias, m.moe_router_topk, m.n_group, m.topk_group)
        bias = balance(scores, m.moe_router_topk, m.n_group, m.topk_group)
        router.e_score_correction_bias.copy_(bias)  # the next layer's inputs route with it
        after = loads(scores, bias, m.moe_router_topk, m.n_group, m.topk_group)
        report["layers"][layer] = {"bias": [round(float(b), 5) for b in bias],
                                   "load_before": [round(float(x), 3) for x in before],
                                   "load_after": [round(float(x), 3) for x in after]}
    with atomic_dir(out, overwrite=True) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.suffix != ".safetensors":
                shutil.copy2(f, tmp / f.name)
        for f in src.glob("*.safetensors"):
            tensors = load_file(str(f))
            for name in tensors:
                if name.endswith("mlp.gate.e_score_correction_bias"):
                    tensors[name] = routers[int(name.split(".")[2])].e_score_correction_bias.detach().clone()
            save_file(tensors, str(tmp / f.name), metadata={"format": "pt"})
        (tmp / "expert_bias.json").write_text(json.dumps(report, indent=2) + "\n")
    return out
