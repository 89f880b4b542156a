"""One GRPO step taken apart, for notebook 30: rollout -> reward -> advantages -> update -> sync, each returning a
table to look at. It calls the functions ``cookbook.grpo.loop.train`` calls, on the same workers, so what a
learner sees here is what training does; the step is a throwaway (training starts again from the initial policy
with fresh workers)."""
from __future__ import annotations

from typing import Any

from cookbook.config import CookbookConfig


class OneStep:
    """Start the trainer group and the rollout engine, then walk one step; ``close()`` ends the workers."""

    def __init__(self, cfg: CookbookConfig):
        from cookbook.data.preprocess import read_records
        from cookbook.grpo.loop import data_files
        from cookbook.grpo.prompts import PromptStream
        from cookbook.grpo.workers import start_workers

        self.cfg = cfg
        prompts = PromptStream(read_records(data_files(cfg)[0]), cfg.grpo.prompts_per_step, cfg.seed)
        self.prompts = prompts.next_batch()  # the first step's prompts, as training draws them
        self.workers = start_workers(cfg)
        self.samples: list[Any] = []

    def rollout(self, prompts: int = 3, per_prompt: int = 3):
        """n samples per prompt from vLLM, scored by the rule reward: a few samples of the first few prompts."""
        import pandas as pd

        from cookbook.grpo.loop import rollout_step

        self.samples, self.rewards, self.rollout_metrics = rollout_step(self.workers.rollout, self.prompts, self.cfg,
                                                                        step=1)
        n = self.cfg.grpo.samples_per_prompt
        shown = [i * n + j for i in range(min(prompts, len(self.prompts))) for j in range(min(per_prompt, n))]
        rows = [{"prompt": self.prompts[s.prompt_index]["prompt"][-1]["content"][:60],
                 "ground truth": self.prompts[s.prompt_index]["reward_model"]["ground_truth"],
                 "response": s.text[:90], "tokens": len(s.response_ids), "reward": float(self.rewards[k])}
                for k, s in ((k, self.samples[k]) for k in shown)]
        return pd.DataFrame(rows)

    def advantages(self):
        """Each prompt's group: its rewards and the advantages GRPO gives them ((r - mean) / (std + eps))."""
        import pandas as pd

        from cookbook.grpo.algorithm import group_advantages

        g = self.cfg.grpo
        self.adv = group_advantages(self.rewards, g.samples_per_prompt, method=g.advantage, eps=g.advantage_eps)
        n = g.samples_per_prompt
        return pd.DataFrame([{"prompt": i, "rewards": " ".join(f"{r:.0f}" for r in self.rewards[i * n:(i + 1) * n]),
                              "advantages": " ".join(f"{a:+.2f}" for a in self.adv[i * n:(i + 1) * n].tolist())}
                             for i in range(len(self.prompts))]).set_index("prompt")

    def update(self):
        """The trainer group's step on this batch: the loss terms, clip fractions, mismatch, routing statistics,
        grad norm."""
        import pandas as pd
        import ray

        from cookbook.grpo.loop import offload_rollout, trainer_batch

        offload_rollout(self.workers.rollout, self.cfg)
        metrics = self.workers.trainer.call("train_step", ray.put(trainer_batch(self.samples, self.adv)), 1)
        keep = ("actor/", "mismatch/", "routing/rollout_vs_trainer", "routing/policy_change")
        return pd.Series({k: v for k, v in metrics.items() if k.startswith(keep)}, name="step 1").to_frame()

    def sync(self):
        """The new weights into vLLM, bucket by bucket: bytes, buckets, seconds."""
        import pandas as pd

        from cookbook.grpo.loop import sync_rollout

        metrics = sync_rollout(self.workers.trainer, self.workers.rollout, self.cfg.parallel.weight_sync_bucket_mb << 20)
        return pd.Series(metrics, name="weight sync").to_frame()

    def close(self) -> None:
        self.workers.shutdown()
