"""``plugtune run RECIPE --nproc N``: the same recipe data-parallel in N processes.

The launcher is torch's own (``python -m torch.distributed.run --standalone``), the one
``accelerate launch`` and ``torchrun`` use; every process runs ``plugtune run`` and the
training loop's :class:`accelerate.Accelerator` reads the rank and world size from the
environment, wraps the model in DDP (gloo on CPUs, NCCL on GPUs) and averages gradients.
``accelerate launch -m plugtune.cli run RECIPE`` and ``torchrun -m plugtune.cli run RECIPE``
do the same with their own options (GPUs, several nodes: see README "Several processes").

``training.distributed`` chooses how the processes hold the model: ``ddp`` (the default)
as above; ``fsdp`` shards its parameters, gradients and optimizer state over them with
torch's FSDP2 (core/training/sharding.py; the accelerator is then not handed the model), so
each holds about 1/N of them. The same launchers start either; tests/test_fsdp.py runs it
with two gloo processes through this one.

How the processes split the work (core/train.py, core/batching.py): ``training.batch_size``
is the global batch; every process computes the same batch order from ``(seed, epoch)`` and
takes every N-th row of each batch; the loss is normalised by the global number of label
tokens, so the update equals a single process's on the whole batch (up to float summation
order). Only the main process logs, evaluates and saves the adapter.
"""

from __future__ import annotations

import os
import subprocess
import sys


def in_distributed_run() -> bool:
    """True inside a process started by a distributed launcher."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


def launch_command(nproc: int, cli_args: list[str]) -> list[str]:
    """The command that runs ``plugtune <cli_args>`` in ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "plugtune.cli", *cli_args]


def launch(nproc: int, cli_args: list[str]) -> int:
    """Run ``plugtune <cli_args>`` in ``nproc`` processes; returns the launcher's exit code
    (non-zero when any process failed).

    Ctrl-C reaches the launcher too (same process group), which forwards it to the workers
    (they run in sessions of their own): they agree to stop, save a checkpoint and exit. So
    this process keeps waiting for the launcher rather than killing it, which would leave
    the workers finishing on their own after the prompt has come back."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(launch_command(nproc, cli_args), env=env)
    interrupted = False
    while True:
        try:
            code = process.wait()
        except KeyboardInterrupt:
            interrupted = True
            continue
        return 130 if interrupted and code else code  # torchrun exits 1 after forwarding a signal
