"""Shared by the GPU tests: the tiny preset on one GPU with a random tiny HF checkpoint."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parents[1]))
from helpers import make_random_tiny_hf  # noqa: E402

PROMPTS = [[{"role": "user", "content": f"What is {i} + {2 * i}?"}] for i in range(8)]


def gpu_config(tmp_path, *overrides):
    from cookbook.config import load_config

    hf = make_random_tiny_hf(tmp_path / "hf")
    return load_config("tiny", [f"model.hf_dir={hf}", "parallel.gpus_per_node=1", "logging.wandb_mode=disabled",
                                "parallel.rollout_gpu_memory_utilization=0.3", *overrides],
                       values={"runs_dir": str(tmp_path / "runs"), "run_name": "gpu"})
