"""Several `megatune` commands in one set of worker processes (test support).

Every `megatune train|verify|export` run of the suite used to start fresh interpreters: a launcher
and one worker per rank, each importing torch, Megatron and transformers (about 12 s of CPU per
process on the CI's 2 cores), for runs whose own work takes a few seconds. `run_batch` starts
`nproc` workers once and has each call `megatune.cli.main(argv)` for every case in turn, exactly as
a worker started by megatune's launcher does (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the
environment; the pre-flight checks run in every rank since no launcher ran them). Each case gets
its own rendezvous port, its own process group and Megatron parallel state (the command sets them
up and tears them down itself), and its own stdout/stderr files.

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


def _free_ports(count: int) -> list[int]:
    """`count` distinct free TCP ports (held open together while picked, so none repeats)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_batch(cases: dict[str, list[str]], nproc: int, folder: Path, timeout: int = 1800,
              env: dict | None = None) -> dict[str, Run]:
    """Run `megatune <argv>` for each case (in dict order) in one set of `nproc` processes.

    Returns {case name: Run}; a case that has no result (its batch died or timed out before it
    finished) maps to a Run with returncode -1 whose stderr holds the batch's output tail."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    ports = _free_ports(len(cases))
    spec = folder / "batch.json"
    spec.write_text(json.dumps({"out": str(folder), "cases": [[name, argv, port] for (name, argv), port
                                                              in zip(cases.items(), ports)]}))
    base = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "WORLD_SIZE": str(nproc),
            "LOCAL_WORLD_SIZE": str(nproc), "OMP_NUM_THREADS": "1"}
    logs = [open(folder / f"worker{r}.log", "w") for r in range(nproc)]
    procs = [subprocess.Popen([sys.executable, __file__, str(spec)], cwd=REPO, stdout=logs[r], stderr=subprocess.STDOUT,
                              env={**base, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(nproc)]
    try:
        for p in procs:
            p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pass
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


def _worker(spec_path: str) -> None:
    import traceback

    from megatune.cli import main

    spec = json.loads(Path(spec_path).read_text())
    out, rank = Path(spec["out"]), int(os.environ["RANK"])
    for name, argv, port in spec["cases"]:
        os.environ["MASTER_PORT"] = str(port)
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
