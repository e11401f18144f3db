"""The environment each rank of a several-GPU run starts with."""

from __future__ import annotations

from runner.launch import rank_env


def test_each_rank_gets_its_rank_the_rendezvous_and_a_share_of_the_cores():
    base = {"PATH": "/bin", "HF_HOME": "/h"}
    envs = [rank_env(base, r, 2, 29555, cpus=4) for r in range(2)]
    assert [(e["RANK"], e["LOCAL_RANK"]) for e in envs] == [("0", "0"), ("1", "1")]
    for env in envs:
        assert env["WORLD_SIZE"] == "2" and env["MASTER_PORT"] == "29555" and env["MASTER_ADDR"] == "127.0.0.1"
        assert env["OMP_NUM_THREADS"] == "2"  # Kaggle's 4 vCPUs between two GPUs, not 4 threads each
        assert env["PATH"] == "/bin" and env["HF_HOME"] == "/h"
    assert "RANK" not in base  # the caller's environment is not changed


def test_a_thread_count_the_user_set_is_kept_and_a_small_machine_gets_one():
    assert rank_env({"OMP_NUM_THREADS": "3"}, 0, 2, 1, cpus=32)["OMP_NUM_THREADS"] == "3"
    assert rank_env({}, 1, 4, 1, cpus=2)["OMP_NUM_THREADS"] == "1"
