"""The prompt stream: shuffled epochs under a seed, with a position that checkpoints save and restore."""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np


class PromptStream:
    """Yield batches of records; epoch ``e`` is a permutation drawn from ``seed + e``.

    The state is two integers, so resuming from a checkpoint replays exactly the prompts an
    uninterrupted run would have seen.
    """

    def __init__(self, records: list[dict[str, Any]], batch_size: int, seed: int):
        if not records:
            raise ValueError("the training split is empty: run notebook 10 (cookbook data) first")
        if batch_size > len(records):
            raise ValueError(f"grpo.prompts_per_step={batch_size} exceeds the {len(records)} training prompts")
        self.records, self.batch_size, self.seed = records, batch_size, seed
        self.epoch, self.offset = 0, 0
        self._order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.RandomState(self.seed + self.epoch).permutation(len(self.records))

    def next_batch(self) -> list[dict[str, Any]]:
        if self.offset + self.batch_size > len(self.records):  # drop the ragged tail of an epoch
            self.epoch, self.offset = self.epoch + 1, 0
            self._order = self._permutation()
        idx = self._order[self.offset:self.offset + self.batch_size]
        self.offset += self.batch_size
        return [self.records[i] for i in idx]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])
        self._order = self._permutation()


def step_seed(seed: int, step: int, salt: str = "rollout") -> int:
    """A sampling seed per step that does not depend on process state, so a resumed run replays it."""
    digest = hashlib.sha256(f"{seed}:{step}:{salt}".encode()).digest()
    return int.from_bytes(digest[:4], "little")
