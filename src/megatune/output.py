"""Console output that cannot fail: `megatune train ... | tee log` and then Ctrl-C ends `tee`
first, and the next print would raise BrokenPipeError in the middle of saving a checkpoint."""

from __future__ import annotations

import errno
import os
import sys


class _GuardedStream:
    """Wraps sys.stdout/sys.stderr; the first write or flush that fails because the reader has
    gone sends this stream (and its file descriptor) to /dev/null for the rest of the run."""

    def __init__(self, stream):
        self._stream = stream

    def _lost(self) -> None:
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, self._stream.fileno())  # so interpreter shutdown's flush succeeds too
        except (OSError, ValueError):
            pass
        finally:
            os.close(devnull)
        self._stream = open(os.devnull, "w")

    def _guarded(self, call, *args):
        """Run a stream call; a closed pipe (or tty) silences the stream instead of raising."""
        try:
            return call(*args)
        except (BrokenPipeError, ConnectionResetError):
            self._lost()
        except OSError as err:
            if err.errno not in (errno.EPIPE, errno.EIO):
                raise
            self._lost()
        return None

    def write(self, text):
        written = self._guarded(lambda t: self._stream.write(t), text)
        return len(text) if written is None else written

    def flush(self):
        self._guarded(lambda: self._stream.flush())

    def __getattr__(self, name):
        return getattr(self._stream, name)


def guard_output_streams() -> None:
    """Install the guard on sys.stdout and sys.stderr (idempotent)."""
    for name in ("stdout", "stderr"):
        stream = getattr(sys, name)
        if stream is not None and not isinstance(stream, _GuardedStream):
            setattr(sys, name, _GuardedStream(stream))
