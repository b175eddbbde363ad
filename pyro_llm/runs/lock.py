"""One writer per run folder: an advisory lock beside it, released by the kernel when its holder dies.

The lock is the file ``.<name>.lock`` next to the run folder (not inside it: the folder itself is
swapped by ``--overwrite``), held with ``flock`` for as long as a command writes the run. A second
writer is refused at once with a message naming the holder (its process id, host, command and
start time, which the holder writes into the file); a lock file whose holder has died holds no
``flock`` and is simply taken over, so a kill never blocks a rerun. The holder removes the file
when it is done. Where ``fcntl`` does not exist (Windows) runs are not locked.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["RunLock", "RunLockedError", "lock_path"]

#: locks this process holds, by lock file: taking one again (recording an evaluation inside a
#: training run that holds its folder) nests instead of conflicting with itself
_HELD: dict[Path, int] = {}


class RunLockedError(RuntimeError):
    """Another live process is writing the same run folder."""


def lock_path(run_dir: Path) -> Path:
    """The lock file of ``run_dir``: ``.<name>.lock`` beside it."""
    return run_dir.with_name(f".{run_dir.name}.lock")


class RunLock:
    """An exclusive, non-blocking lock on ``run_dir`` (module docstring); a context manager.

    :param wait: seconds to wait for another holder to finish (``0``: refuse at once). Commands
        that only add an evaluation to a finished run wait a little; training and fitting do not.
    """

    def __init__(self, run_dir: str | os.PathLike, *, wait: float = 0.0) -> None:
        self.run_dir = Path(run_dir)
        self.path = lock_path(self.run_dir)
        self.wait = wait
        self._fd: int | None = None
        self._nested = False

    @property
    def held(self) -> bool:
        return self._fd is not None or self._nested

    def acquire(self) -> "RunLock":
        if fcntl is None or self.held:
            return self
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = self.path.resolve()
        if key in _HELD:
            _HELD[key] += 1
            self._nested = True
            return self
        deadline = time.monotonic() + self.wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                if time.monotonic() >= deadline:
                    raise RunLockedError(f"{self.run_dir} is being written by another pyro-llm process "
                                         f"({self._holder()}); wait for it to finish or choose another folder") from None
                time.sleep(0.2)
                continue
            # the file may have been removed by the holder that just released it: lock the one on disk
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            break
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        _HELD[key] = 1
        return self

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            info = {}
        if not info:
            return f"lock {self.path}"
        return (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}: {info.get('command')}; "
                f"lock {self.path}")

    def release(self) -> None:
        if self._nested:
            _HELD[self.path.resolve()] -= 1
            self._nested = False
            return
        if self._fd is None:
            return
        _HELD.pop(self.path.resolve(), None)
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody can have taken this file meanwhile
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()

    def __del__(self) -> None:  # a holder dropped without release (an exception before its with-block)
        try:
            self.release()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
