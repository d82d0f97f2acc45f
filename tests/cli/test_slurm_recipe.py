"""deploy/slurm/llm-cluster.sbatch run as sbatch would, with a stand-in `srun`
that records its command line: the recipe makes a private token and starts one
controller per node, which derive head and worker from the job's variables."""

import os
import stat
import subprocess
import sys
from pathlib import Path

RECIPE = Path(__file__).resolve().parents[2] / "deploy" / "slurm" / "llm-cluster.sbatch"


def test_the_sbatch_recipe_starts_a_head_on_node_0_and_workers_on_the_others(tmp_path):
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    record = tmp_path / "srun-argv"
    srun = fake_bin / "srun"
    srun.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" > {record}\n')
    srun.chmod(0o755)
    job = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "3", "SLURM_JOB_NODELIST": "gpu[07-09]",
           "SLURM_GPUS_PER_NODE": "a100:2"}
    env = {**os.environ, **job, "PATH": f"{fake_bin}:{os.environ['PATH']}", "HOME": str(tmp_path),
           "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(RECIPE), "/models/m"], env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    argv = record.read_text().splitlines()
    assert argv[:4] == ["--kill-on-bad-exit=0", "--ntasks-per-node=1", sys.executable, "-m"]
    controller_args = argv[argv.index("controller") + 1:]
    token = Path(controller_args[controller_args.index("--ray-token-file") + 1])
    assert stat.S_IMODE(token.stat().st_mode) == 0o600 and len(token.read_text().strip()) == 64
    assert controller_args[controller_args.index("--tensor-parallel-size") + 1] == "2"
    assert controller_args[controller_args.index("--pipeline-parallel-size") + 1] == "3"

    def effective(node_id: str) -> str:
        # What each node's controller would run with (GPUs faked: sharded mode wants them).
        shown = subprocess.run([sys.executable, "-c", "import sys, controller.config as c; "
                                "c.local_gpu_count = lambda environ=None: 2; "
                                "from controller.surface.cli import main; sys.exit(main(sys.argv[1:]))",
                                *controller_args, "--print-config"],
                               env={**env, "SLURM_NODEID": node_id}, capture_output=True, text=True, timeout=60)
        assert shown.returncode == 0, shown.stderr
        return shown.stdout

    head = effective("0")
    assert 'role = "head"  # Slurm (SLURM_NODEID)' in head and "expected-workers = 2  # Slurm" in head
    for node in ("1", "2"):
        worker = effective(node)
        assert 'role = "worker"' in worker and 'head-address = "gpu07:6379"  # Slurm' in worker
