"""Several processes, one job: ``jax.distributed`` set up with stated timeouts, a launcher that
starts N local processes of one worker, and the exit of a process whose peer died.

Every process of a job runs the same program with the same arguments and key; after
``initialize``, ``jax.devices()`` lists every process's devices, a mesh over them
(``seqppl.sharding.global_mesh``) makes each process compute its own shards, and XLA's
collectives (gloo over TCP on CPU) join them. ``initialize()`` with no arguments takes the job
from the environment: ``SEQPPL_NUM_PROCESSES`` / ``SEQPPL_PROCESS_ID`` with jax's own
``JAX_COORDINATOR_ADDRESS`` (what ``start_local`` sets), else the cluster scheduler's variables as
``jax.distributed.initialize()`` reads them (Slurm, Open MPI, Kubernetes, Cloud TPU).

Faults: when a process dies, the others' next collective fails at once ("Connection closed by
peer"), and one that is not in a collective is ended by jax's coordination service when the dead
process misses its heartbeats (``heartbeat_timeout`` seconds); ``abandon`` exits on such an error
without jax's shutdown barrier, which would wait ``shutdown_timeout`` for the dead peer.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "HEARTBEAT_TIMEOUT",
    "INITIALIZATION_TIMEOUT",
    "SHUTDOWN_TIMEOUT",
    "JobFailed",
    "LocalJob",
    "initialize",
    "abandon",
    "free_port",
    "start_local",
    "wait_all",
    "describe",
    "stop",
    "run_job",
]

HEARTBEAT_TIMEOUT = 30
"""Seconds without a heartbeat after which jax's coordination service declares a process dead
and ends the others (jax's default is 100)."""
INITIALIZATION_TIMEOUT = 120
"""Seconds ``initialize`` waits for every process of the job to connect (jax's: 300)."""
SHUTDOWN_TIMEOUT = 30
"""Seconds the exit barrier waits for the other processes (jax's: 300)."""


class LocalJob(NamedTuple):
    """The processes of a ``start_local`` job (process i at index i) and its output folder."""

    processes: list
    output_dir: Path


class JobFailed(RuntimeError):
    """A local job that did not finish: a process failed and the others did not exit, or the
    job ran past its timeout. Every process of the job has been killed."""


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT,
    initialization_timeout: int = INITIALIZATION_TIMEOUT,
    shutdown_timeout: int = SHUTDOWN_TIMEOUT,
) -> tuple[int, int]:
    """``(process index, process count)`` after ``jax.distributed.initialize`` with these timeouts.

    Call it before any other jax work. Arguments left None come from ``SEQPPL_NUM_PROCESSES``,
    ``SEQPPL_PROCESS_ID`` and ``JAX_COORDINATOR_ADDRESS`` when set (``start_local``), else from
    the cluster scheduler's environment (jax's detection: Slurm's ``SLURM_NTASKS``,
    ``SLURM_PROCID``, ``SLURM_STEP_NODELIST``, ``SLURM_JOB_ID``; Open MPI's ``OMPI_*``; ...).
    CPU devices per process: jax's ``JAX_NUM_CPU_DEVICES``.

    Raises:
        ValueError: ``SEQPPL_NUM_PROCESSES`` / ``SEQPPL_PROCESS_ID`` not integers; jax's own
            errors when the job cannot be determined or a process does not connect in time.
    """
    import jax

    if num_processes is None and "SEQPPL_NUM_PROCESSES" in os.environ:
        num_processes = _environment_int("SEQPPL_NUM_PROCESSES")
    if process_id is None and "SEQPPL_PROCESS_ID" in os.environ:
        process_id = _environment_int("SEQPPL_PROCESS_ID")
    jax.distributed.initialize(
        coordinator_address,
        num_processes,
        process_id,
        heartbeat_timeout_seconds=heartbeat_timeout,
        initialization_timeout=initialization_timeout,
        shutdown_timeout_seconds=shutdown_timeout,
    )
    return jax.process_index(), jax.process_count()


def _environment_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not an integer") from None


def abandon(error: BaseException) -> None:
    """Ends this process at once with status 1 after one line on stderr naming it and ``error``:
    for a failed collective or coordination error (``jax.errors.JaxRuntimeError``), whose cause
    is usually a peer that died; jax's exit barrier, which would wait for that peer, is skipped."""
    import jax

    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    print(
        f"process {jax.process_index()} of {jax.process_count()}: the job failed, exiting "
        f"({type(error).__name__}: {first}); see the other processes' output for the cause",
        file=sys.stderr,
        flush=True,
    )
    sys.stdout.flush()
    os._exit(1)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for the coordinator)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_local(
    argv: list[str],
    num_processes: int,
    *,
    devices_per_process: int = 1,
    output_dir=None,
    env: dict | None = None,
) -> LocalJob:
    """``num_processes`` local processes of ``python *argv``, one job: each gets the job through
    ``SEQPPL_NUM_PROCESSES``, ``SEQPPL_PROCESS_ID`` and ``JAX_COORDINATOR_ADDRESS`` (for
    ``initialize()``), ``devices_per_process`` CPU devices (``JAX_NUM_CPU_DEVICES``; the CPU
    backend unless ``JAX_PLATFORMS`` is set), and one process group, the first process's.

    Output: with ``output_dir``, process i writes ``process-i.out`` and ``process-i.err`` there;
    without, process 0 writes to this terminal and the others to a temporary folder.
    """
    if num_processes < 1 or devices_per_process < 1:
        raise ValueError(
            f"num_processes and devices_per_process must be >= 1, got {num_processes} and "
            f"{devices_per_process}"
        )
    folder = Path(output_dir or tempfile.mkdtemp(prefix="seqppl-job-"))
    folder.mkdir(parents=True, exist_ok=True)
    base = {**os.environ, **(env or {})}
    base.setdefault("JAX_PLATFORMS", "cpu")
    base.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{free_port()}",
        SEQPPL_NUM_PROCESSES=str(num_processes),
        JAX_NUM_CPU_DEVICES=str(devices_per_process),
    )
    procs = []
    for i in range(num_processes):
        if i == 0 and output_dir is None:
            out, err = None, None
        else:
            out = open(folder / f"process-{i}.out", "w")
            err = open(folder / f"process-{i}.err", "w")
        group = procs[0].pid if procs else 0  # 0: a new group, led by process 0
        try:
            proc = subprocess.Popen(
                [sys.executable, *argv],
                env={**base, "SEQPPL_PROCESS_ID": str(i)},
                stdout=out,
                stderr=err,
                process_group=group,
            )
        except BaseException:
            stop(LocalJob(procs, folder))
            raise
        finally:
            for f in (out, err):
                if f is not None:
                    f.close()
        procs.append(proc)
    return LocalJob(procs, folder)


def wait_all(job: LocalJob, *, timeout: float | None = None, grace: float = HEARTBEAT_TIMEOUT + 10):
    """The exit statuses of a ``start_local`` job (a list, process order), once all have exited.

    When a process exits with a non-zero status, the others get ``grace`` seconds to exit (the
    next collective fails in each, or jax's heartbeat check ends them); then the whole process
    group is killed. Ctrl-C kills it too.

    Raises:
        JobFailed: processes still running ``grace`` seconds after a failure, or at ``timeout``
            seconds (None: no limit); the message names the first failure and the stragglers.
    """
    procs = job.processes
    started = time.monotonic()
    failed_at = None
    try:
        while True:
            codes = [p.poll() for p in procs]
            if all(c is not None for c in codes):
                return codes
            now = time.monotonic()
            if failed_at is None and any(c not in (None, 0) for c in codes):
                failed_at = now
            late = failed_at is not None and now - failed_at > grace
            if late or (timeout is not None and now - started > timeout):
                stop(job)
                running = [i for i, c in enumerate(codes) if c is None]
                why = (
                    f"{describe(job, codes)}; processes {running} were still running "
                    f"{grace:g} s later"
                    if late
                    else f"the job ran past its {timeout:g} s timeout ({describe(job, codes)})"
                )
                raise JobFailed(f"{why}: every process of the job was killed")
            time.sleep(0.05)
    except BaseException:
        stop(job)
        raise


def describe(job: LocalJob, codes) -> str:
    """The failed processes of ``job`` given their exit statuses ``codes``: status or signal, and
    the last error line of each one's stderr file ("no process failed" when none did)."""
    parts = []
    for i, code in enumerate(codes):
        if code in (None, 0):
            continue
        status = f"signal {signal.Signals(-code).name}" if code < 0 else f"status {code}"
        last = _last_line(job.output_dir / f"process-{i}.err")
        parts.append(f"process {i} exited with {status}" + (f" ({last})" if last else ""))
    return "; ".join(parts) or "no process failed"


def run_job(argv: list[str], num_processes: int, name: str, **options) -> int:
    """Runs a ``start_local`` job of ``python *argv`` to the end: the first non-zero exit status
    (its failures named on stderr after ``name``, with the folder of the processes' output), 1
    for a ``JobFailed``, 130 on Ctrl-C, else 0. ``options``: ``start_local``'s and
    ``wait_all``'s ``timeout`` and ``grace``. A temporary output folder is removed on success."""
    waits = {k: options.pop(k) for k in ("timeout", "grace") if k in options}
    job = start_local(argv, num_processes, **options)
    try:
        codes = wait_all(job, **waits)
    except JobFailed as error:
        print(f"{name}: {error} (output: {job.output_dir})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # wait_all has killed the job
        return 130
    if any(codes):
        print(f"{name}: {describe(job, codes)} (output: {job.output_dir})", file=sys.stderr)
        return next(code for code in codes if code)
    if options.get("output_dir") is None:
        shutil.rmtree(job.output_dir, ignore_errors=True)
    return 0


def _last_line(path: Path) -> str:
    """The last line of ``path`` that is not part of a stack trace dump ("" if none)."""
    if not path.exists():
        return ""
    for line in reversed(path.read_text(errors="replace").splitlines()):
        line = line.strip()
        if line and not line.startswith(("@", "***", "===", "external/", "File ", "^")):
            return line[:300]
    return ""


def stop(job: LocalJob) -> None:
    """Kills every process of ``job`` that is still running (SIGKILL to its process group) and
    reaps them all; nothing happens to a finished job (its group id may belong to another)."""
    procs = job.processes
    if any(proc.poll() is None for proc in procs):  # an unreaped member keeps the group's id
        try:
            os.killpg(procs[0].pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for proc in procs:
        proc.kill()  # a no-op on a finished process
        proc.wait()
