"""The GRPO loop: prompts -> n samples (vLLM) -> rewards -> group advantages -> minibatch updates
(Megatron-Core) -> weight sync, with evaluation, metrics, checkpoints and exact resume.

This module owns the loop and is where the trainer and the generator meet; it talks to them only
through their worker methods: the trainer group's ranks (``cookbook.grpo.trainer``, one Ray actor each, every
call collective) and the rollout engine (``cookbook.rollout.engine``).
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from cookbook.config import OFFLINE_PRESETS, CookbookConfig
from cookbook.data.preprocess import read_records
from cookbook.data.reward import score_batch
from cookbook.grpo import baseline
from cookbook.grpo.algorithm import group_advantages
from cookbook.grpo.checkpoint import check_architecture, resume_point
from cookbook.grpo.prompts import PromptStream, step_seed
from cookbook.grpo.tracking import MetricsTracker
from cookbook.grpo.trainer import trainer_model_config


@dataclass
class TrainResult:
    run_dir: Path
    steps_done: int
    hf_export: Optional[Path]
    history: list[dict[str, Any]]


PASS_K_PROBLEMS = 128  # pass@k is measured on the first this-many evaluation problems (k samples each)


def data_files(cfg: CookbookConfig) -> tuple[Path, Path, Path]:
    """(train, the split evaluated during training, test): validation when ``data.validation_size`` holds one
    out, else test, as the reference evaluates."""
    root = Path(cfg.data.processed_dir) if cfg.data.processed_dir else cfg.run_dir / "data"
    train, test = root / "train.jsonl", root / "test.jsonl"
    during = root / "validation.jsonl" if cfg.data.validation_size else test
    missing = [str(p) for p in (train, during, test) if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"{' / '.join(missing)} not found: run notebook 10_data (or `cookbook data`) for this run first, "
            "or set data.processed_dir to a folder that has them")
    return train, during, test


def evaluate(rollout: Any, records: list[dict[str, Any]], cfg: CookbookConfig, prefix: str = "eval"
             ) -> dict[str, float]:
    """Accuracy and mean response length with the reference's eval sampling (``<prefix>/...``); for the tiny
    preset also how often the answer is the warm-up's planted habit (the right number with its last digit one too
    high), the habit GRPO has to unlearn.

    Every evaluation of a run draws with the same seed, so two evaluations differ by what the policy
    learned, not by the luck of the draw.
    """
    import ray

    g = cfg.grpo
    samples = ray.get(rollout.generate.remote(
        [r["prompt"] for r in records], n=1, temperature=g.eval_temperature, top_p=g.eval_top_p,
        top_k=g.eval_top_k, max_tokens=g.max_response_length, seed=step_seed(cfg.seed, 0, "eval")))
    truths = [records[s.prompt_index]["reward_model"]["ground_truth"] for s in samples]
    scores = score_batch([s.text for s in samples], truths, mode=g.reward_mode)
    metrics = {f"{prefix}/accuracy": float(np.mean([r.score for r in scores])),
               f"{prefix}/response_length": float(np.mean([len(s.response_ids) for s in samples]))}
    if cfg.preset in OFFLINE_PRESETS:  # the warm-up planted the habit (cookbook.models.tiny)
        from cookbook.models.tiny import habit_answer

        habits = score_batch([s.text for s in samples], [habit_answer(t) for t in truths], mode=g.reward_mode)
        metrics[f"{prefix}/habit_rate"] = float(np.mean([r.score for r in habits]))
    return metrics


def pass_at_k(rollout: Any, records: list[dict[str, Any]], cfg: CookbookConfig) -> dict[str, float]:
    """pass@1 and pass@k (k = ``grpo.eval_pass_k`` samples per problem, the rollout's sampling settings) on the
    first ``PASS_K_PROBLEMS`` evaluation problems: what the policy can sample, next to what it answers."""
    import ray

    g = cfg.grpo
    records = records[:PASS_K_PROBLEMS]
    samples = ray.get(rollout.generate.remote(
        [r["prompt"] for r in records], n=g.eval_pass_k, temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
        max_tokens=g.max_response_length, seed=step_seed(cfg.seed, 0, "pass@k")))
    scores = score_batch([s.text for s in samples],
                         [records[s.prompt_index]["reward_model"]["ground_truth"] for s in samples], mode=g.reward_mode)
    per_problem = np.array([r.score for r in scores]).reshape(len(records), g.eval_pass_k)
    return {"eval/pass@1": float(per_problem.mean()), f"eval/pass@{g.eval_pass_k}": float(per_problem.max(1).mean())}


def baseline_fingerprint(cfg: CookbookConfig) -> dict[str, Any]:
    """The fingerprint of this run's step-0 evaluation (``cookbook.grpo.baseline``): its start model and the
    problems it evaluates (the evaluation split, and test when that is another)."""
    from cookbook.models.tiny import resolve_hf_dir

    _, during, test = data_files(cfg)
    return baseline.fingerprint(cfg, resolve_hf_dir(cfg), dict.fromkeys([during, test]))


def evaluate_all(rollout: Any, during: list[dict[str, Any]], test: list[dict[str, Any]], cfg: CookbookConfig,
                 first_or_last: bool) -> dict[str, float]:
    """The periodic evaluation; at the first and the last step also the test split (when evaluations during
    training use a validation split) and pass@k."""
    metrics = evaluate(rollout, during, cfg)
    if first_or_last and during is not test:
        metrics.update(evaluate(rollout, test, cfg, prefix="test"))
    if first_or_last and cfg.grpo.eval_pass_k:
        metrics.update(pass_at_k(rollout, during, cfg))
    return metrics


def trainer_batch(samples: list[Any], advantages: Any) -> dict[str, Any]:
    """What ``TrainerRank.train_step`` takes from a rollout: the token ids, the rollout's log-probs and routed
    experts (per sample ``[positions, MoE layers, top_k]``: routing statistics and replay), the advantages."""
    return {"prompt_ids": [s.prompt_ids for s in samples], "response_ids": [s.response_ids for s in samples],
            "rollout_logp": [s.logprobs for s in samples], "routed_experts": [s.routed_experts for s in samples],
            "advantages": [float(a) for a in advantages]}


LENGTH_QUANTILES = {"min": 0, "p10": 10, "p50": 50, "p90": 90, "max": 100}


def rollout_step(rollout: Any, prompts: list[dict[str, Any]], cfg: CookbookConfig, step: int
                 ) -> tuple[list[Any], np.ndarray, dict[str, float]]:
    """Sample n responses per prompt and score them; returns samples, rewards and reward metrics."""
    import ray

    g = cfg.grpo
    samples = ray.get(rollout.generate.remote(
        [p["prompt"] for p in prompts], n=g.samples_per_prompt, temperature=g.temperature, top_p=g.top_p,
        top_k=g.top_k, max_tokens=g.max_response_length, seed=step_seed(cfg.seed, step), routed_experts=True))
    t0 = time.perf_counter()
    results = score_batch([s.text for s in samples],
                          [prompts[s.prompt_index]["reward_model"]["ground_truth"] for s in samples], mode=g.reward_mode)
    rewards = np.array([r.score for r in results], dtype=np.float32)
    lengths = np.array([len(s.response_ids) for s in samples])
    per_prompt = rewards.reshape(len(prompts), g.samples_per_prompt)
    metrics = {
        "reward/mean": float(rewards.mean()),
        "reward/solve_all": float((per_prompt.min(1) == 1).mean()),
        "reward/solve_none": float((per_prompt.max(1) == 0).mean()),
        "response/length_mean": float(lengths.mean()),
        # the distribution, not only its mean: what sequence packing and the packed attention kernels see
        **{f"response/length_{q}": float(np.percentile(lengths, p)) for q, p in LENGTH_QUANTILES.items()},
        "prompt/length_mean": float(np.mean([len(s.prompt_ids) for s in samples])),
        "response/tokens": int(lengths.sum()),
        "response/clip_ratio": float(np.mean([s.finish_reason == "length" for s in samples])),
        "time/reward": time.perf_counter() - t0,
    }
    return samples, rewards, metrics


def offload_rollout(rollout: Any, cfg: CookbookConfig) -> dict[str, float]:
    """Before training: on a GPU, vLLM (colocated) frees its KV cache and offloads its weights (sleep mode);
    the GPU memory in use before and after, for the log. Nothing to do on CPU."""
    import ray

    metrics = {}
    if cfg.parallel.gpus_per_node:
        metrics["memory/device_after_rollout_gib"] = ray.get(rollout.device_memory_gib.remote())
    metrics["time/offload"] = ray.get(rollout.sleep.remote())
    if cfg.parallel.gpus_per_node:
        metrics["memory/device_after_offload_gib"] = ray.get(rollout.device_memory_gib.remote())
    return metrics


def sync_rollout(trainer: Any, rollout: Any, bucket_bytes: int) -> dict[str, float]:
    """After training: wake vLLM's weights, push the new ones in buckets, then wake its KV cache."""
    import ray

    wake = ray.get(rollout.wake_up.remote(["weights"]))
    t0 = time.perf_counter()
    sync = trainer.call("sync_weights", rollout, bucket_bytes)
    metrics = {"time/sync": time.perf_counter() - t0,
               "time/wake": wake + ray.get(rollout.wake_up.remote(["kv_cache"]))}
    return metrics | {f"sync/{k}": v for k, v in sync.items()}


def export_hf(cfg: CookbookConfig, staging: Path) -> Path:
    """The trained policy's torch_dist save as an HF directory, through notebook 20's exporter."""
    import shutil

    from cookbook.convert.mcore_to_hf import mcore_to_hf
    from cookbook.models.tiny import resolve_hf_dir

    try:
        return mcore_to_hf(cfg, staging, cfg.run_dir / "hf_export", tokenizer_dir=resolve_hf_dir(cfg), overwrite=True,
                           progress=False)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train(cfg: CookbookConfig, progress: bool = True, stop_after: Optional[int] = None,
          on_step: Optional[Callable[[int, dict[str, Any]], None]] = None) -> TrainResult:
    """Run (or resume) GRPO for ``cfg.grpo.steps`` steps in ``cfg.run_dir``.

    ``stop_after`` ends early after that many steps of this call (the notebook's live plots and the
    resume tests use it); ``on_step`` sees each step's metrics.
    """
    import ray
    from tqdm.auto import tqdm

    from cookbook.grpo.workers import start_workers

    g = cfg.grpo
    train_file, during_file, test_file = data_files(cfg)
    train_records = read_records(train_file)
    test_records = read_records(test_file)
    eval_records = read_records(during_file) if during_file != test_file else test_records
    if cfg.data.max_test_examples:
        test_records = test_records[:cfg.data.max_test_examples]
        eval_records = eval_records[:cfg.data.max_test_examples] if during_file != test_file else test_records
    stream = PromptStream(train_records, g.prompts_per_step, cfg.seed)

    resume = resume_point(cfg.run_dir)
    for path, reason in resume.skipped:  # a damaged checkpoint is named and passed over, never loaded
        print(f"resume: skipping damaged checkpoint {path}: {reason}", file=sys.stderr)
    if resume.path is not None:  # a checkpoint of another model stops here, before any work
        check_architecture(resume.path, trainer_model_config(cfg))

    step0 = resume.path is None and g.eval_every > 0  # a fresh run evaluates the model it starts from
    fp = baseline_fingerprint(cfg) if step0 else {}
    record = baseline.reused(cfg, fp) if step0 and g.eval_baseline else None  # refused now, before the workers start
    workers = start_workers(cfg)
    trainer, rollout = workers.trainer, workers.rollout
    bucket_bytes = cfg.parallel.weight_sync_bucket_mb << 20
    start, resumed = 0, {}
    if resume.path is not None:
        start = resume.step
        loop_state = trainer.call("load_checkpoint", str(resume.path))
        stream.load_state_dict(loop_state["prompts"])
        trainer.call("sync_weights", rollout, bucket_bytes)
        resumed = {"resume/from_step": start, "resume/skipped_damaged": len(resume.skipped)}
    # without a checkpoint the run starts afresh: what an interrupted start logged before its first one goes
    tracker = MetricsTracker(cfg, resume_step=start if resume.path is not None else -1)
    history: list[dict[str, Any]] = []
    try:
        if step0:
            record = record or baseline.measured(cfg, fp, evaluate_all(rollout, eval_records, test_records, cfg,
                                                                       first_or_last=True))
            baseline.write_record(cfg, record)
            if "reused_from" in record:
                print(f"step 0: the start model's evaluation measured in {record['measured_in']} (grpo.eval_baseline: "
                      "the same start model, problems and settings)", flush=True)
            metrics = baseline.step0_metrics(record)
            tracker.log(0, metrics)
            history.append({"step": 0, **metrics})
        last = g.steps if stop_after is None else min(g.steps, start + stop_after)
        bar = tqdm(range(start + 1, last + 1), initial=start, total=g.steps, desc="GRPO", disable=not progress)
        for step in bar:
            t_step = time.perf_counter()
            prompts = stream.next_batch()
            t0 = time.perf_counter()
            samples, rewards, metrics = rollout_step(rollout, prompts, cfg, step)
            metrics["time/rollout"] = time.perf_counter() - t0 - metrics["time/reward"]
            metrics["perf/rollout_tokens_per_s"] = metrics["response/tokens"] / metrics["time/rollout"]
            advantages = group_advantages(rewards, g.samples_per_prompt, method=g.advantage, eps=g.advantage_eps)

            metrics.update(offload_rollout(rollout, cfg))
            t0 = time.perf_counter()
            metrics.update(trainer.call("train_step", ray.put(trainer_batch(samples, advantages)), step))
            metrics["time/train"] = time.perf_counter() - t0

            metrics.update(sync_rollout(trainer, rollout, bucket_bytes))
            metrics.update(resumed)
            resumed = {}

            if g.eval_every and (step % g.eval_every == 0 or step == g.steps):
                t0 = time.perf_counter()
                metrics.update(evaluate_all(rollout, eval_records, test_records, cfg, first_or_last=step == g.steps))
                metrics["time/eval"] = time.perf_counter() - t0
            metrics["time/step"] = time.perf_counter() - t_step
            tracker.log(step, metrics)
            history.append({"step": step, **metrics})
            bar.set_postfix(reward=f"{metrics['reward/mean']:.3f}", step_s=f"{metrics['time/step']:.1f}")
            if on_step is not None:
                on_step(step, metrics)
            if (g.save_every and step % g.save_every == 0) or (step == last and (g.final_save or last < g.steps)):
                trainer.call("save_checkpoint", str(cfg.run_dir), step, {"prompts": stream.state_dict()},
                             g.keep_checkpoints)
        done = last
        hf_export = None
        if done == g.steps and g.final_save:
            staging = cfg.run_dir / "hf_export.mcore"
            trainer.call("save_model", str(staging))
    except BaseException as e:
        print(f"training stopped; the libraries' output is in {cfg.run_dir / 'logs'}", file=sys.stderr)
        lost = workers.lost(e)
        if lost is not None:
            raise lost from e
        raise
    finally:
        tracker.close()
        workers.shutdown()
    if done == g.steps and g.final_save:
        hf_export = export_hf(cfg, staging)
    return TrainResult(cfg.run_dir, done, hf_export, history)
