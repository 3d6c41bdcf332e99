"""``python -m seqppl.distributed logz MODEL [options]``: one process of a multi-process job.

Every process of the job runs this same command. It calls ``seqppl.processes.initialize()``
(``jax.distributed.initialize`` with seqppl's timeouts; the job from ``SEQPPL_NUM_PROCESSES``,
``SEQPPL_PROCESS_ID`` and ``JAX_COORDINATOR_ADDRESS`` when set, as ``seqppl logz --processes N``
sets them, else from the cluster scheduler's environment, e.g. under Slurm's ``srun``), then runs
``seqppl logz`` with a mesh over every process's devices (``seqppl.sharding.global_mesh``): each
process draws its shards, and the estimate, identical on every process, is printed by process 0
(the others' is discarded; output written below Python, such as gloo's connection lines, goes
to stderr). A failed collective (a process that died) ends the
process at once with status 1 and a one-line message (``seqppl.processes.abandon``).

Example under Slurm (two nodes, one task per node): ``srun --nodes 2 --ntasks-per-node 1 python
-m seqppl.distributed logz digit-sum --method is --num-samples 10000000``.
"""

from __future__ import annotations

import os
import sys

from seqppl import cli, processes

__all__ = ["main", "COMMANDS"]

COMMANDS = ("logz",)
"""The ``seqppl`` commands that run over several processes."""


def main(argv: list[str] | None = None) -> int:
    """Runs ``seqppl COMMAND ...`` as one process of a job; returns the exit status (process 0's
    output only). Refuses other commands, and ``--processes`` (the job is already started)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in COMMANDS:
        print(
            f"usage: python -m seqppl.distributed {{{','.join(COMMANDS)}}} ... (got "
            f"{' '.join(argv) or 'nothing'}): the commands that run over several processes",
            file=sys.stderr,
        )
        return 2
    if any(arg == "--processes" or arg.startswith("--processes=") for arg in argv):
        print("python -m seqppl.distributed: --processes is the local launcher's", file=sys.stderr)
        return 2
    import jax

    index, _ = processes.initialize()
    sys.stdout.flush()  # then file descriptor 1 becomes stderr (collectives' C++ chatter goes
    results = os.dup(1)  # there) and Python's print writes process 0's results to the real one
    os.dup2(2, 1)
    sys.stdout = os.fdopen(results, "w", buffering=1) if index == 0 else open(os.devnull, "w")
    try:
        return cli.main(argv)
    except jax.errors.JaxRuntimeError as error:
        processes.abandon(error)
        raise  # not reached: abandon exits


if __name__ == "__main__":
    sys.exit(main())
