"""Will it fit? GPU and host memory of a layout for what this project's code does, and the smallest layouts
that fit on 80 GB and 141 GB GPUs (``cookbook plan``; notebooks 30 and 31 call ``fit_summary`` / ``fit_table``).

- ``params``: parameters counted from the architecture (the HF <-> Megatron name table) and split per rank;
- ``activations``: what a training forward keeps for its backward, per micro-batch, under the recompute setting;
- ``memory``: each phase's GPU memory (trainer state, transients, allocator cache, vLLM), KV cache, host memory;
- ``search``: the layouts config validation accepts on 1, 2, 4, 8, 16, ... GPUs, smallest first;
- ``report``: the table, the verdict and the text.

It imports no training or generation engine: a plan for 128 GPUs takes seconds on a laptop.
"""
from cookbook.plan.memory import GPUS, GPU, Plan, plan_gpu, trainer_peak
from cookbook.plan.report import check_layout, cluster_layout, fit_summary, fit_table, plan_text, plans, stage_table
from cookbook.plan.search import layout_label, smallest_fits

__all__ = ["GPUS", "GPU", "Plan", "plan_gpu", "trainer_peak", "check_layout", "cluster_layout", "fit_summary", "fit_table", "plan_text",
           "plans", "stage_table", "layout_label", "smallest_fits"]
