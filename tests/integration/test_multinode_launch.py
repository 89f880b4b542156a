"""A two-node batch job simulated on this machine: two `cookbook launch` processes with RANK 0 and 1, WORLD_SIZE=2,
MASTER_ADDR=127.0.0.1 and a free MASTER_PORT, as PAI-DLC would start them on two nodes. Notebook 20 converts in two
parts, notebook 30 trains with its two trainer ranks on the two Ray nodes; killing the worker node mid-run ends the
job with an error naming the lost rank and node, and leaves no checkpoint that looks complete but is not."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cookbook.grpo.checkpoint import LEFTOVER, list_checkpoints, resume_point, verify_checkpoint
from helpers import free_port

pytestmark = pytest.mark.slow
RUN = "job"
TRAIN = ["-p", "steps", "{steps}", "-p", "walkthrough", "false", "-p", "overrides",
         "{{parallel.num_nodes: 2, parallel.expert: 2, grpo.prompts_per_step: 4, grpo.samples_per_prompt: 4, "
         "grpo.max_response_length: 12, grpo.num_minibatches: 2, grpo.eval_every: 100, grpo.eval_pass_k: 0, "
         "grpo.save_every: 1, data.num_train: 64, data.num_test: 16, data.validation_size: 16, "
         "data.max_test_examples: 8, logging.wandb_mode: disabled, parallel.weight_sync_bucket_mb: 4{extra}}}"]


def _start(rank: int, port: int, runs: Path, run: str, notebook: str, params: list[str], out: Path) -> subprocess.Popen:
    """One node: its own process group (a node's processes die together when it is killed)."""
    env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cmd = [sys.executable, "-m", "cookbook.cli", "launch", notebook, "-p", "preset", "tiny", *params,
           "--run-name", run, "--runs-dir", str(runs), "--no-progress", "--connect-timeout", "300"]
    return subprocess.Popen(cmd, env=env, stdout=open(out, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def _ray_processes(port: int) -> list[int]:
    """Processes of this job's Ray nodes (their command lines name the per-node temp folders)."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and f"cookbook-ray-{port}-".encode() in (proc / "cmdline").read_bytes():
                pids.append(int(proc.name))
        except OSError:
            pass
    return pids


def _wait(procs: list[subprocess.Popen], port: int, timeout: float = 1200) -> tuple[list[int], list[int]]:
    """The nodes' exit codes (killed after ``timeout``), and the Ray processes of this job still running 30 s
    after they ended (then killed, so that no test leaves any behind)."""
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            p.wait(max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    settle = time.monotonic() + 30
    while (left := _ray_processes(port)) and time.monotonic() < settle:
        time.sleep(1)
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return [p.returncode for p in procs], left


def _job(runs: Path, notebook: str, params: list[str], tag: str) -> tuple[list[int], list[str], list[int]]:
    """A two-node job in the run folder ``RUN``: exit codes, outputs, Ray processes left behind."""
    port = free_port()
    outs = [runs / f"{tag}-{rank}.out" for rank in (0, 1)]
    codes, left = _wait([_start(rank, port, runs, RUN, notebook, params, outs[rank]) for rank in (0, 1)], port)
    return codes, [o.read_text() for o in outs], left


def _steps(run: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def _node_ids(log: str) -> dict[str, str]:
    """Node name -> id prefix, from node 0's list of the nodes that joined."""
    return dict(re.findall(r"^\S+ \[node 0\]\s+(node-\d) \([^,]+, id (\w+)\)", log, re.M))


def _ray_node(actor_log: Path) -> str:
    return re.findall(r"^--- on Ray node (\w+)", actor_log.read_text(), re.M)[-1]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return tmp_path_factory.mktemp("multinode")


@pytest.fixture(scope="module")
def converted(runs):
    """Notebook 20 on both nodes: two conversion parts, node 0 finalizes."""
    codes, out, _ = _job(runs, "20_convert", ["-p", "verify", "false", "-p", "overrides",
                                              "{parallel.num_nodes: 2, parallel.expert: 2}"], "convert")
    assert codes == [0, 0], out
    return runs / RUN / "mcore"


def test_two_nodes_convert_then_train_with_the_trainer_group_over_both(runs, converted):
    codes, out, left = _job(runs, "30_grpo_moonlight", [a.format(steps=2, extra="") for a in TRAIN], "train")
    assert codes == [0, 0], out
    run = runs / RUN
    # the conversion: node 1's part, node 0 finalized; each node's executed notebook
    assert (run / "mcore" / "cookbook_convert.json").is_file()
    assert (run / "notebooks" / "20_convert.ipynb").is_file()
    assert (run / "notebooks" / "node-1" / "20_convert.ipynb").is_file()
    # training: node 0's executed notebook, both nodes' logs, node 1 reported its resources and node 0's status
    assert (run / "notebooks" / "30_grpo_moonlight.ipynb").is_file()
    assert not (run / "notebooks" / "node-1" / "30_grpo_moonlight.ipynb").exists()
    assert _steps(run) == [0, 1, 2]  # the evaluation before training, then the two steps
    node0, node1 = (run / "logs" / "node-0.log").read_text(), (run / "logs" / "node-1.log").read_text()
    assert "joined: node-1" in node1 and "CPU" in node1 and "node 0's notebook ended with exit code 0" in node1
    # Ray says where each trainer rank ran: rank 0 on node 0, rank 1 on node 1
    ids = _node_ids(node0)
    assert set(ids) == {"node-0", "node-1"} and ids["node-0"] != ids["node-1"], node0
    assert _ray_node(run / "logs" / "trainer-0.log").startswith(ids["node-0"])
    assert _ray_node(run / "logs" / "trainer-1.log").startswith(ids["node-1"])
    assert "trainer rank 1 on node-1" in (run / "notebooks" / "30_grpo_moonlight.ipynb").read_text()
    assert not left, "a node left Ray processes running"


def _kill_moment(run: Path, node0: subprocess.Popen, timeout: float = 900) -> None:
    """Wait until a checkpoint exists and, when the timing allows, the next one is being written (its ``.tmp-``
    folder is there); else until the second one exists (the kill then comes between saves)."""
    root = run / "checkpoints"
    deadline = time.monotonic() + timeout
    while node0.poll() is None and time.monotonic() < deadline:
        done = list_checkpoints(run)
        saving = [int(m.group(2)) for p in (root.iterdir() if root.is_dir() else []) if (m := LEFTOVER.match(p.name))]
        if done and (len(done) >= 2 or any(step > done[-1][0] for step in saving)):
            return
        time.sleep(0.02)


def test_killing_the_worker_node_ends_the_job_clearly_without_a_half_written_checkpoint(runs, converted):
    port = free_port()
    run = runs / "killed"
    params = [a.format(steps=8, extra=f", model.mcore_dir: {converted}") for a in TRAIN]
    outs = [runs / f"killed-{rank}.out" for rank in (0, 1)]
    node0, node1 = (_start(rank, port, runs, "killed", "30_grpo_moonlight", params, outs[rank]) for rank in (0, 1))
    _kill_moment(run, node0)
    assert list_checkpoints(run), f"no checkpoint before the kill: {outs[0].read_text()[-3000:]}"
    os.killpg(node1.pid, signal.SIGKILL)  # the worker node is lost: its launcher, Ray and the trainer rank on it
    node1.wait()
    codes, left = _wait([node0], port, timeout=600)
    out = outs[0].read_text()
    assert codes == [1], out
    assert not left, "Ray processes of the job outlived it"
    assert re.search(r"WorkerLost: trainer rank 1 on node-1 \(.*\) was lost during \w+", out), out[-3000:]
    assert max(_steps(run)) < 8, "the run finished before the kill; the test proves nothing"
    # every checkpoint under its final name is whole (a save the kill interrupted is either gone, or complete when
    # every rank had written and hashed its part before the node died); anything else is a .tmp- leftover
    for _, path in list_checkpoints(run):
        assert verify_checkpoint(path) is None, path
    assert not resume_point(run).skipped
    assert all(p.name.startswith("step_") or LEFTOVER.match(p.name) for p in (run / "checkpoints").iterdir())


def test_a_worker_node_whose_head_vanishes_exits_non_zero_saying_so(runs):
    """Node 0 killed while its notebook runs: the other node is not left waiting for a status that never comes."""
    port = free_port()
    params = ["-p", "overrides", "{parallel.num_nodes: 2, parallel.expert: 2}"]
    outs = [runs / f"headless-{rank}.out" for rank in (0, 1)]
    node0, node1 = (_start(rank, port, runs, "headless", "10_data", params, outs[rank]) for rank in (0, 1))
    deadline = time.monotonic() + 600
    while "waiting for node 0's notebook" not in outs[1].read_text() and time.monotonic() < deadline:
        time.sleep(0.5)
    os.killpg(node0.pid, signal.SIGKILL)  # node 0 is lost: its launcher, the Ray head and the notebook
    node0.wait()
    codes, left = _wait([node1], port, timeout=300)
    out = outs[1].read_text()
    assert codes == [1], out
    assert re.search(r"error: .*(left no status|before node 0 left a status)", out), out[-2000:]
    assert not left, "Ray processes of the job outlived it"
