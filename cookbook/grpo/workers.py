"""Start the trainer group and the rollout engine as Ray actors placed by cookbook.cluster."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from cookbook.cluster.group import TrainerGroup, WorkerLost, lost_message, start_trainer_group
from cookbook.cluster.placement import actor_options, create_placement_group, init_ray, plan_placement
from cookbook.config import CookbookConfig


@dataclass
class Workers:
    trainer: TrainerGroup
    rollout: Any
    placement_group: Any
    owns_ray: bool  # Ray was started for this run (else a cluster or a caller's instance is left running)
    rollout_node: str  # where the rollout engine runs, for errors

    def lost(self, error: BaseException) -> Optional[WorkerLost]:
        """``error`` said plainly when it is the rollout engine's death (the trainer group names its own)."""
        from ray.exceptions import RayActorError

        if isinstance(error, RayActorError) and error.actor_id == self.rollout._actor_id.hex():
            return WorkerLost(lost_message("the rollout engine", self.rollout_node, "a rollout call", error))
        return None

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get([self.rollout.shutdown.remote()] + [a.shutdown.remote() for a in self.trainer.actors], timeout=60)
        except Exception:  # an actor that already died has nothing to release
            pass
        ray.kill(self.rollout)
        self.trainer.kill()
        remove_placement_group(self.placement_group)
        if self.owns_ray:
            ray.shutdown()  # a local Ray started for the run goes with it; a cluster connection is just closed


def _convert(cfg: CookbookConfig, hf_dir: str, mcore: str) -> None:
    from cookbook.convert.pipeline import convert

    convert(cfg, "hf_to_mcore", hf_dir, mcore, part=(0, 1), progress=False)


def start_workers(cfg: CookbookConfig) -> Workers:
    """The trainer group (one actor per rank of the layout) and one rollout engine, placed as the parallel
    config says; the policy is converted to Megatron-Core first if notebook 20 has not done it."""
    import ray

    from cookbook.logs import logged
    from cookbook.models.hf_config import read_hf_config
    from cookbook.models.tiny import resolve_hf_dir
    from cookbook.rollout.engine import RolloutWorker
    from cookbook.rundir import mcore_dir

    owns_ray = not ray.is_initialized()
    init_ray(cfg)
    hf_dir = str(resolve_hf_dir(cfg))
    mcore = str(mcore_dir(cfg))
    if not Path(mcore).is_dir():  # notebook 20 has not converted the policy: convert it in a process of its own
        ray.get(ray.remote(num_cpus=1)(_convert).remote(cfg, hf_dir, mcore))
    plan = plan_placement(cfg)
    pg, where = create_placement_group(plan, cfg)
    ranks = [where[b] for b in plan.trainer_bundles]
    rollout_node = where[plan.rollout_bundles[0]]
    if cfg.parallel.num_nodes > 1:  # which node each actor runs on, for the reader of the notebook
        print("placement: " + "; ".join(f"trainer rank {r} on {n}" for r, n in enumerate(ranks))
              + f"; rollout on {rollout_node}", flush=True)
    rollout = ray.remote(logged(RolloutWorker, cfg.run_dir, "rollout")).options(
        **actor_options(plan, pg, "rollout", 0)).remote(hf_dir, cfg)
    if cfg.parallel.gpus_per_node:  # vLLM sizes its memory from what is free: let it start before the trainer
        ray.get(rollout.ready.remote())
    pad_id = int(read_hf_config(hf_dir).get("pad_token_id") or 0)
    trainer = start_trainer_group(cfg, plan, pg, mcore, pad_id, ranks)
    ray.get(rollout.ready.remote())
    return Workers(trainer, rollout, pg, owns_ray, rollout_node)
