"""One run kept in a folder: its files, its lock, reading and writing them (:class:`RunFolder`).

The layout and the rules are in :mod:`uap.runs`; what to do with a folder's contents is
:mod:`uap.runs.decisions`, crafting into it :mod:`uap.runs.craft`.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from torch import nn

from uap.atomic import atomic_write
from uap.perturbation import Perturbation
from uap.runs.decisions import decide
from uap.runs.errors import RunError
from uap.runs.lock import RunLock
from uap.runs.record import jsonable

if TYPE_CHECKING:
    from uap.runs.craft import RunResult

__all__ = ["RunFolder", "Artefacts", "Callback"]

Callback = Callable[[dict], Any]
#: ``artefacts(run, perturbation)``: writes a finished run's extra files (before the marker).
Artefacts = Callable[["RunFolder", Perturbation], None]


class RunFolder:
    """The run ``name`` kept in ``folder`` (see :mod:`uap.runs` for files and rules).

    Nothing touches the disk until :meth:`lock` (which creates the folder). Every method
    that writes must be called with the lock held; :meth:`craft` takes it itself.
    """

    def __init__(self, folder: str | os.PathLike, name: str = "perturbation"):
        name = str(name)
        if not name or name.startswith(".") or any(c in name for c in "/\\\0") or name != name.strip():
            raise ValueError(f"{name!r} cannot name the files of a run in {folder}: use a plain file name")
        self.folder = Path(folder)
        self.name = name
        self._lock = RunLock(self.folder, name)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.folder)!r}, name={self.name!r})"

    # ------------------------------------------------------------------ paths
    def path(self, suffix: str) -> Path:
        """``NAME<suffix>`` in the folder (e.g. ``".png"``: a file a caller adds to the run)."""
        return self.folder / f"{self.name}{suffix}"

    @property
    def result_path(self) -> Path:
        """``NAME.safetensors``: the finished perturbation (with its ``NAME.json``)."""
        return self.path(".safetensors")

    @property
    def checkpoint_path(self) -> Path:
        """``NAME.partial.safetensors``: the checkpoint of an unfinished run (with its ``.json``)."""
        return self.path(".partial.safetensors")

    @property
    def marker_path(self) -> Path:
        """``NAME.settings.json``: the record of the finished run, written last."""
        return self.path(".settings.json")

    @property
    def lock_path(self) -> Path:
        """``NAME.lock``: the lock file (holds the writer's pid while it writes)."""
        return self._lock.path

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self) -> Iterator["RunFolder"]:
        """Hold the run's exclusive lock for the ``with`` block (:class:`uap.runs.lock.RunLock`:
        creates the folder; :class:`~uap.runs.errors.RunLocked` at once if another process holds
        it). Re-entrant on this object."""
        with self._lock.hold():
            yield self

    def _require_lock(self) -> None:
        if not self._lock.held:
            raise RuntimeError(f"{self!r}: hold its lock (`with run.lock():`) while writing it")

    # ------------------------------------------------------------------ reading
    def finished(self) -> dict[str, Any] | None:
        """The record of the finished run in the folder, or None (no marker, or unreadable)."""
        try:
            record = json.loads(self.marker_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        return record if isinstance(record, dict) else None

    def load(self) -> Perturbation:
        """The finished perturbation (``FileNotFoundError``/``ValueError`` if missing or damaged)."""
        return Perturbation.load(self.result_path)

    def load_checkpoint(self) -> Perturbation | None:
        """The checkpoint of an unfinished run, or None if there is none.

        Raises :class:`RunError` for a checkpoint that cannot be read.
        """
        if not self.checkpoint_path.is_file():
            return None
        try:
            return Perturbation.load(self.checkpoint_path)
        except (OSError, ValueError) as e:
            raise RunError(f"cannot read the checkpoint {self.checkpoint_path} ({e}); "
                           "pass force=True (--force) to discard it and start over") from None

    # ------------------------------------------------------------------ decisions
    def prepare(self, record: Mapping[str, Any], *, resume: bool = False, force: bool = False,
                replace: bool = False) -> tuple[str, Perturbation | None]:
        """Decide what to do for a run with ``record`` (:func:`uap.runs.decisions.decide`).

        Returns ``("reuse", finished perturbation)``, ``("resume", checkpoint)`` or
        ``("fresh", None)``. Nothing is removed here. Needs the lock.
        """
        self._require_lock()
        return decide(self, record, resume=resume, force=force, replace=replace)

    # ------------------------------------------------------------------ writing
    def save_checkpoint(self, pert: Perturbation) -> None:
        """Replace the checkpoint with ``pert`` (whose ``extra["run"]`` must hold the record)."""
        self._require_lock()
        if "run" not in pert.extra:
            raise ValueError("a checkpoint needs its run's record in extra['run']")
        self.checkpoint_path.with_suffix(".json").unlink(missing_ok=True)  # see uap.runs
        pert.save(self.checkpoint_path)

    def finish(self, pert: Perturbation, record: Mapping[str, Any], artefacts: Artefacts | None = None) -> None:
        """Write the finished run: the perturbation, ``artefacts(self, pert)``, then the
        marker; then remove the checkpoint. ``pert.extra["run"]`` is set to ``record``."""
        self._require_lock()
        record = jsonable(dict(record))
        self.marker_path.unlink(missing_ok=True)
        pert.extra["run"] = record
        pert.save(self.result_path)
        if artefacts is not None:
            artefacts(self, pert)
        atomic_write(self.marker_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
        self.remove_checkpoint()

    def discard(self) -> None:
        """Remove this run's marker, result and checkpoint (the marker first)."""
        self._require_lock()
        self.marker_path.unlink(missing_ok=True)
        for path in (self.result_path.with_suffix(".json"), self.result_path):
            path.unlink(missing_ok=True)
        self.remove_checkpoint()

    def remove_checkpoint(self) -> None:
        """Remove the checkpoint (the sidecar first: a tensor file left alone is still a consistent one)."""
        self._require_lock()
        self.checkpoint_path.with_suffix(".json").unlink(missing_ok=True)
        self.checkpoint_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ crafting
    def craft(self, model: nn.Module, x: torch.Tensor, *, settings: Mapping[str, Any] | None = None,
              heldout: Any = None, callback: Callback | None = None, resume: bool = False, force: bool = False,
              replace: bool = False, artefacts: Artefacts | None = None, **craft_kwargs: Any) -> RunResult:
        """Reuse, continue or craft this run with :func:`uap.craft`, checkpointing every pass
        (:func:`uap.runs.craft.craft_in`, which documents the arguments and events)."""
        from uap.runs.craft import craft_in

        return craft_in(self, model, x, settings=settings, heldout=heldout, callback=callback, resume=resume,
                        force=force, replace=replace, artefacts=artefacts, **craft_kwargs)
