"""Start the trainer and rollout workers as Ray actors placed by cookbook.cluster."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cookbook.cluster.placement import actor_options, create_placement_group, init_ray, plan_placement
from cookbook.config import CookbookConfig


@dataclass
class Workers:
    trainer: Any
    rollout: Any
    placement_group: Any

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for actor in (self.rollout, self.trainer):
            try:
                ray.get(actor.shutdown.remote(), timeout=60)
            except Exception:  # an actor that already died has nothing to release
                pass
            ray.kill(actor)
        remove_placement_group(self.placement_group)
        ray.shutdown()  # a local Ray started by init_ray goes with the run; a cluster connection is just closed


def start_workers(cfg: CookbookConfig) -> Workers:
    """One trainer and one rollout actor (CPU), placed as the parallel config says.

    Multi-rank trainer groups (TP/PP/EP > 1 on GPUs) use the same actor class with a rank each; the
    tiny preset needs one of each.
    """
    import ray

    from cookbook.grpo.policy import PolicyTrainer
    from cookbook.models.tiny import resolve_hf_dir
    from cookbook.rollout.engine import RolloutWorker

    init_ray(cfg)
    hf_dir = str(resolve_hf_dir(cfg))
    plan = plan_placement(cfg)
    pg = create_placement_group(plan)
    trainer = ray.remote(logged(PolicyTrainer, cfg.run_dir, "trainer")).options(
        **actor_options(plan, pg, "trainer", 0)).remote(cfg, hf_dir)
    rollout = ray.remote(logged(RolloutWorker, cfg.run_dir, "rollout")).options(
        **actor_options(plan, pg, "rollout", 0)).remote(hf_dir, cfg)
    ray.get([trainer.ready.remote(), rollout.ready.remote()])
    return Workers(trainer, rollout, pg)


def logged(cls: type, run_dir: Path, name: str) -> type:
    """``cls`` for a Ray actor whose process output goes to ``<run>/logs/<name>.log`` from its first line."""

    class Logged(cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args, **kwargs):
            from cookbook.logs import redirect_process_output

            redirect_process_output(run_dir, name)
            super().__init__(*args, **kwargs)

    Logged.__name__ = Logged.__qualname__ = cls.__name__
    return Logged
