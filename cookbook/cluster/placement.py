"""Where the trainer and rollout actors run: Ray placement from the parallel config.

Colocated (the reference's choice): every GPU bundle hosts one trainer rank and one rollout worker,
each taking half a GPU, and the phases take turns (weights/optimizer offloaded in between on GPU).
Split: the first GPUs train, the rest generate. On CPU each trainer rank and the rollout engine get one
(logical) CPU each: the same code path, ``world + 1`` processes.

Over several nodes (``parallel.num_nodes > 1``) every bundle is pinned to a node by Ray's ``ray.io/node-id``
label, so where each rank runs follows from the layout rather than from the scheduler's packing: on GPUs bundle
b on node b // gpus_per_node (tensor-parallel neighbours share a node); on CPU the trainer ranks in equal blocks
over the nodes (every node gets one) and the rollout engine on node 0, beside the driver.
"""
from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import dataclass
from typing import Any, Optional

from cookbook.config import ConfigError, CookbookConfig

NODE_ID_LABEL = "ray.io/node-id"  # a label Ray gives every node


@dataclass(frozen=True)
class Placement:
    """Ray resource requests for each role; ``bundles`` make one placement group."""

    bundles: list[dict[str, float]]
    trainer_bundles: list[int]
    rollout_bundles: list[int]
    trainer_resources: dict[str, float]
    rollout_resources: dict[str, float]
    strategy: str
    bundle_nodes: list[int]  # the node index (0 = the head, the driver's node) of each bundle; empty on one node


def plan_placement(cfg: CookbookConfig, cpus_per_actor: int = 1) -> Placement:
    """Resource plan for ``cfg.parallel`` (pure: no Ray calls, so it is testable anywhere)."""
    p = cfg.parallel
    world = cfg.world_size
    spread = p.num_nodes > 1
    if p.gpus_per_node == 0:
        bundles = [{"CPU": float(cpus_per_actor)} for _ in range(world + 1)]
        nodes = [rank * p.num_nodes // world for rank in range(world)] + [0] if spread else []
        return Placement(bundles, list(range(world)), [world], {"num_cpus": cpus_per_actor},
                         {"num_cpus": cpus_per_actor}, "PACK", nodes)
    bundles = [{"GPU": 1.0, "CPU": float(cpus_per_actor)} for _ in range(world)]
    nodes = [b // p.gpus_per_node for b in range(world)] if spread else []
    if p.colocate:
        share = {"num_gpus": 0.5, "num_cpus": cpus_per_actor / 2}
        return Placement(bundles, list(range(world)), list(range(world)), share, share, "PACK", nodes)
    rollout = p.rollout_tensor * max(1, world // (2 * p.rollout_tensor))
    train = world - rollout
    whole = {"num_gpus": 1.0, "num_cpus": cpus_per_actor}
    return Placement(bundles, list(range(train)), list(range(train, world)), whole, whole, "PACK", nodes)


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


def cluster_nodes(cfg: CookbookConfig) -> list[dict[str, Any]]:
    """The Ray cluster's alive nodes, head first, then by rank (``cookbook launch`` names them node-<rank>);
    ConfigError when there are fewer than ``parallel.num_nodes``."""
    import ray

    def order(node: dict[str, Any]) -> tuple:
        rank = re.fullmatch(r"node-(\d+)", node.get("NodeName", ""))
        head = "node:__internal_head__" in node["Resources"]
        return not head, int(rank.group(1)) if rank else math.inf, node["NodeID"]

    nodes = sorted((n for n in ray.nodes() if n["Alive"]), key=order)
    if len(nodes) < cfg.parallel.num_nodes:
        raise ConfigError(
            f"parallel.num_nodes={cfg.parallel.num_nodes} but the Ray cluster has {len(nodes)} node(s): start the job "
            "with `cookbook launch` on every node (README, \"Multi-node jobs\"), or set parallel.num_nodes="
            f"{len(nodes)}")
    return nodes


def node_label(node: dict[str, Any]) -> str:
    address = node["NodeManagerAddress"]
    return f"{node.get('NodeName') or address} ({address}, id {node['NodeID'][:8]})"


def create_placement_group(plan: Placement, cfg: CookbookConfig) -> tuple[Any, list[str]]:
    """The placement group, and where each bundle runs (one label per bundle, for the log and errors)."""
    import ray
    from ray.util.placement_group import placement_group, placement_group_table

    selectors = None
    if plan.bundle_nodes:
        nodes = cluster_nodes(cfg)
        selectors = [{NODE_ID_LABEL: nodes[i]["NodeID"]} for i in plan.bundle_nodes]
    pg = placement_group(plan.bundles, strategy=plan.strategy, bundle_label_selector=selectors)
    ray.get(pg.ready(), timeout=300)
    by_id = {n["NodeID"]: node_label(n) for n in ray.nodes()}
    placed = placement_group_table(pg)["bundles_to_node_id"]
    return pg, [by_id.get(placed.get(b, ""), "?") for b in range(len(plan.bundles))]


def actor_options(plan: Placement, pg: Any, role: str, index: int) -> dict[str, Any]:
    """``.options(...)`` for the ``index``-th actor of ``role`` (trainer | rollout)."""
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundles = plan.trainer_bundles if role == "trainer" else plan.rollout_bundles
    resources = plan.trainer_resources if role == "trainer" else plan.rollout_resources
    strategy = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundles[index])
    return {**resources, "scheduling_strategy": strategy}
