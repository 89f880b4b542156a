"""Run as N gloo processes: build the tiny model under a layout (``key=value`` overrides) and print what every rank
holds: its pipeline stage, its parameter elements by part of the model (the fit planner's parts) and its buffers'.
Rank 0 prints one line ``RESULT <json>`` with a list indexed by rank."""
import json
import os
import sys

import torch
import torch.distributed as dist


def main(overrides: list[str]) -> None:
    from megatron.core import parallel_state as ps

    from cookbook.config import load_config
    from cookbook.megatron.model import build_model, init_parallel
    from cookbook.plan.params import part_of

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    cfg = load_config("tiny", overrides)
    init_parallel(cfg, rank=rank, world_size=world)
    model = build_model(cfg)
    parts: dict[str, int] = {}
    for name, param in model.named_parameters():
        parts[part_of(name)] = parts.get(part_of(name), 0) + param.numel()
    buffers = sum(b.numel() for n, b in model.named_buffers() if n.endswith("expert_bias"))
    mine = {"stage": ps.get_pipeline_model_parallel_rank(), "parts": parts, "buffers": buffers}
    everyone = [None] * world
    dist.all_gather_object(everyone, mine)
    if rank == 0:
        print("RESULT " + json.dumps(everyone), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
