"""The node-level environment of a batch job, read and checked before any work starts.

PAI-DLC and Kubeflow's PyTorchJob (and ChatLearn, which runs on them) describe a job by nodes, not processes:
``WORLD_SIZE`` = number of nodes, ``RANK`` = this node's index (0 = the master), ``MASTER_ADDR`` /
``MASTER_PORT`` = where node 0 listens. ``cookbook launch`` reads them here; everything else sees only what
the launcher passes on (``strip_job_env``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping

from cookbook.config import ConfigError, CookbookConfig

JOB_KEYS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# torchrun's per-process variables: in a node-level job they would describe the node, never a process
PROCESS_KEYS = ("LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "NODE_RANK")
SET_BY = ("PAI-DLC and PyTorchJob set them on every node; to try a job on one machine, start one process per node "
          "with e.g. RANK=0 (then 1) WORLD_SIZE=2 MASTER_ADDR=127.0.0.1 MASTER_PORT=<a free port>")


@dataclass(frozen=True)
class JobEnv:
    rank: int
    world_size: int
    master_addr: str = ""
    master_port: int = 0

    @property
    def multi_node(self) -> bool:
        return self.world_size > 1

    @property
    def head_address(self) -> str:
        return f"{self.master_addr}:{self.master_port}"


def _int(environ: Mapping[str, str], key: str) -> int:
    raw = environ[key].strip()
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{key}={raw!r} is not an integer ({SET_BY})") from None


def job_env(environ: Mapping[str, str] = os.environ) -> JobEnv:
    """This node's place in the job. ``WORLD_SIZE`` unset or 1 is a single node (nothing else is needed);
    above 1 every variable must be present and sensible, else ConfigError naming each missing or bad one."""
    if not environ.get("WORLD_SIZE", "").strip():
        return JobEnv(0, 1)
    world = _int(environ, "WORLD_SIZE")
    if world < 1:
        raise ConfigError(f"WORLD_SIZE={world}: the number of nodes must be >= 1 ({SET_BY})")
    if world == 1:
        return JobEnv(0, 1)
    missing = [k for k in JOB_KEYS if not environ.get(k, "").strip()]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} (a multi-node job) but {', '.join(missing)} "
                          f"{'is' if len(missing) == 1 else 'are'} not set: every node needs RANK (this node, 0 to "
                          f"{world - 1}), MASTER_ADDR and MASTER_PORT (where node 0 starts the Ray head). {SET_BY}")
    rank, port = _int(environ, "RANK"), _int(environ, "MASTER_PORT")
    if not 0 <= rank < world:
        raise ConfigError(f"RANK={rank} is outside 0..{world - 1} for WORLD_SIZE={world} (RANK is this node's "
                          "index, WORLD_SIZE the number of nodes)")
    if not 0 < port < 65536:
        raise ConfigError(f"MASTER_PORT={port} is not a TCP port (1-65535)")
    return JobEnv(rank, world, environ["MASTER_ADDR"].strip(), port)


def check_node_count(cfg: CookbookConfig, job: JobEnv) -> None:
    """The layout must be planned for the job's nodes: ``parallel.num_nodes`` = ``WORLD_SIZE``."""
    nodes = cfg.parallel.num_nodes
    if nodes == job.world_size:
        return
    raise ConfigError(
        f"the job has WORLD_SIZE={job.world_size} node(s) but parallel.num_nodes={nodes} (preset "
        f"'{cfg.preset}'): set parallel.num_nodes={job.world_size} (in the notebook's overrides, e.g. "
        f"-p overrides '{{parallel.num_nodes: {job.world_size}}}') if the layout fits that many nodes, or submit "
        f"the job with {nodes} node(s)")


def strip_job_env(environ: Mapping[str, str]) -> dict[str, str]:
    """``environ`` without the job's node-level variables, for Ray's processes and the driver's kernel: there
    torch.distributed, vLLM and the conversion would read ``RANK`` / ``WORLD_SIZE`` as process ranks."""
    return {k: v for k, v in environ.items() if k not in JOB_KEYS + PROCESS_KEYS}
