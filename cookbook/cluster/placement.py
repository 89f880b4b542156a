"""Where the trainer and rollout actors run: Ray placement from the parallel config.

Colocated (the reference's choice): every GPU bundle hosts one trainer rank and one rollout worker,
each taking half a GPU, and the phases take turns (weights/optimizer offloaded in between on GPU).
Split: the first GPUs train, the rest generate. On CPU each trainer rank and the rollout engine get one
(logical) CPU each: the same code path, ``world + 1`` processes.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

from cookbook.config import CookbookConfig


@dataclass(frozen=True)
class Placement:
    """Ray resource requests for each role; ``bundles`` make one placement group."""

    bundles: list[dict[str, float]]
    trainer_bundles: list[int]
    rollout_bundles: list[int]
    trainer_resources: dict[str, float]
    rollout_resources: dict[str, float]
    strategy: str


def plan_placement(cfg: CookbookConfig, cpus_per_actor: int = 1) -> Placement:
    """Resource plan for ``cfg.parallel`` (pure: no Ray calls, so it is testable anywhere)."""
    p = cfg.parallel
    world = cfg.world_size
    if p.gpus_per_node == 0:
        bundles = [{"CPU": float(cpus_per_actor)} for _ in range(world + 1)]
        return Placement(bundles, list(range(world)), [world], {"num_cpus": cpus_per_actor},
                         {"num_cpus": cpus_per_actor}, "PACK")
    bundles = [{"GPU": 1.0, "CPU": float(cpus_per_actor)} for _ in range(world)]
    if p.colocate:
        share = {"num_gpus": 0.5, "num_cpus": cpus_per_actor / 2}
        return Placement(bundles, list(range(world)), list(range(world)), share, share, "PACK")
    rollout = p.rollout_tensor * max(1, world // (2 * p.rollout_tensor))
    train = world - rollout
    whole = {"num_gpus": 1.0, "num_cpus": cpus_per_actor}
    return Placement(bundles, list(range(train)), list(range(train, world)), whole, whole, "PACK")


def init_ray(cfg: CookbookConfig, address: Optional[str] = None) -> Any:
    """Join the cluster at ``address``/``RAY_ADDRESS`` (multi-node), or start a local Ray instance."""
    import ray

    from cookbook.logs import quiet_libraries

    if ray.is_initialized():
        return ray
    address = address or os.environ.get("RAY_ADDRESS")
    env = {"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}}
    # The actors write their own logs into the run folder (cookbook.logs), and so does the driver's Ray logger:
    # without its own handlers during init (configure_logging=False clears them) it passes records to the root.
    quiet = {"log_to_driver": False, "configure_logging": False}
    quiet_libraries(cfg.run_dir)
    logging.getLogger("ray").propagate = True
    if address:
        ray.init(address=address, runtime_env=env, **quiet)
    else:
        cpus = max(os.cpu_count() or 2, cfg.world_size + 1) if cfg.parallel.gpus_per_node == 0 else None
        ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=env, **quiet,
                 object_store_memory=512 * 2**20 if cfg.parallel.gpus_per_node == 0 else None)
    quiet_libraries(cfg.run_dir)
    return ray


def create_placement_group(plan: Placement) -> Any:
    import ray
    from ray.util.placement_group import placement_group

    pg = placement_group(plan.bundles, strategy=plan.strategy)
    ray.get(pg.ready(), timeout=300)
    return pg


def actor_options(plan: Placement, pg: Any, role: str, index: int) -> dict[str, Any]:
    """``.options(...)`` for the ``index``-th actor of ``role`` (trainer | rollout)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = plan.trainer_bundles if role == "trainer" else plan.rollout_bundles
    resources = plan.trainer_resources if role == "trainer" else plan.rollout_resources
    strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundles[index])
    return {**resources, "scheduling_strategy": strategy}
