"""`cookbook launch` refuses what it cannot run before any work: the job's environment, the run name, the node
count; a worker node that cannot reach the head says which address and port it tried."""
import time

import pytest

from cookbook.cli import main
from cookbook.cluster.jobenv import JobEnv, check_node_count, job_env, strip_job_env
from cookbook.cluster.launch import launch
from cookbook.cluster.raynode import LaunchError
from cookbook.config import ConfigError, load_config
from helpers import free_port

TWO_NODES = {"preset": "tiny", "overrides": {"parallel.num_nodes": 2, "parallel.expert": 2}}


def _job(monkeypatch, **env):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, str(value))


def test_no_world_size_or_one_node_is_a_single_node():
    assert job_env({}) == JobEnv(0, 1)
    assert job_env({"WORLD_SIZE": "1", "RANK": "0"}) == JobEnv(0, 1)
    job = job_env({"WORLD_SIZE": "2", "RANK": "1", "MASTER_ADDR": "dlc1-master-0", "MASTER_PORT": "23456"})
    assert job == JobEnv(1, 2, "dlc1-master-0", 23456) and job.multi_node and job.head_address == "dlc1-master-0:23456"


def test_missing_variables_of_a_multi_node_job_are_listed_with_what_sets_them():
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 .* but RANK, MASTER_PORT are not set.*PAI-DLC and PyTorchJob"):
        job_env({"WORLD_SIZE": "2", "MASTER_ADDR": "h"})


@pytest.mark.parametrize("env, match", [
    ({"WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE=0: the number of nodes must be >= 1"),
    ({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}, r"RANK=2 is outside 0\.\.1"),
    ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "h", "MASTER_PORT": "70000"}, "MASTER_PORT=70000 is not a TCP"),
])
def test_bad_values_are_named(env, match):
    with pytest.raises(ConfigError, match=match):
        job_env(env)


def test_node_count_must_match_the_layout():
    check_node_count(load_config("tiny", ["parallel.num_nodes=2", "parallel.expert=2"]), JobEnv(0, 2, "h", 1))
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 node\(s\) but parallel.num_nodes=1 .*parallel.num_nodes: 2"):
        check_node_count(load_config("tiny"), JobEnv(0, 2, "h", 1))


def test_a_cpu_layout_needs_a_trainer_rank_on_every_node():
    with pytest.raises(ConfigError, match=r"parallel.num_nodes=2 on CPU .* has 1 rank\(s\).*parallel.expert=2"):
        load_config("tiny", ["parallel.num_nodes=2"])


def test_ray_and_the_kernel_do_not_see_the_node_level_variables():
    env = strip_job_env({"RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1", "LOCAL_RANK": "0",
                         "PATH": "/bin"})
    assert env == {"PATH": "/bin"}


def test_a_multi_node_job_needs_a_run_name(monkeypatch, tmp_path):
    _job(monkeypatch, RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    with pytest.raises(ConfigError, match="needs --run-name NAME, the same on every node"):
        launch("30_grpo_moonlight", TWO_NODES, runs_dir=str(tmp_path))
    assert not any(tmp_path.iterdir())


def test_a_node_count_the_layout_does_not_plan_for_stops_before_work(monkeypatch, tmp_path, capsys):
    _job(monkeypatch, RANK=0, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=free_port())
    code = main(["launch", "30_grpo_moonlight", "-p", "preset", "tiny", "--run-name", "r", "--runs-dir", str(tmp_path)])
    assert code == 2 and "parallel.num_nodes=1" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_an_unreachable_head_is_named_by_address_and_port(monkeypatch, tmp_path):
    port = free_port()  # nothing listens there
    _job(monkeypatch, RANK=1, WORLD_SIZE=2, MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    t0 = time.monotonic()
    with pytest.raises(LaunchError, match=rf"Ray head at 127\.0\.0\.1:{port} \(MASTER_ADDR=127\.0\.0\.1, "
                                          rf"MASTER_PORT={port}\) did not answer within 3 s"):
        launch("30_grpo_moonlight", TWO_NODES, run_name="r", runs_dir=str(tmp_path), connect_timeout=3)
    assert time.monotonic() - t0 < 30
    log = (tmp_path / "r" / "logs" / "node-1.log").read_text()
    assert f"joining the Ray head at 127.0.0.1:{port}" in log and "error: the Ray head" in log
