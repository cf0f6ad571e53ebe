"""Errors across ranks: the failing rank writes a report, its peers exit quietly, and the
launcher prints one message once.

Under megatune's own launcher (`launch.py`) every worker gets `MEGATUNE_FAILURE_DIR`. A rank that
fails writes `rank_R.json` there ({rank, time, code, lines, traceback}) before it exits; a rank
whose collective then breaks because that peer is gone finds the report and exits at once
without printing. The launcher prints the earliest report. Under an external launcher
(torchrun) there is no directory and each failing rank prints its own message.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

ENV = "MEGATUNE_FAILURE_DIR"


def failure_dir() -> Path | None:
    value = os.environ.get(ENV)
    return Path(value) if value else None


def report(rank: int, lines: list[str], code: int, traceback: str | None = None) -> bool:
    """Record this rank's failure for the launcher; False when there is no launcher to tell."""
    folder = failure_dir()
    if folder is None:
        return False
    record = {"rank": rank, "time": time.time(), "code": code, "lines": lines, "traceback": traceback}
    tmp = folder / f".rank_{rank}.json"
    tmp.write_text(json.dumps(record))
    os.replace(tmp, folder / f"rank_{rank}.json")  # whole or absent, never half-written
    return True


def reports(folder: Path | None = None) -> list[dict]:
    """All reports written so far, earliest first."""
    folder = folder or failure_dir()
    if folder is None or not folder.is_dir():
        return []
    found = []
    for path in folder.glob("rank_*.json"):
        try:
            found.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    return sorted(found, key=lambda r: r["time"])


def peer_failed(rank: int) -> bool:
    """True when another rank has reported a failure (this rank's error is its consequence)."""
    return any(r["rank"] != rank for r in reports())


def exit_now(code: int) -> None:
    """Leave without tearing down the process group (a dead peer can hang the teardown)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # noqa: BLE001
            pass
    os._exit(code)


def print_report(record: dict) -> None:
    """The launcher's one message for a failed run."""
    if record.get("traceback"):
        sys.stderr.write(record["traceback"])
    for line in record["lines"]:
        print(f"megatune: error: {line}", file=sys.stderr)
    sys.stderr.flush()
