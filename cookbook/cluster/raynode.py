"""Ray on the nodes of a batch job: the head on node 0, a worker on every other node, each one a
``ray start --block`` process owned by the launcher, and the head's key-value store for what the nodes tell
each other.

- Stopping: the launcher signals its own ``ray start`` process, which takes its Ray processes down with it.
  Never ``ray stop``: that stops every Ray instance on the machine (other users', or the other simulated nodes).
- Ports: the head's GCS listens on ``MASTER_PORT``; every other Ray port a node opens is a free one (Ray's fixed
  defaults, e.g. 52365 for the dashboard agent, 8265 for the dashboard and 10002-19999 for workers, would clash
  when two nodes share a machine, as in the one-machine test, or with another Ray there).
- Start-up: Ray 2.60's raylet gives its agents a fixed 15 s to report each port they pick and exits otherwise,
  which a busy machine can miss (so the agents' ports are left to them: each one named here would shorten the
  time they get). A node therefore starts only what a job needs (no autoscaler monitor or log monitor:
  the cluster does not scale, and actors log to the run folder), and a ``ray start`` that fails before its node
  has registered is tried again (``START_ATTEMPTS``).
- Authentication: ``RAY_AUTH_MODE`` is the job's when set, else ``disabled``. Ray 2.60 turns token
  authentication on for a head that finds ``~/.ray/auth_token`` but never on a joining worker, so leaving it to
  each machine's home folder lets nodes disagree and refuse each other. With ``token``, give every node the same
  ``RAY_AUTH_TOKEN``.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from typing import IO, Any, Callable, Optional

from cookbook.cluster.jobenv import JobEnv, strip_job_env
from cookbook.rundir import checkout_env

NAMESPACE = b"cookbook-launch"
STATUS_KEY = b"status"
POLL_S = 1.0
START_ATTEMPTS = 5
HEAD_LOST_S = 60.0  # the head unanswering this long, with no status written, means node 0 is gone
ACK_S = 60.0  # how long node 0 keeps the head up for the other nodes to read its status


class LaunchError(RuntimeError):
    """The job cannot go on; the message names what is wrong and what to check."""


def node_name(rank: int) -> str:
    return f"node-{rank}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def ray_env(environ: dict[str, str]) -> dict[str, str]:
    """The environment of Ray's processes and of the driver: this checkout on PYTHONPATH, no node-level job
    variables, an explicit authentication mode (module docstring)."""
    env = strip_job_env(checkout_env(environ))
    env.setdefault("RAY_AUTH_MODE", "disabled")
    return env


def start_command(job: JobEnv, temp_dir: str, object_store_bytes: Optional[int]) -> list[str]:
    """``ray start`` for this node: ``--head`` on ``MASTER_ADDR:MASTER_PORT`` for node 0, else joining it."""
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--disable-usage-stats",
           f"--node-name={node_name(job.rank)}", f"--temp-dir={temp_dir}", "--include-log-monitor=false",
           f"--dashboard-agent-listen-port={free_port()}", "--min-worker-port=0", "--max-worker-port=0"]
    if job.rank == 0:
        cmd += ["--head", f"--port={job.master_port}", f"--node-ip-address={socket.gethostbyname(job.master_addr)}",
                "--include-dashboard=false", "--no-monitor", f"--dashboard-port={free_port()}",
                f"--ray-client-server-port={free_port()}"]
    else:
        cmd += [f"--address={job.head_address}"]
    if object_store_bytes:
        cmd += [f"--object-store-memory={object_store_bytes}"]
    return cmd


class RayNode:
    """This node's ``ray start --block`` process; its output goes to ``log``."""

    def __init__(self, job: JobEnv, log: IO[str], say: Callable[[str], None],
                 object_store_bytes: Optional[int] = None):
        # a short, per-node folder: Ray's socket paths must stay under ~107 characters, and two nodes on one
        # machine must not share one
        self.temp_dir = os.path.join(tempfile.gettempdir(), f"cookbook-ray-{job.master_port}-{job.rank}")
        self.job, self.log, self.say, self.store = job, log, say, object_store_bytes
        self.attempt, self.registered = 1, False
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen:
        self.log.flush()
        self.log_start = os.path.getsize(self.log.name)  # where this attempt's output begins
        return subprocess.Popen(start_command(self.job, self.temp_dir, self.store), stdout=self.log,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=ray_env(dict(os.environ)))

    def check(self) -> None:
        """Raise LaunchError when ``ray start`` has exited for good; one that failed before its node registered is
        started again (module docstring) until ``START_ATTEMPTS``."""
        code = self.proc.poll()
        if code is None:
            return
        if not self.registered and self.attempt < START_ATTEMPTS:
            self.attempt += 1
            self.say(f"ray start exited with code {code} during start-up; attempt {self.attempt} of {START_ATTEMPTS}")
            self.proc = self._spawn()
            return
        what = "the Ray head" if self.job.rank == 0 else "this node's Ray worker"
        raise LaunchError(f"{what} stopped: ray start exited with code {code}{self._last_error()} (its output is in "
                          "this node's log)")

    def _last_error(self) -> str:
        """The last exception line the latest ``ray start`` wrote to the node log, quoted."""
        with open(self.log.name, errors="replace") as f:
            f.seek(self.log_start)
            lines = [line.strip() for line in f if re.match(r"^\w*(Error|Exception)\b.*:", line)]
        return f" ({lines[-1][:300]})" if lines else ""

    def stop(self, timeout: float = 60) -> None:
        """SIGTERM: ``ray start --block`` stops the Ray processes it started, then exits."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# -- the head's state, read through a GCS client (no Ray driver: a launcher that joined as a driver would be
# -- killed by Ray's core worker when the head goes, before it could say so) -----------------------------------
def reachable(host: str, port: int, timeout: float = 2.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def gcs_client(address: str) -> Any:
    from ray._raylet import GcsClient

    return GcsClient(address=address)


def alive_nodes(client: Any, timeout: float = 10) -> list[Any]:
    """The cluster's alive nodes (GcsNodeInfo), head first, then by name."""
    infos = [n for n in client.get_all_node_info(timeout=timeout).values() if n.state == 0]
    return sorted(infos, key=lambda n: (not n.is_head_node, n.node_name))


def _alive_nodes_now(client: Any) -> list[Any]:
    """``alive_nodes``, or none while the GCS does not answer (a busy head; the callers wait with a deadline)."""
    try:
        return alive_nodes(client)
    except Exception:  # noqa: BLE001 -- asked again on the next poll
        return []


def describe(node: Any) -> str:
    """One line for the log: name, address, id and resources."""
    res = dict(node.resources_total)
    parts = [f"CPU {res.get('CPU', 0):g}"] + ([f"GPU {res['GPU']:g}"] if res.get("GPU") else [])
    parts += [f"memory {res.get('memory', 0) / 2**30:.1f} GiB",
              f"object store {res.get('object_store_memory', 0) / 2**30:.1f} GiB"]
    return f"{node.node_name} ({node.node_manager_address}, id {node.node_id.hex()[:8]}): {', '.join(parts)}"


def connect(job: JobEnv, timeout: float, say: Callable[[str], None], head: Optional[RayNode] = None) -> Any:
    """A GCS client once the head at ``MASTER_ADDR:MASTER_PORT`` answers and its node is up; LaunchError naming
    the address and port after ``timeout`` seconds (or when this node's own head process has exited)."""
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 30
    while True:
        if head is not None:
            try:
                head.check()
            except LaunchError as e:
                raise LaunchError(f"the Ray head did not start on {job.head_address}: {e}. Is MASTER_PORT="
                                  f"{job.master_port} in use already, or MASTER_ADDR={job.master_addr} not this "
                                  "node?") from None
        if reachable(job.master_addr, job.master_port):
            try:
                client = gcs_client(job.head_address)
            except Exception:  # noqa: BLE001 -- the GCS is still starting; asked again below
                client = None
            if client is not None and any(n.is_head_node for n in _alive_nodes_now(client)):
                if head is not None:
                    head.registered = True
                return client
        if time.monotonic() > deadline:
            raise LaunchError(
                f"the Ray head at {job.head_address} (MASTER_ADDR={job.master_addr}, MASTER_PORT={job.master_port}) "
                f"did not answer within {timeout:.0f} s: check that node 0 runs `cookbook launch` with the same "
                "MASTER_ADDR / MASTER_PORT and that the port is open between the nodes (--connect-timeout sets the "
                "wait)")
        if time.monotonic() > next_note:
            say(f"waiting for the Ray head at {job.head_address} ...")
            next_note += 30
        time.sleep(POLL_S)


def wait_for_nodes(client: Any, job: JobEnv, timeout: float, say: Callable[[str], None]) -> list[Any]:
    """Node 0: block until all ``WORLD_SIZE`` nodes have joined; LaunchError naming who is missing."""
    deadline = time.monotonic() + timeout
    next_note = time.monotonic() + 30
    while True:
        nodes = _alive_nodes_now(client)
        if len(nodes) >= job.world_size:
            return nodes
        if time.monotonic() > deadline:
            joined = {n.node_name for n in nodes}
            missing = [node_name(r) for r in range(job.world_size) if node_name(r) not in joined]
            raise LaunchError(
                f"only {len(nodes)} of WORLD_SIZE={job.world_size} nodes joined the Ray head at {job.head_address} "
                f"within {timeout:.0f} s (missing: {', '.join(missing)}): check that every node runs `cookbook "
                "launch` with the same MASTER_ADDR / MASTER_PORT and can reach it (their logs say where they wait)")
        if time.monotonic() > next_note:
            say(f"{len(nodes)} of {job.world_size} nodes have joined ...")
            next_note += 30
        time.sleep(POLL_S)


def wait_for_own_node(client: Any, job: JobEnv, node: RayNode, timeout: float) -> Any:
    """A worker: block until this node is registered with the head; its GcsNodeInfo."""
    name = node_name(job.rank)
    deadline = time.monotonic() + timeout
    while True:
        mine = [n for n in _alive_nodes_now(client) if n.node_name == name]
        if mine:
            node.registered = True
            return mine[0]
        node.check()
        if time.monotonic() > deadline:
            raise LaunchError(f"this node did not register with the Ray head at {job.head_address} within "
                              f"{timeout:.0f} s (ray start's output is in this node's log)")
        time.sleep(POLL_S)


# -- what node 0 tells the others ------------------------------------------------------------------------------
def put_status(client: Any, exit_code: int, error: str) -> None:
    client.internal_kv_put(STATUS_KEY, json.dumps({"exit_code": exit_code, "error": error}).encode(), True,
                           NAMESPACE, timeout=10)


def get_status(client: Any) -> Optional[dict[str, Any]]:
    raw = client.internal_kv_get(STATUS_KEY, NAMESPACE, timeout=10)
    return json.loads(raw) if raw else None


def put_ack(client: Any, rank: int) -> None:
    client.internal_kv_put(f"ack/{rank}".encode(), b"1", True, NAMESPACE, timeout=10)


def has_ack(client: Any, rank: int) -> bool:
    return bool(client.internal_kv_get(f"ack/{rank}".encode(), NAMESPACE, timeout=10))


def wait_for_status(client: Any, job: JobEnv, node: RayNode, say: Callable[[str], None]) -> dict[str, Any]:
    """A worker: block until node 0 writes its notebook's status, then acknowledge it. LaunchError when the head
    is gone without one (unanswering for ``HEAD_LOST_S``, or this node's Ray worker stopped after losing it)."""
    last_answer = time.monotonic()
    next_note = time.monotonic() + 300
    while True:
        try:
            status = get_status(client)
            last_answer = time.monotonic()
            if status is not None:
                put_ack(client, job.rank)
                return status
        except Exception as e:  # noqa: BLE001 -- the head not answering; judged below
            if time.monotonic() - last_answer > HEAD_LOST_S:
                raise LaunchError(f"the Ray head at {job.head_address} stopped answering ({type(e).__name__}) and "
                                  "left no status: node 0 failed or was stopped; see its log, logs/node-0.log in "
                                  "the run folder") from None
        try:
            node.check()
        except LaunchError as e:
            raise LaunchError(f"{e}, before node 0 left a status at {job.head_address}: the head is gone or this node "
                              "lost it; see logs/node-0.log and this node's log in the run folder") from None
        if time.monotonic() > next_note:
            say("node 0's notebook is still running ...")
            next_note += 300
        time.sleep(2 * POLL_S)


def wait_for_acks(client: Any, job: JobEnv, timeout: float = ACK_S) -> list[int]:
    """Node 0: give the other nodes (those still alive) time to read the status; the ranks that did not."""
    deadline = time.monotonic() + timeout
    pending = set(range(1, job.world_size))
    while pending:
        try:
            alive = {n.node_name for n in alive_nodes(client)}
            pending = {r for r in pending if node_name(r) in alive and not has_ack(client, r)}
        except Exception:  # noqa: BLE001 -- the head going down: nobody left to wait for
            break
        if not pending or time.monotonic() > deadline:
            break
        time.sleep(POLL_S)
    return sorted(pending)
