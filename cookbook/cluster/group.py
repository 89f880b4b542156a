"""The trainer group: one Ray actor per trainer rank, placed on the placement group's trainer bundles, called
together (every call is collective over torch.distributed, so every rank must get it)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cookbook.cluster.placement import Placement, actor_options
from cookbook.config import CookbookConfig


@dataclass
class TrainerGroup:
    actors: list[Any]

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` on every rank at once; rank 0's result (the ranks agree on what they return)."""
        import ray

        return ray.get([getattr(a, method).remote(*args, **kwargs) for a in self.actors])[0]

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def start_trainer_group(cfg: CookbookConfig, plan: Placement, pg: Any, mcore_dir: str, pad_id: int) -> TrainerGroup:
    """Start ``trainer_world_size(cfg)`` ranks; rank 0's node and a free port there make the group's address."""
    import ray

    from cookbook.grpo.trainer import TrainerRank
    from cookbook.logs import logged

    world = len(plan.trainer_bundles)
    actors = [ray.remote(logged(TrainerRank, cfg.run_dir, f"trainer-{rank}")).options(
        **actor_options(plan, pg, "trainer", rank)).remote(cfg, rank, world) for rank in range(world)]
    addr, port = ray.get(actors[0].address.remote())
    group = TrainerGroup(actors)
    group.call("setup", addr, port, mcore_dir, pad_id)
    return group
