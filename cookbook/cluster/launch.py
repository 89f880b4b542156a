"""``cookbook launch``: the same command on every node of a batch job (PAI-DLC, PyTorchJob), one papermill
process per node, as the job's ``RANK`` / ``WORLD_SIZE`` / ``MASTER_ADDR`` / ``MASTER_PORT`` say.

- A single node (``WORLD_SIZE`` unset or 1) runs the notebook as ``cookbook run`` does.
- Notebooks that split their own work by node (``PER_NODE_NOTEBOOKS``: the conversion) run on every node with
  the job's variables; node 0 finalizes. No Ray. The executed copy of node k > 0 goes to ``notebooks/node-k/``.
- Every other notebook drives Ray from node 0: node 0 starts the Ray head on ``MASTER_ADDR:MASTER_PORT``, waits
  for all nodes, executes the notebook with ``RAY_ADDRESS`` pointing at the head, and writes its exit status into
  the head's key-value store. The other nodes join as Ray workers, log their resources, wait for that status and
  exit with it. The status travels through Ray rather than a file in the run folder because it must reach nodes
  that share no storage, and because a head that vanishes without one is then seen as such (the key store goes
  with it) instead of as a notebook still running.

Each node writes ``<run>/logs/node-<rank>.log`` (its own lines, ``ray start``'s output, the kernel's streams);
the run folder is meant to be on storage all nodes share, as the conversion's parts already require.
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterator, Optional

from cookbook.cluster.jobenv import JobEnv, check_node_count, job_env
from cookbook.cluster.raynode import (LaunchError, RayNode, connect, describe, put_status, ray_env, wait_for_acks,
                                      wait_for_nodes, wait_for_own_node, wait_for_status)
from cookbook.config import ConfigError
from cookbook.runner import PreparedRun, environ, execute, load_params_file, prepare_run

PER_NODE_NOTEBOOKS = ("20_convert",)
CPU_OBJECT_STORE_BYTES = 512 * 2**20  # as cookbook.cluster.placement.init_ray gives a local CPU instance


class NodeLog:
    """This node's log: its own lines (also printed), ``ray start``'s output and the kernel's streams."""

    def __init__(self, path: Path, rank: int):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.rank = rank
        self.file = open(path, "a", buffering=1)

    def say(self, message: str) -> None:
        line = f"{time.strftime('%H:%M:%S')} [node {self.rank}] {message}"
        print(line, flush=True)
        self.file.write(line + "\n")

    def close(self) -> None:
        self.file.close()


def _given_run_name(run_name: str, parameters: dict[str, Any], params_file: Optional[str]) -> str:
    return run_name or parameters.get("run_name") or (
        load_params_file(params_file).get("run_name", "") if params_file else "")


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """SIGTERM (a stopped job) raises SystemExit, so the ``finally`` blocks stop this node's Ray processes."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _object_store(run: PreparedRun) -> Optional[int]:
    """Ray's object store on a CPU node is sized as a local CPU instance's; on GPU nodes Ray's default."""
    return CPU_OBJECT_STORE_BYTES if run.cfg.parallel.gpus_per_node == 0 else None


def _execute(run: PreparedRun, job: JobEnv, log: NodeLog, progress: bool) -> tuple[int, str]:
    """Run the notebook here; (exit code, error line)."""
    out_dir = run.cfg.run_dir / "notebooks" / f"node-{job.rank}" if job.rank else None
    log.say(f"executing {run.notebook.name} into {(out_dir or run.cfg.run_dir / 'notebooks')}")
    try:
        output = execute(run, out_dir, progress=progress, log=log.file)
    except Exception as e:  # noqa: BLE001 -- reported as this node's status
        import papermill

        error = f"{e.ename}: {e.evalue}" if isinstance(e, papermill.PapermillExecutionError) else \
            f"{type(e).__name__}: {e}"
        log.say(f"notebook {run.notebook.name} failed: {error}")
        return 1, f"{run.notebook.name} failed on node {job.rank}: {error}"
    log.say(f"executed notebook: {output}")
    return 0, ""


def _drive(run: PreparedRun, job: JobEnv, log: NodeLog, timeout: float, progress: bool) -> int:
    """Node 0 of a Ray notebook: head, all nodes, the notebook, then its status for the others."""
    log.say(f"starting the Ray head on {job.head_address}")
    head = RayNode(job, log.file, log.say, _object_store(run))
    client, code, error = None, 1, "node 0 stopped before its notebook ended"
    try:
        client = connect(job, timeout, log.say, head=head)
        log.say(f"waiting for {job.world_size} nodes (up to {timeout:.0f} s)")
        for node in wait_for_nodes(client, job, timeout, log.say):
            log.say(f"  {describe(node)}")
        with environ(dict(ray_env(dict(os.environ)), RAY_ADDRESS=job.head_address)):
            code, error = _execute(run, job, log, progress)
    except LaunchError as e:
        error = f"node 0 stopped: {e}"
        raise
    finally:
        if client is not None:
            with contextlib.suppress(Exception):  # best effort: tell the waiting nodes, then let them read it
                put_status(client, code, error)
                late = wait_for_acks(client, job)
                if late:
                    log.say(f"nodes {', '.join(map(str, late))} did not confirm node 0's status")
        log.say("stopping the Ray head")
        head.stop()
    if code:
        raise LaunchError(error)
    return 0


def _join(run: PreparedRun, job: JobEnv, log: NodeLog, timeout: float) -> int:
    """Node k > 0 of a Ray notebook: join the head, report this node, exit with node 0's status."""
    log.say(f"joining the Ray head at {job.head_address} (up to {timeout:.0f} s)")
    client = connect(job, timeout, log.say)
    worker = RayNode(job, log.file, log.say, _object_store(run))
    try:
        log.say(f"joined: {describe(wait_for_own_node(client, job, worker, timeout))}")
        log.say(f"waiting for node 0's notebook {run.notebook.name} to end")
        status = wait_for_status(client, job, worker, log.say)
    finally:
        log.say("stopping this node's Ray worker")
        worker.stop()
    code = int(status["exit_code"])
    log.say(f"node 0's notebook ended with exit code {code}")
    if code:
        raise LaunchError(status["error"])
    return 0


def launch(notebook: str, parameters: Optional[dict[str, Any]] = None, params_file: Optional[str] = None,
           run_name: str = "", runs_dir: str = "runs", connect_timeout: float = 600, progress: bool = True) -> int:
    """Run ``notebook`` on this node of the job; 0 on success. Everything is checked before any work
    (ConfigError: the environment, the run name, the parameters, the node count); LaunchError when the job
    cannot go on or its notebook failed (the message says where, node 0's error on every node)."""
    parameters = parameters or {}
    job = job_env()
    if job.multi_node and not _given_run_name(run_name, parameters, params_file):
        raise ConfigError(f"a multi-node job (WORLD_SIZE={job.world_size}) needs --run-name NAME, the same on every "
                          "node, so that all nodes use one run folder (on storage they share); PAI-DLC sets no job "
                          "id variable to derive it from")
    run = prepare_run(notebook, parameters, params_file, run_name, runs_dir)
    check_node_count(run.cfg, job)
    log = NodeLog(run.cfg.run_dir / "logs" / f"node-{job.rank}.log", job.rank)
    try:
        log.say(f"{run.notebook.stem} on node {job.rank} of {job.world_size}, run folder {run.cfg.run_dir}")
        if not job.multi_node or run.notebook.stem in PER_NODE_NOTEBOOKS:
            code, error = _execute(run, job, log, progress)
            if code:
                raise LaunchError(error)
            return 0
        with _sigterm_exits():
            if job.rank == 0:
                return _drive(run, job, log, connect_timeout, progress)
            return _join(run, job, log, connect_timeout)
    except LaunchError as e:
        log.say(f"error: {e}")
        raise
    finally:
        log.close()
