"""Several processes, one job (seqppl.processes): local jax.distributed jobs of
tests/distributed_worker.py give the single-process results, each process holding only its own
shards; a process that dies ends the others with a clear error, and a restarted job resumes
``fit`` and ``distill`` from their checkpoints with the same results.

Every job runs under a timeout and is killed as a process group when a test fails. The job of
``make test`` is 2 processes of 2 CPU devices each on a tiny problem; 4 processes, the faults
and the launchers are ``slow``.
"""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from seqppl import distributed, processes
from seqppl.cli import build_parser
from seqppl.loop import load_checkpoint
from tests import distributed_worker as worker

ROOT = Path(__file__).resolve().parents[1]
FAST = ("is", "smc", "fit_data", "distill_forward_kl")
TIMEOUT = 240  # seconds for a whole job, start-up and compilation included (2 shared cores)


@contextlib.contextmanager
def _job(tmp_path, num_processes, devices, *args):
    """A started job of the worker writing to ``tmp_path``, killed (its process group) if the
    test leaves it running."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    argv = ["-m", "tests.distributed_worker", str(tmp_path), *args]
    job = processes.start_local(
        argv, num_processes, devices_per_process=devices, output_dir=tmp_path,
        env={"PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    try:
        yield job
    finally:
        processes.stop(job)


def _results(job, codes):
    assert codes == [0] * len(codes), processes.describe(job, codes)
    return [
        json.loads((job.output_dir / f"result-{i}.json").read_text()) for i in range(len(codes))
    ]


def _reference(names, steps=6):
    """The single-process, one-device runs (``mesh=None``) in this test process."""
    return {name: worker.run(name, None, steps=steps) for name in names}


def _same_run(name, got, want):
    if name in ("is", "smc"):
        assert abs(got["log_z"] - want["log_z"]) <= 1e-12 * max(1.0, abs(want["log_z"]))
        assert abs(got["stderr"] - want["stderr"]) <= 1e-12
        assert got["samples"] == want["samples"]  # every kept draw, gathered to every process
        return
    np.testing.assert_allclose(got["loss"], want["loss"], rtol=1e-12)
    np.testing.assert_allclose(got["params"], want["params"], rtol=0, atol=1e-12)
    if want["kl_reverse"] is not None:  # the evaluation reports of distill
        np.testing.assert_allclose(got["kl_reverse"], want["kl_reverse"], rtol=1e-10)
    assert got["params_local"]  # returned as copies on the process's own device


def test_two_processes_of_two_devices_give_the_single_process_results(tmp_path):
    """2 processes x 2 CPU devices (the reference computed meanwhile in this process): every
    process sees the 4 devices and holds only its shards of the draws, and each run of ``FAST``
    gives the single-process result. One test, so that the job runs once however pytest-xdist
    splits the module."""
    with _job(tmp_path, 2, 2, "--only", ",".join(FAST)) as job:
        reference = _reference(FAST)  # while the job runs
        codes = processes.wait_all(job, timeout=TIMEOUT)
    results = _results(job, codes)
    assert [r["process"] for r in results] == [0, 1]
    assert all(r["processes"] == 2 and r["devices"] == 4 for r in results)
    assert all(r["local_devices"] == 2 for r in results)
    for r in results:  # 512 draws: 128 on each of the 4 devices, 2 of them on each process
        assert r["shards"] == [[128, r["process"]]] * 2
    for name in FAST:
        for r in results:
            _same_run(name, r[name], reference[name])


@pytest.mark.slow
def test_four_processes_give_the_single_process_results(tmp_path):
    with _job(tmp_path, 4, 1) as job:
        reference = _reference(worker.RUNS)
        codes = processes.wait_all(job, timeout=2 * TIMEOUT)
    results = _results(job, codes)
    for r in results:
        assert r["shards"] == [[128, r["process"]]]
        for name in worker.RUNS:
            _same_run(name, r[name], reference[name])


@pytest.mark.slow
@pytest.mark.parametrize(("name", "victim"), [("fit_data", 1), ("distill_forward_kl", 0)])
def test_a_dead_process_ends_the_job_and_a_restart_resumes(tmp_path, name, victim):
    """The victim is killed once the run's first checkpoint exists; the other exits by itself,
    naming the failure, within the heartbeat timeout; the same job again resumes from the
    checkpoint and ends with the uninterrupted run's losses and parameters."""
    args = ["--only", name, "--steps", "400", "--checkpoint-dir", str(tmp_path / "ckpt")]
    checkpoint = tmp_path / "ckpt" / name / "checkpoint.pkl"
    with _job(tmp_path / "first", 2, 1, *args) as job:
        deadline = time.monotonic() + TIMEOUT
        while not checkpoint.exists() and time.monotonic() < deadline:
            assert all(p.poll() is None for p in job.processes), "the job ended before the kill"
            time.sleep(0.01)
        os.kill(job.processes[victim].pid, signal.SIGKILL)
        killed = time.monotonic()
        codes = processes.wait_all(job, timeout=TIMEOUT, grace=processes.HEARTBEAT_TIMEOUT + 5)
    other = 1 - victim
    assert codes[victim] == -signal.SIGKILL
    assert codes[other] == 1, processes.describe(job, codes)
    assert time.monotonic() - killed < processes.HEARTBEAT_TIMEOUT
    error = (job.output_dir / f"process-{other}.err").read_text()
    assert f"process {other} of 2: the job failed, exiting" in error
    assert not (job.output_dir / f"result-{other}.json").exists()
    saved = load_checkpoint(checkpoint, None)["step"]
    assert 0 < saved < 400  # killed mid-run

    with _job(tmp_path / "again", 2, 1, *args) as again:
        reference = _reference([name], steps=400)
        codes = processes.wait_all(again, timeout=TIMEOUT)
    for r in _results(again, codes):
        _same_run(name, r[name], reference[name])
        assert r[name]["resumed_from"] == saved


@pytest.mark.slow
def test_a_resume_from_checkpoints_only_some_processes_see_is_refused(tmp_path):
    """Process 0 writes the checkpoints; in folders of their own, the other process would start
    from step 0 while process 0 resumes: every process refuses, naming the cause."""
    args = ["--only", "fit_data", "--checkpoint-dir", str(tmp_path / "ckpt-{process}")]
    statuses = []
    for attempt in ("first", "again"):
        with _job(tmp_path / attempt, 2, 1, *args) as job:
            statuses.append(processes.wait_all(job, timeout=TIMEOUT))
    assert statuses == [[0, 0], [1, 1]]
    for i in range(2):
        error = (job.output_dir / f"process-{i}.err").read_text()
        assert "would resume from different steps [6, 0]" in error
        assert "a shared file system" in error


@pytest.mark.slow
def test_the_command_line_launcher_prints_the_single_process_estimate():
    one, two = (
        subprocess.run(
            [
                sys.executable,
                "-m",
                "seqppl",
                "logz",
                "digit-sum",
                "--method",
                "is",
                "--num-samples",
                "20000",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            cwd=ROOT,
        )  # fmt: skip
        for extra in ([], ["--processes", "2"])
    )
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-2000:]
    assert two.stdout == one.stdout  # printed once, by process 0, and the same estimate
    assert "log Z ≈" in two.stdout


@pytest.mark.slow
def test_python_m_seqppl_distributed_reads_the_schedulers_environment(tmp_path):
    """Slurm's variables as ``srun`` sets them (one node, two tasks): jax.distributed.initialize()
    without arguments finds the job."""
    port = processes.free_port()
    procs = []
    try:
        for i in range(2):
            env = {k: v for k, v in os.environ.items() if not k.startswith("SEQPPL_")}
            env.update(
                JAX_PLATFORMS="cpu",
                SLURM_JOB_ID="4242",
                SLURM_STEP_NODELIST="localhost",
                SLURM_NTASKS="2",
                SLURM_PROCID=str(i),
                SLURM_LOCALID=str(i),
                JAX_COORDINATOR_PORT=str(port),
            )
            command = [sys.executable, "-m", "seqppl.distributed", "logz", "digit-sum"]
            command += ["--method", "smc", "--num-samples", "4096"]
            procs.append(
                subprocess.Popen(
                    command,
                    env=env,
                    cwd=ROOT,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )  # fmt: skip
            )
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs[0][1][-2000:] + outputs[1][1][-2000:]
    assert "log Z ≈" in outputs[0][0] and "smc" in outputs[0][0]
    assert "log Z" not in outputs[1][0]  # only process 0 prints


def test_the_entry_refuses_other_commands_and_a_nested_launch(capsys):
    for args, message in (
        (["demo"], "the commands that run over several processes"),
        (["logz", "digit-sum", "--processes", "2"], "--processes is the local launcher's"),
    ):
        assert distributed.main(args) == 2  # before jax.distributed is initialised
        assert message in capsys.readouterr().err


def test_a_job_past_its_timeout_is_killed(tmp_path):
    job = processes.start_local(["-c", "import time; time.sleep(60)"], 2, output_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(processes.JobFailed, match="ran past its 0.5 s timeout"):
        processes.wait_all(job, timeout=0.5)
    assert time.monotonic() - started < 10
    assert all(p.poll() == -signal.SIGKILL for p in job.processes)


def test_a_failed_process_gets_the_others_killed_after_the_grace(tmp_path):
    script = "import os, sys, time\nif os.environ['SEQPPL_PROCESS_ID'] == '1': sys.exit('boom')\n"
    job = processes.start_local(["-c", script + "time.sleep(60)"], 2, output_dir=tmp_path)
    with pytest.raises(processes.JobFailed, match=r"process 1 exited with status 1 \(boom\)"):
        processes.wait_all(job, timeout=30, grace=0.5)
    assert job.processes[0].poll() == -signal.SIGKILL


def test_run_job_returns_the_first_failure_and_names_it(tmp_path, capsys):
    script = "import os, sys; sys.exit(3 + int(os.environ['SEQPPL_PROCESS_ID']))"
    assert processes.run_job(["-c", script], 2, "job", output_dir=tmp_path) == 3
    error = capsys.readouterr().err
    assert "job: process 0 exited with status 3; process 1 exited with status 4" in error
    assert f"(output: {tmp_path})" in error


def test_logz_refuses_zero_processes(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["logz", "digit-sum", "--processes", "0"])
    assert exit_info.value.code == 2 and "--processes" in capsys.readouterr().err
