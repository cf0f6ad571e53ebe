"""Several `megatune` commands in one set of worker processes (test support).

Every `megatune train|verify|export` run of the suite used to start fresh interpreters: a launcher
and one worker per rank, each importing torch, Megatron and transformers (about 12 s of CPU per
process on a 2-core machine), for runs whose own work takes a few seconds. `run_batch` starts
`nproc` workers once and has each call `megatune.cli.main(argv)` for every case in turn, exactly as
a worker started by megatune's launcher does (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment; the pre-flight checks run in every rank since no launcher ran them). Each case gets
its own rendezvous port, its own process group and Megatron parallel state (the command sets them
up and tears them down itself; rank 0 picks the port just before the case, as megatune's launcher
does, and hands it to the others through a file), and its own stdout/stderr files.

What this does not exercise is megatune's launcher (spawning, signal forwarding, one error
message per failed run): tests of those keep starting `megatune` as a user does
(tests/test_safety.py, tests/test_train.py, tests/test_ux.py).

A case that raises stops its worker (os._exit) so that the other ranks, waiting in a
collective, fail too instead of hanging; the cases after it then have no result and their
tests fail with the batch's output.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass
class Run:
    """What one `megatune` command left: the launcher's exit code (0, or the first failing
    rank's), every rank's stdout (rank 0 first) and stderr."""

    returncode: int
    stdout: str
    stderr: str


def nproc_of(flags: list[str]) -> int:
    """The process count a `megatune` command line asks for (--nproc_per_node, default 1)."""
    return int(flags[flags.index("--nproc_per_node") + 1]) if "--nproc_per_node" in flags else 1


PEER_GRACE_S = 10.0  # after a worker dies, how long the others may take to fail on their own


def run_batch(cases: dict[str, list[str]], nproc: int, folder: Path, timeout: int = 1800) -> dict[str, Run]:
    """Run `megatune <argv>` for each case (in dict order) in one set of `nproc` processes.

    Returns {case name: Run}; a case that has no result (its batch died or ran past `timeout`
    seconds before it finished) maps to a Run with returncode -1 whose stderr holds the tail of
    the workers' output."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "batch.json"
    spec.write_text(json.dumps({"out": str(folder), "cases": [[name, argv] for name, argv in cases.items()]}))
    base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
            "OMP_NUM_THREADS": "1"}
    logs = [open(folder / f"worker{r}.log", "w") for r in range(nproc)]
    procs = [subprocess.Popen([sys.executable, __file__, str(spec)], cwd=REPO, stdout=logs[r], stderr=subprocess.STDOUT,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(nproc)]
    deadline, died_at = time.monotonic() + timeout, None
    try:
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if died_at is None and any(p.returncode not in (None, 0) for p in procs):
                died_at = time.monotonic()  # a peer may wait in a collective until its timeout
            if died_at is not None and time.monotonic() - died_at > PEER_GRACE_S:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    results = {}
    for name in cases:
        codes = [(folder / f"{name}.rank{r}.rc").read_text().strip() if (folder / f"{name}.rank{r}.rc").is_file()
                 else None for r in range(nproc)]
        if None in codes:
            tail = "".join((folder / f"worker{r}.log").read_text()[-4000:] for r in range(nproc))
            results[name] = Run(-1, "", f"case {name!r} has no result (batch exit codes "
                                        f"{[p.returncode for p in procs]}):\n{tail}")
            continue
        failed = [int(c) for c in codes if int(c) != 0]
        results[name] = Run(failed[0] if failed else 0,
                            "".join((folder / f"{name}.rank{r}.stdout").read_text() for r in range(nproc)),
                            "".join((folder / f"{name}.rank{r}.stderr").read_text() for r in range(nproc)))
    return results


class Batches:
    """A test module's `megatune` runs, grouped into batches (one `run_batch` each) that run
    once, when a test first asks for one of their cases.

    `add(name, argv, nproc, batch=None, after=(), prepare=None)`: a case of batch `batch`
    (default: named by its world size) run by `nproc` processes; the batches named in `after`
    run first (e.g. an export of a checkpoint another batch trains), then `prepare()` (e.g. copy
    that checkpoint where the case resumes from it). `get(name)` -> Run."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.cases: dict[str, dict[str, list[str]]] = {}
        self.nproc: dict[str, int] = {}
        self.after: dict[str, tuple[str, ...]] = {}
        self.batch_of: dict[str, str] = {}
        self.prepare: dict[str, list] = {}
        self.results: dict[str, dict[str, Run]] = {}

    def add(self, name: str, argv: list[str], nproc: int, batch: str | None = None, after: tuple[str, ...] = (),
            prepare=None) -> None:
        batch = batch or f"world{nproc}"
        if self.nproc.setdefault(batch, nproc) != nproc:
            raise ValueError(f"batch {batch!r} runs {self.nproc[batch]} processes, case {name!r} needs {nproc}")
        if name in self.batch_of:
            raise ValueError(f"case {name!r} added twice")
        self.cases.setdefault(batch, {})[name] = [str(a) for a in argv]
        self.after[batch] = tuple(after) or self.after.get(batch, ())
        self.batch_of[name] = batch
        if prepare is not None:
            self.prepare.setdefault(batch, []).append(prepare)

    def _run(self, batch: str) -> None:
        if batch in self.results:
            return
        for earlier in self.after[batch]:
            self._run(earlier)
        for step in self.prepare.get(batch, []):
            step()
        self.results[batch] = run_batch(self.cases[batch], self.nproc[batch], self.folder / batch)

    def get(self, name: str) -> Run:
        batch = self.batch_of[name]
        self._run(batch)
        return self.results[batch][name]


def _redirected(path_out: str, path_err: str):
    """Point file descriptors 1 and 2 at the case's files; returns the saved descriptors."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    for fd, path in ((1, path_out), (2, path_err)):
        target = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)
    return saved


def _restore(saved) -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    for fd, old in zip((1, 2), saved):
        os.dup2(old, fd)
        os.close(old)


PORT_WAIT_S = 1500  # how long a rank waits for rank 0 to reach the next case


def _case_port(out: Path, name: str, rank: int) -> int:
    """The case's rendezvous port: rank 0 takes a free one (as late as possible, so nothing else
    takes it first) and publishes it in `out/<name>.port`; the other ranks read it from there."""
    path = out / f"{name}.port"
    if rank == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        path.with_suffix(".tmp").write_text(str(port))
        path.with_suffix(".tmp").rename(path)
        return port
    deadline = time.monotonic() + PORT_WAIT_S
    while not path.is_file():
        if time.monotonic() > deadline:
            raise TimeoutError(f"rank 0 did not reach case {name!r} in {PORT_WAIT_S} s")
        time.sleep(0.05)
    return int(path.read_text())


def _worker(spec_path: str) -> None:
    import traceback

    from megatune.cli import main

    spec = json.loads(Path(spec_path).read_text())
    out, rank = Path(spec["out"]), int(os.environ["RANK"])
    for name, argv in spec["cases"]:
        os.environ["MASTER_PORT"] = str(_case_port(out, name, rank))
        saved = _redirected(str(out / f"{name}.rank{rank}.stdout"), str(out / f"{name}.rank{rank}.stderr"))
        crashed = False
        try:
            code = main(list(argv))
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
        except BaseException:  # noqa: BLE001 - recorded, then this worker stops (see the module doc)
            traceback.print_exc()
            code, crashed = 1, True
        finally:
            _restore(saved)
        (out / f"{name}.rank{rank}.rc").write_text(str(code))
        print(f"case {name}: exit code {code}", flush=True)
        if crashed:
            os._exit(70)


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    _worker(sys.argv[1])
