"""SLURM through Hydra's submitit launcher (conf/hydra/launcher/slurm.yaml, conf/experiment/slurm.yaml): the configs
compose with the plugin's launcher and trainer.distributed on; what each SLURM task's environment resolves to
(sftjax.train.distributed); and the sbatch script submitit writes for a run, submitted to a fake `sbatch`."""

import importlib.util
import os
import stat
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict

from sftjax.config import TrainConfig, register
from sftjax.job.config import JobConfig
from sftjax.train.distributed import DEFAULT_PORT, Cluster, resolve

needs_plugin = pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                                  reason='the submitit launcher: pip install "sftjax[slurm]"')
SLURM_LAUNCHER = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
REQUIRED = ["data.train=[{path:x.jsonl}]", "model.path=tiny-llama", "trainer.run_dir=."]
# Two nodes of four GPUs, one process per GPU (the layout of the SLURM task environments below).
LAYOUT = ["hydra.launcher.nodes=2", "hydra.launcher.tasks_per_node=4", "hydra.launcher.gpus_per_node=4",
          "hydra.launcher.partition=gpu"]


def _compose(*overrides: str):
    register(JobConfig)
    with initialize_config_module("sftjax.conf", version_base="1.3"):
        return compose("config", overrides=[*REQUIRED, *overrides], return_hydra_config=True)


@needs_plugin
@pytest.mark.parametrize("overrides", [["experiment=slurm"],
                                       ["hydra/launcher=slurm", "trainer.distributed=true", "experiment=grid_lr"]],
                         ids=["experiment", "pair"])
def test_the_slurm_launcher_composes_with_distributed_on(overrides):
    cfg = _compose(*overrides, *LAYOUT)
    assert cfg.hydra.runtime.choices["hydra/launcher"] == "slurm"
    launcher = cfg.hydra.launcher
    assert launcher._target_ == SLURM_LAUNCHER
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node, launcher.partition) == (2, 4, 4, "gpu")
    assert (launcher.cpus_per_task, launcher.timeout_min, launcher.mem_gb) == (8, 240, None)  # slurm.yaml's values
    with open_dict(cfg):
        del cfg["hydra"]
    typed = OmegaConf.to_object(cfg)
    assert isinstance(typed, TrainConfig) and typed.trainer.distributed
    assert (typed.trainer.coordinator, typed.trainer.num_processes, typed.trainer.process_id) == (None, 0, -1)


def _task_env(procid: int, localid: int, ntasks_per_node: str, **extra: str) -> dict[str, str]:
    """What srun sets in one task of a 2-node job (the keys distributed.py reads, and some it must ignore)."""
    return {"SLURM_JOB_ID": "4242", "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
            "SLURM_NTASKS": str(2 * int(ntasks_per_node)), "SLURM_NTASKS_PER_NODE": ntasks_per_node,
            "SLURM_STEP_NODELIST": "gpu[012-013]", "SLURM_JOB_NODELIST": "gpu[012-013]", "SLURM_NODEID": "0",
            "SLURM_TASKS_PER_NODE": f"{ntasks_per_node}(x2)", "SUBMITIT_EXECUTOR": "slurm", **extra}


def test_a_task_of_four_per_node_gets_its_rank_and_one_gpu():
    cluster = resolve(None, 0, -1, env=_task_env(procid=3, localid=3, ntasks_per_node="4"))
    assert cluster == Cluster(f"gpu012:{61440 + 4242 % 4096}", 8, 3, (3,), "SLURM")


def test_one_task_per_node_sees_all_its_gpus():
    cluster = resolve(None, 0, -1, env=_task_env(procid=1, localid=0, ntasks_per_node="1"))
    assert cluster == Cluster(f"gpu012:{61440 + 4242 % 4096}", 2, 1, None, "SLURM")


def test_the_coordinator_port_is_the_jobs_own_unless_exported():
    env = _task_env(procid=0, localid=0, ntasks_per_node="4")
    assert resolve(None, 0, -1, env=env).coordinator == f"gpu012:{61440 + 4242 % 4096}"
    assert resolve(None, 0, -1, env={**env, "SFTJAX_COORDINATOR_PORT": "5000"}).coordinator == "gpu012:5000"
    assert resolve(None, 0, -1, env={k: v for k, v in env.items() if k != "SLURM_JOB_ID"}).coordinator == \
        f"gpu012:{DEFAULT_PORT}"


def test_a_task_bound_to_its_own_gpu_keeps_it():
    cluster = resolve(None, 0, -1, env=_task_env(procid=3, localid=3, ntasks_per_node="4", CUDA_VISIBLE_DEVICES="3"))
    assert cluster.local_device_ids is None  # it sees one GPU: device 0 of its own, not the node's number 3


def _task(cfg):  # stands in for sftjax-train's task function (pickled by reference into the job)
    return 0.0


def _fake_slurm(folder: Path) -> Path:
    """`sbatch` that keeps a copy of the script it is given and answers like SLURM; `srun` that submitit looks for."""
    folder.mkdir()
    for name, body in (("sbatch", f'cp "$1" {folder}/submitted.sh\necho "Submitted batch job 4242"\n'),
                       ("srun", "exit 1\n")):
        path = folder / name
        path.write_text("#!/bin/sh\n" + body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return folder


@needs_plugin
def test_submitit_submits_one_srun_of_all_tasks(tmp_path, monkeypatch):
    import submitit

    bin_dir = _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    # The launcher waits for the job's results (polling sacct); the job never runs here.
    monkeypatch.setattr(submitit.SlurmJob, "results", lambda self: ["not run"])
    cfg = _compose("experiment=slurm", *LAYOUT, f"hydra.sweep.dir={tmp_path / 'sweep'}")
    launcher = instantiate(cfg.hydra.launcher)
    launcher.setup(hydra_context=None, task_function=_task, config=cfg)

    assert launcher.launch([["optim.lr=1e-4"]], initial_job_idx=0) == ["not run"]

    script = (bin_dir / "submitted.sh").read_text()
    for flag in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--cpus-per-task=8", "--partition=gpu",
                 "--time=240"):
        assert f"#SBATCH {flag}\n" in script, flag
    assert "-m submitit.core._submit" in script[script.index("\nsrun "):]  # one srun starts every task
