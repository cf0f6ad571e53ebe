"""Start N local worker processes through torch's elastic launcher, or join an external torchrun."""

from __future__ import annotations

import os
import sys
import uuid

from megatune.distributed import free_port


def under_launcher() -> bool:
    """True inside torchrun/our own launcher (or any launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def launch_workers(nproc: int, argv: list[str]) -> int:
    """Run `python -m megatune <argv>` in `nproc` processes; return 0 if all succeeded, else 1."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # Workers share the cores; without this each would start one thread per core.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=nproc,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",
        rdzv_endpoint=f"127.0.0.1:{free_port()}",
        max_restarts=0,
        monitor_interval=0.2,
    )
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "megatune", *argv)
    except ChildFailedError:
        return 1
    return 0
