"""Start N local worker processes, or join an external torchrun.

megatune's own launcher (no torch elastic agent): it sets the env:// variables, starts the
workers in their own session so a terminal's Ctrl-C reaches only the launcher, forwards each
SIGINT/SIGTERM it receives to every worker exactly once (they save at the next step boundary;
a second signal stops them at once), and waits for them however long the save takes. When a
worker fails, the others get a few seconds to notice and are then killed; the launcher prints
the failing rank's message once (`failures.py`) and exits with its code. Exit code: 0, the
failing worker's code, or 128 + signal when a signal stopped the run.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from megatune import failures

CHECKED_ENV = "MEGATUNE_PREFLIGHT_DONE"  # the launcher has run the pre-flight checks
PEER_GRACE_S = 5.0  # after a worker fails, how long the others may take to exit on their own


def under_launcher() -> bool:
    """True inside torchrun/our own launcher (or any launcher that sets the env:// variables)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def _die_with_launcher() -> None:
    """In the child before exec: get SIGTERM (save and stop) if the launcher dies (Linux)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def launch_workers(nproc: int, argv: list[str]) -> int:
    """Run `python -m megatune <argv>` in `nproc` processes and return the run's exit code."""
    from megatune.distributed import free_port  # torch: only once workers really start

    folder = Path(tempfile.mkdtemp(prefix="megatune-failures-"))
    base = {
        **os.environ,
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
        "WORLD_SIZE": str(nproc),
        "LOCAL_WORLD_SIZE": str(nproc),
        failures.ENV: str(folder),
        CHECKED_ENV: "1",
    }
    # Workers share the cores; without this each would start one thread per core.
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs = [
        subprocess.Popen([sys.executable, "-m", "megatune", *argv],
                         env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
                         start_new_session=True, preexec_fn=_die_with_launcher)
        for r in range(nproc)
    ]
    received: list[int] = []

    def forward(signum, frame):
        received.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        failed_at = None
        first_failure = None
        while any(p.poll() is None for p in procs):
            if failed_at is None:
                for rank, p in enumerate(procs):
                    if p.returncode not in (None, 0):
                        failed_at, first_failure = time.monotonic(), (rank, p.returncode)
                        break
            if failed_at is not None and not received and time.monotonic() - failed_at > PEER_GRACE_S:
                for p in procs:
                    if p.poll() is None:
                        p.kill()
            time.sleep(0.1)
        if first_failure is None:
            first_failure = next(((r, p.returncode) for r, p in enumerate(procs) if p.returncode), None)
        found = failures.reports(folder)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        shutil.rmtree(folder, ignore_errors=True)
    if received:
        return 128 + received[0]
    if first_failure is None:
        return 0
    if found:
        failures.print_report(found[0])
        return found[0]["code"]
    rank, code = first_failure
    how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
    print(f"megatune: error: rank {rank} {how} without a message (out of memory?)", file=sys.stderr)
    return 1
