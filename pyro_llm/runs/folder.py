"""The output folder of a run, handled so that nothing is lost.

- A folder pyro-llm did not create is never deleted: ``--overwrite`` replaces only a pyro-llm run
  (its ``config.json`` names a kind of run), and an output folder equal to, inside, or around one of
  the run's inputs is refused.
- Everything that can be checked (options, model, adapter, data) is checked before
  :meth:`RunFolder.open` touches the disk.
- ``--overwrite`` writes the new run beside the old one (``.<name>.incoming``) and swaps it in only
  when it is complete: a failure or a kill leaves the old run whole.
- A run that was stopped before its first checkpoint never blocks its rerun: it is ours and holds
  nothing to keep, so the same command (or ``--resume``) starts it again. So does a kill at any
  other instant: a folder holding only pyro-llm's own temporary files (``.<file>.XXXX.tmp``,
  ``.checkpoint.XXXX/``) is treated as empty, a staging folder left by a killed ``--overwrite`` is
  removed, and a kill between the swap's two renames is finished (the new run complete) or undone
  (the old run restored) by the next command on that folder.
- One writer at a time (:class:`~.lock.RunLock`): a second command on the same folder is refused
  with a message naming the first; the lock of a killed command does not count.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from types import TracebackType
from typing import Iterable

from ..infer.checkpoint import find_checkpoint
from ..io import CorruptFileError, read_json
from .lock import RunLock

__all__ = ["RUN_KINDS", "RunDirExistsError", "RunFolder", "is_run"]

log = logging.getLogger(__name__)

#: The ``kind`` a run's ``config.json`` records.
RUN_KINDS = ("svi", "laplace", "zero-shot")


class RunDirExistsError(FileExistsError):
    """The output folder holds something that the requested mode may not replace."""


def is_run(path: Path) -> bool:
    """``path`` is a folder holding a pyro-llm run (its ``config.json`` names a run kind)."""
    try:
        return (path / "config.json").is_file() and read_json(path / "config.json").get("kind") in RUN_KINDS
    except (CorruptFileError, AttributeError, OSError):
        return False


def _inside(a: Path, b: Path) -> bool:
    return a == b or b in a.parents


#: What pyro-llm leaves only when killed mid-write: atomic writes' temporary siblings and
#: checkpoints' staging folders (:mod:`pyro_llm.io`, :mod:`pyro_llm.infer.checkpoint`)
_TRANSIENT = re.compile(r"^\..+\.tmp(\.\w+)?$|^\.checkpoint\..+$")
#: the file that marks a staging folder as pyro-llm's from the moment it exists
STAGING_MARK = ".pyro-llm-staging"


def _transient(path: Path) -> bool:
    return bool(_TRANSIENT.match(path.name))


def remove_transient(folder: Path) -> None:
    """Remove what killed writes left in ``folder`` (temporary files, checkpoint staging folders)."""
    if not folder.is_dir():
        return
    for item in folder.iterdir():
        if _transient(item):
            shutil.rmtree(item) if item.is_dir() and not item.is_symlink() else item.unlink(missing_ok=True)


def _contents(path: Path) -> list[Path]:
    """What ``path`` holds beyond pyro-llm's transient files and its staging mark."""
    return [p for p in path.iterdir() if not _transient(p) and p.name != STAGING_MARK]


class RunFolder:
    """Decides, before any work, where a run is written and what may be replaced.

    :param out: the run folder the user named.
    :param overwrite: replace an existing pyro-llm run there (only once the new one is complete).
    :param resume: continue the run there from its checkpoint.
    :param inputs: folders and files the run reads (model, adapter, task file); ``out`` may be
        neither one of them, nor inside one, nor around one.
    :param lock: hold the folder's :class:`~.lock.RunLock` from now until :meth:`release` (or the
        end of the ``with`` block); other ranks of a distributed job pass ``False``.

    The decisions are taken under the lock; call :meth:`release` if the run fails before its
    ``with`` block (the run functions do).
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = (), lock: bool = True) -> None:
        if overwrite and resume:
            raise ValueError("--overwrite and --resume exclude each other")
        self.out = Path(out)
        self._lock = RunLock(self.out)
        self._check_inputs(inputs)  # before the lock: a refused output never takes it
        if lock:
            self._lock.acquire()
        try:
            self._decide(overwrite, resume)
        except BaseException:
            self.release()
            raise

    def release(self) -> None:
        """Let other commands write this folder (idempotent)."""
        self._lock.release()

    def _check_inputs(self, inputs: Iterable[str | os.PathLike | None]) -> None:
        here = self.out.resolve()
        for item in inputs:
            if item is None or not Path(item).exists():
                continue
            src = Path(item).resolve()
            if _inside(here, src) or _inside(src, here):
                raise ValueError(f"--out {self.out} overlaps the input {item}; choose an output folder outside it")

    def _recover(self) -> None:
        """Finish or undo what a killed command left beside the folder (module docstring)."""
        replaced = self.out.with_name(f".{self.out.name}.replaced")
        staging = self.out.with_name(f".{self.out.name}.incoming")
        if not self.out.exists() and replaced.is_dir() and is_run(replaced):
            done = is_run(staging) and read_json(staging / "config.json").get("state") == "finished"
            log.warning("%s: a replacement was interrupted between its renames; %s", self.out,
                        "completing it" if done else "restoring the old run")
            os.replace(staging if done else replaced, self.out)
        if self.out.is_dir() and replaced.is_dir() and is_run(replaced):
            shutil.rmtree(replaced)
        if staging.is_dir() and (is_run(staging) or (staging / STAGING_MARK).exists() or not _contents(staging)):
            shutil.rmtree(staging)  # a replacement that never completed: the run in --out is whole
        remove_transient(self.out)

    def _decide(self, overwrite: bool, resume: bool) -> None:
        if self.out.exists() and not self.out.is_dir():
            raise RunDirExistsError(f"--out {self.out} is a file, not a folder")
        if self._lock.held:
            self._recover()
        self.staging = self.out.with_name(f".{self.out.name}.incoming")
        state = self._state()
        if state == "foreign":
            raise RunDirExistsError(f"--out {self.out} is not empty and is not a pyro-llm run; "
                                    "it is left untouched: choose another folder")
        if state == "run" and not (overwrite or resume):
            raise RunDirExistsError(f"--out {self.out} already holds a run; pass --overwrite to replace it "
                                    "(only once the new run is complete) or --resume to continue its training")
        if state == "run" and resume and read_json(self.out / "config.json").get("state") == "finished":
            raise RunDirExistsError(f"--resume: {self.out} holds a finished run; there is nothing to continue "
                                    "(pass --overwrite to train it again)")
        if state == "run" and resume and find_checkpoint(self.out) is None:
            raise RunDirExistsError(f"--resume: {self.out} has no training checkpoint to continue from; "
                                    "pass --overwrite to replace it")
        if resume and state != "run":
            log.warning("--resume: %s holds no started run; starting it from step 0", self.out)
        #: nothing to resume from: a resumed run starts at step 0
        self.restart = resume and state != "run"
        #: ours and holding nothing worth keeping (stopped before its first checkpoint): start afresh there
        self._wipe = state == "unstarted"
        #: the new run goes to the staging folder and replaces the old one at the end
        self.replacing = overwrite and state == "run"
        self.path = self.staging if self.replacing else self.out

    def _state(self) -> str:
        if not self.out.exists() or not _contents(self.out):
            return "empty"
        if not is_run(self.out):
            return "foreign"
        unfinished = read_json(self.out / "config.json").get("state") == "running"
        return "unstarted" if unfinished and find_checkpoint(self.out) is None else "run"

    def open(self) -> Path:
        """Create the folder the run writes into and return it (the staging folder when replacing)."""
        if self.replacing:
            self._clear(self.staging)
            self.staging.mkdir(parents=True)
            (self.staging / STAGING_MARK).touch()
        elif self._wipe:
            log.info("starting %s afresh: it was stopped before its first checkpoint", self.out)
            self._clear(self.out)
        elif self.out.is_dir():
            remove_transient(self.out)
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    @staticmethod
    def _clear(path: Path) -> None:
        """Remove ``path`` if it is ours (a pyro-llm run or our empty staging folder)."""
        if not path.exists():
            return
        if _contents(path) and not is_run(path) and not (path / STAGING_MARK).exists():
            raise RunDirExistsError(f"{path} is in the way and is not a pyro-llm run; remove it yourself")
        shutil.rmtree(path)

    def commit(self) -> None:
        """Swap a completed replacement into place (the old run goes only after the new one is there)."""
        if not self.replacing or not self.staging.exists():
            return
        (self.staging / STAGING_MARK).unlink(missing_ok=True)
        remove_transient(self.staging)
        old = self.out.with_name(f".{self.out.name}.replaced")
        self._clear(old)
        os.replace(self.out, old)
        os.replace(self.staging, self.out)
        shutil.rmtree(old)

    def discard(self) -> None:
        """After a failure: drop the unfinished replacement; the old run stays as it was."""
        if self.replacing and self.staging.exists():
            shutil.rmtree(self.staging)

    def __enter__(self) -> Path:
        return self.open()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                remove_transient(self.path)
                self.commit()
            else:
                self.discard()
        finally:
            self.release()
