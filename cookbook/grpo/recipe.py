"""What notebook 30 shows around the loop: the recipe in effect, the inputs it starts from, the results."""
from __future__ import annotations

import os

from cookbook.analysis.metrics import read_metrics
from cookbook.config import CookbookConfig
from cookbook.grpo.checkpoint import resume_point
from cookbook.rundir import mcore_dir

RECIPE_KEYS = (
    "grpo.steps", "grpo.lr", "grpo.prompts_per_step", "grpo.samples_per_prompt", "grpo.num_minibatches",
    "grpo.max_prompt_length", "grpo.max_response_length", "grpo.clip_low", "grpo.clip_high",
    "grpo.logratio_clamp", "grpo.loss_cap", "grpo.loss_aggregation", "grpo.advantage", "grpo.kl_coef",
    "grpo.policy_loss", "grpo.importance_correction", "grpo.importance_cap", "grpo.importance_low",
    "grpo.importance_high", "grpo.reward_mode", "grpo.temperature", "grpo.eval_temperature", "grpo.eval_every",
    "grpo.eval_pass_k", "data.validation_size",
    "moe.router_load_balancing_type", "moe.aux_loss_coeff", "moe.router_enable_expert_bias",
    "moe.router_bias_update_rate", "parallel.tensor", "parallel.pipeline", "parallel.context", "parallel.expert",
    "parallel.rollout_tensor", "parallel.colocate", "model.params_dtype",
)


def recipe_table(cfg: CookbookConfig):
    """The settings that define the recipe, one row each."""
    import pandas as pd

    rows = []
    for key in RECIPE_KEYS:
        section, name = key.split(".")
        rows.append({"key": key, "value": getattr(getattr(cfg, section), name)})
    return pd.DataFrame(rows).set_index("key")


def check_inputs(cfg: CookbookConfig):
    """The data (prepared when missing), the policy's HF and Megatron checkpoints, and any checkpoint to
    resume from, as a table; stops with a clear error when something cannot be found or made."""
    import pandas as pd

    from cookbook.data.prepare import prepare_data
    from cookbook.models.tiny import resolve_hf_dir

    data = prepare_data(cfg)
    hf_dir = resolve_hf_dir(cfg)
    mcore = mcore_dir(cfg)
    resume = resume_point(cfg.run_dir)
    rows = [
        {"input": "data", "where": str(data.out_dir), "state": f"{data.counts['train']} train / {data.counts['test']} test"},
        {"input": "policy (HF)", "where": str(hf_dir), "state": "ok"},
        {"input": "policy (Megatron-Core)", "where": str(mcore),
         "state": "ready (converted by notebook 20 or 31)" if mcore.is_dir() else "missing: converted when training starts"},
        {"input": "resume from", "where": str(resume.path) if resume.path else "-",
         "state": f"step {resume.step}" if resume.path else "fresh start"},
    ]
    rows += [{"input": "damaged checkpoint (skipped)", "where": str(path), "state": reason}
             for path, reason in resume.skipped]
    return pd.DataFrame(rows).set_index("input")


DEEPSEEK_V3_PRESETS = ("tiny-deepseek-v3", "deepseek-v3-671b")
# The architecture numbers in which DeepSeek-V3 differs from Moonlight (recipe-facts.md), shown side by side.
ARCHITECTURE_KEYS = ("num_layers", "first_k_dense_replace", "num_experts", "moe_router_topk", "n_group", "topk_group",
                     "routed_scaling_factor", "q_lora_rank", "kv_lora_rank", "rope_scaling_factor",
                     "original_max_position_embeddings", "max_position_embeddings", "params_dtype")


def require_deepseek_v3(cfg: CookbookConfig) -> None:
    """Notebook 31 is the DeepSeek-V3 recipe: stop at once on another preset rather than run Moonlight's model."""
    from cookbook.config import ConfigError

    if cfg.preset not in DEEPSEEK_V3_PRESETS:
        raise ConfigError(f"preset={cfg.preset!r}: notebook 31 runs the DeepSeek-V3 recipe; choose one of "
                          f"{', '.join(DEEPSEEK_V3_PRESETS)} (notebook 30 runs the others)")


def architecture_table(cfg: CookbookConfig, other: str = "moonlight-16b-a3b"):
    """The architecture numbers where DeepSeek-V3 and Moonlight differ: this run's model next to ``other``'s."""
    import pandas as pd

    from cookbook.config import preset_config

    ref = preset_config(other).model
    return pd.DataFrame([{"key": f"model.{k}", cfg.preset: getattr(cfg.model, k), other: getattr(ref, k)}
                         for k in ARCHITECTURE_KEYS]).set_index("key")


EVAL_COLUMNS = {  # metric -> column, in the order shown
    "eval/accuracy": "accuracy (evaluation split)", "test/accuracy": "accuracy (test)",
    "eval/habit_rate": "planted habit (evaluation split)", "eval/pass@1": "pass@1",
}


def summary_tables(run_dir: str | os.PathLike):
    """(the first and last evaluation: accuracy on the evaluation split and on test, the planted habit's rate and
    pass@k where measured, with the run's reward mode; mean seconds per step phase) as DataFrames."""
    import pandas as pd

    from cookbook.config import load_saved_config

    cfg = load_saved_config(run_dir)
    rows = [r for r in read_metrics(run_dir) if "eval/accuracy" in r]
    rows = rows[:1] + rows[-1:] if len(rows) > 1 else rows
    columns = dict(EVAL_COLUMNS)
    if cfg.grpo.eval_pass_k:
        columns[f"eval/pass@{cfg.grpo.eval_pass_k}"] = f"pass@{cfg.grpo.eval_pass_k}"
    present = {k: v for k, v in columns.items() if any(k in r for r in rows)}
    accuracy = pd.DataFrame([{"step": r["step"], **{v: r.get(k) for k, v in present.items()}} for r in rows],
                            columns=["step", *present.values()])  # the columns stand with no evaluation too
    accuracy = accuracy.set_index("step")
    accuracy.columns.name = f"{cfg.grpo.reward_mode} reward"
    rows = read_metrics(run_dir)
    phases = ("rollout", "reward", "offload", "train", "wake", "sync", "eval", "step")
    timing = {p: [r[f"time/{p}"] for r in rows if r.get(f"time/{p}") is not None] for p in phases}
    timing_df = pd.DataFrame([{"phase": p, "mean seconds": sum(v) / len(v), "steps": len(v)}
                              for p, v in timing.items() if v]).set_index("phase")
    return accuracy, timing_df
