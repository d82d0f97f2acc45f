"""--role auto under Slurm: roles and the head's address from the job's variables."""

import pytest

from controller.config import ConfigError, load_config_with_sources
from controller.surface.slurm import derive, expand_nodelist


@pytest.mark.parametrize("text,hosts", [
    ("node1", ["node1"]),
    ("node1,node2", ["node1", "node2"]),
    ("gpu[01-03]", ["gpu01", "gpu02", "gpu03"]),
    ("gpu[01-03,07],cpu5", ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]),
    ("rack1-n[8-10].ib", ["rack1-n8.ib", "rack1-n9.ib", "rack1-n10.ib"]),
    ("a[1],b[002-003]", ["a1", "b002", "b003"]),
])
def test_nodelists_expand_as_scontrol_would(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["gpu[01-03", "gpu01-03]", "gpu[3-1]", "gpu[a-b]", ""])
def test_malformed_nodelists_are_config_errors(text):
    with pytest.raises(ConfigError):
        expand_nodelist(text)


def test_node_zero_is_the_head_and_the_others_join_it():
    env = {"SLURM_NODEID": "0", "SLURM_JOB_NODELIST": "gpu[01-04]"}
    assert derive(env, 6379).role == "head" and derive(env, 6379).expected_workers == 3
    worker = derive({**env, "SLURM_NODEID": "2"}, 7000)
    assert (worker.role, worker.head_address) == ("worker", "gpu01:7000")


def test_role_auto_through_the_config(tmp_path):
    base = {"SLURM_JOB_NODELIST": "gpu[01-03]", "LLMCTL_RAY_TOKEN": "t"}
    head, sources = load_config_with_sources(["--role", "auto", "--engine", "none", "--state-dir", str(tmp_path)],
                                             {**base, "SLURM_NODEID": "0"})
    assert (head.role, head.expected_workers, head.expected_nodes) == ("head", 2, 3)
    assert sources["role"] == "Slurm (SLURM_NODEID)" and sources["expected_workers"].startswith("Slurm")
    worker, _ = load_config_with_sources(["--role", "auto", "--ray-port", "7000"], {**base, "SLURM_NODEID": "2"})
    assert (worker.role, worker.head_address) == ("worker", "gpu01:7000")
    # What is given explicitly is kept.
    head, _ = load_config_with_sources(["--role", "auto", "--engine", "none", "--expected-workers", "1",
                                        "--state-dir", str(tmp_path)], {**base, "SLURM_NODEID": "0"})
    assert head.expected_workers == 1


@pytest.mark.parametrize("env,message", [
    ({}, "--role auto needs a Slurm job"),
    ({"SLURM_NODEID": "x", "SLURM_JOB_NODELIST": "n1"}, "SLURM_NODEID is not a node number"),
    ({"SLURM_NODEID": "3", "SLURM_JOB_NODELIST": "n[1-2]"}, "outside SLURM_JOB_NODELIST"),
])
def test_role_auto_outside_a_usable_slurm_job_is_a_config_error(env, message):
    with pytest.raises(ConfigError, match=message):
        load_config_with_sources(["--role", "auto"], env)
