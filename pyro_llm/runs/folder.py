"""The output folder of a run, handled so that nothing is lost.

- A folder pyro-llm did not create is never deleted: ``--overwrite`` replaces only a pyro-llm run
  (its ``config.json`` names a kind of run), and an output folder equal to, inside, or around one of
  the run's inputs is refused.
- Everything that can be checked (options, model, adapter, data) is checked before
  :meth:`RunFolder.open` touches the disk.
- ``--overwrite`` writes the new run beside the old one (``.<name>.incoming``) and swaps it in only
  when it is complete: a failure or a kill leaves the old run whole.
- A run that was stopped before its first checkpoint never blocks its rerun: it is ours and holds
  nothing to keep, so the same command (or ``--resume``) starts it again.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import Iterable

from ..infer.checkpoint import find_checkpoint
from ..io import CorruptFileError, read_json

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


class RunFolder:
    """Decides, before any work, where a run is written and what may be replaced.

    :param out: the run folder the user named.
    :param overwrite: replace an existing pyro-llm run there (only once the new one is complete).
    :param resume: continue the run there from its checkpoint.
    :param inputs: folders and files the run reads (model, adapter, task file); ``out`` may be
        neither one of them, nor inside one, nor around one.
    """

    def __init__(self, out: str | os.PathLike, *, overwrite: bool = False, resume: bool = False,
                 inputs: Iterable[str | os.PathLike | None] = ()) -> None:
        if overwrite and resume:
            raise ValueError("--overwrite and --resume exclude each other")
        self.out = Path(out)
        here = self.out.resolve()
        for item in inputs:
            if item is None or not Path(item).exists():
                continue
            src = Path(item).resolve()
            if _inside(here, src) or _inside(src, here):
                raise ValueError(f"--out {self.out} overlaps the input {item}; choose an output folder outside it")
        if self.out.exists() and not self.out.is_dir():
            raise RunDirExistsError(f"--out {self.out} is a file, not a folder")
        if resume and not self.out.is_dir():
            raise FileNotFoundError(f"--resume: run directory {self.out} does not exist")
        self.staging = self.out.with_name(f".{self.out.name}.incoming")
        state = self._state()
        if state == "foreign":
            raise RunDirExistsError(f"--out {self.out} is not empty and is not a pyro-llm run; "
                                    "it is left untouched: choose another folder")
        if state == "run" and not (overwrite or resume):
            raise RunDirExistsError(f"--out {self.out} already holds a run; pass --overwrite to replace it "
                                    "(only once the new run is complete) or --resume to continue its training")
        if state == "run" and resume and find_checkpoint(self.out) is None:
            raise RunDirExistsError(f"--resume: {self.out} has no training checkpoint to continue from; "
                                    "pass --overwrite to replace it")
        #: nothing to resume from: a resumed run starts at step 0
        self.restart = resume and state != "run"
        #: ours and holding nothing worth keeping (stopped before its first checkpoint): start afresh there
        self._wipe = state == "unstarted"
        #: the new run goes to the staging folder and replaces the old one at the end
        self.replacing = overwrite and state == "run"
        self.path = self.staging if self.replacing else self.out

    def _state(self) -> str:
        if not self.out.exists() or not any(self.out.iterdir()):
            return "empty"
        if not is_run(self.out):
            return "foreign"
        unfinished = read_json(self.out / "config.json").get("state") == "running"
        return "unstarted" if unfinished and find_checkpoint(self.out) is None else "run"

    def open(self) -> Path:
        """Create the folder the run writes into and return it (the staging folder when replacing)."""
        if self.replacing:
            self._clear(self.staging)
        elif self._wipe:
            log.info("starting %s afresh: it was stopped before its first checkpoint", self.out)
            self._clear(self.out)
        self.path.mkdir(parents=True, exist_ok=True)
        return self.path

    @staticmethod
    def _clear(path: Path) -> None:
        """Remove ``path`` if it is ours (a pyro-llm run or our empty staging folder)."""
        if not path.exists():
            return
        if any(path.iterdir()) and not is_run(path):
            raise RunDirExistsError(f"{path} is in the way and is not a pyro-llm run; remove it yourself")
        shutil.rmtree(path)

    def commit(self) -> None:
        """Swap a completed replacement into place (the old run goes only after the new one is there)."""
        if not self.replacing or not self.staging.exists():
            return
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
        if exc_type is None:
            self.commit()
        else:
            self.discard()
