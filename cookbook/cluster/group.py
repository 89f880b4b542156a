"""The trainer group: one Ray actor per trainer rank, placed on the placement group's trainer bundles, called
together (every call is collective over torch.distributed, so every rank must get it)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

from cookbook.cluster.placement import Placement, actor_options
from cookbook.config import CookbookConfig

DEATH_GRACE_S = 30.0  # how long a failed call waits to learn whether a rank was lost (Ray says within seconds)


class WorkerLost(RuntimeError):
    """A trainer rank or the rollout engine is gone (its process or its node was lost): the run cannot go on."""


def lost_message(role: str, node: str, method: str, died: BaseException) -> str:
    reason = " ".join(line.strip() for line in str(died).strip().splitlines())
    return (f"{role} on {node} was lost during {method} (Ray: {reason[:600]}). Its process or its node is gone, so "
            "the run stopped; checkpoints are written whole or not at all, so launching it again with the same run "
            "name resumes from the newest one")


@dataclass
class TrainerGroup:
    actors: list[Any]
    nodes: list[str]  # where each rank runs, for the log and for errors

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """Run ``method`` on every rank at once; rank 0's result (the ranks agree on what they return). A rank
        that was lost is named (WorkerLost) even when another rank's error, e.g. a collective broken by the loss,
        arrived first."""
        import ray

        refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        try:
            return ray.get(refs)[0]
        except ray.exceptions.RayError:
            dead = self._dead_rank(refs)
            if dead is None:
                raise
            rank, died = dead
            raise WorkerLost(lost_message(f"trainer rank {rank}", self.nodes[rank], method, died)) from died

    @staticmethod
    def _dead_rank(refs: list[Any], grace: float = DEATH_GRACE_S) -> Optional[tuple[int, BaseException]]:
        """The first rank whose actor died or became unreachable, as Ray reports it within ``grace`` seconds;
        None if none did."""
        import ray

        deadline = time.monotonic() + grace
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            try:
                ray.get(ready[0])
            except ray.exceptions.RayActorError as e:
                return refs.index(ready[0]), e
            except ray.exceptions.RayError:
                pass
        return None

    def kill(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)


def start_trainer_group(cfg: CookbookConfig, plan: Placement, pg: Any, mcore_dir: str, pad_id: int,
                        nodes: list[str]) -> TrainerGroup:
    """Start ``trainer_world_size(cfg)`` ranks; rank 0's node and a free port there make the group's address.
    ``nodes``: where each rank's bundle was placed."""
    import ray

    from cookbook.grpo.trainer import TrainerRank
    from cookbook.logs import logged

    world = len(plan.trainer_bundles)
    actors = [ray.remote(logged(TrainerRank, cfg.run_dir, f"trainer-{rank}")).options(
        **actor_options(plan, pg, "trainer", rank)).remote(cfg, rank, world) for rank in range(world)]
    addr, port = ray.get(actors[0].address.remote())
    group = TrainerGroup(actors, nodes)
    group.call("setup", addr, port, mcore_dir, pad_id)
    return group
