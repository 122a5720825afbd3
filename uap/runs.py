"""Resumable crafting runs on disk: one folder layout, one set of rules, one lock.

A *run* is one call of :func:`uap.craft` whose result is kept in a folder, so that running
it again either reuses the result, continues an interrupted run, or refuses to overwrite a
different one. ``uap craft --out`` and :func:`uap.transfer_matrix` (one run per source
model) both go through :class:`RunFolder`; :func:`craft_run` is the library call behind
``uap craft``.

Layout of a run named ``NAME`` (default ``"perturbation"``) in folder ``DIR``:

- ``NAME.safetensors`` + ``NAME.json`` — the finished :class:`~uap.perturbation.Perturbation`;
- ``NAME.partial.safetensors`` + ``NAME.partial.json`` — the checkpoint, rewritten after
  every pass while crafting and removed once the run is finished;
- ``NAME.settings.json`` — the completion marker: the run's *record* (see
  :func:`fingerprint`), written last, so a folder without it holds no finished run;
- ``NAME.lock`` — the lock file, holding the pid of the process writing the run; removed
  when it is done (one left by a crashed process is stale and harmless);
- files a caller adds before the marker (:func:`craft_run`: ``NAME.png`` and
  ``summary.json``).

Several runs may share a folder under different names (``transfer_matrix`` keeps one per
source model in ``out_dir/perturbations/``).

The record identifies a run: the caller's settings, every :func:`uap.craft` argument (its
defaults filled in, so leaving one out and passing its default are the same run), and
SHA-256 fingerprints of the crafting images, the held-out images and the model's weights —
a retrained model or another image subset is another run even under the same names. The
checkpoint and the result carry the record too (``extra["run"]``).

What happens to a folder, given a record (:meth:`RunFolder.prepare`):

===============================  =====================================================
found                            done
===============================  =====================================================
nothing                          craft from scratch
finished, same record            reuse it (nothing is crafted)
finished, other record           :class:`SettingsMismatch`, unless ``force``
checkpoint, same record          continue it with ``resume=True``; without it
                                 :class:`UnfinishedRun` (never silently discarded)
checkpoint, other record         :class:`SettingsMismatch`, unless ``force``
a result but no marker and       :class:`RunError` (not written by a run, or by an
no checkpoint                    incompatible layout), unless ``force``
===============================  =====================================================

``force=True`` crafts from scratch whatever is there; ``replace=True`` does so only when what
is there does not match (a finished run with the same record is still reused and a matching
checkpoint still continued) — the rule ``transfer_matrix`` follows. Either way the old files
are removed only once the new run has finished its first pass, so a run that fails at the
start (a bad argument, a model that does not fit the images) costs nothing.

Resuming is exact: pass ``k`` visits the images in an order that depends only on the seed
and ``k`` (:func:`uap.universal.visiting_order`), and the checkpoint holds ``v`` and the history after
the last finished pass, from which ``uap.craft(resume=...)`` continues.

Every artefact is written through :func:`uap.atomic.atomic_write`. A checkpoint's JSON sidecar
is deleted before its tensor file is replaced, so a crash between the two writes leaves a
tensor file whose embedded header (same file, same write) describes it, never a sidecar
from the previous pass. The marker is removed before anything else of a run is replaced and
written after everything else, so a crash at any point reads as "not finished".

The lock is an exclusive ``flock`` on ``NAME.lock`` (``msvcrt.locking`` on Windows), taken
without waiting: a second process gets :class:`RunLocked` naming the folder and the holder's
pid. The operating system drops the lock when its holder exits, however it exits, so a
crashed process never blocks a folder.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import torch
from torch import nn

from uap import universal
from uap.atomic import atomic_write
from uap.distributed import alone, broadcast, broadcast_json, is_distributed, is_main
from uap.fingerprint import tensor_fingerprint
from uap.images import is_images
from uap.perturbation import Perturbation
from uap.projection import check_eps, norm_name

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__all__ = [
    "RunFolder",
    "RunResult",
    "RunError",
    "RunLocked",
    "SettingsMismatch",
    "UnfinishedRun",
    "craft_run",
    "craft_arguments",
    "fingerprint",
    "model_fingerprint",
    "tensor_fingerprint",
    "summarize",
    "SUMMARY_FILE",
]

#: Name of the summary :func:`craft_run` writes into its folder.
SUMMARY_FILE = "summary.json"

Callback = Callable[[dict], Any]
#: ``artefacts(run, perturbation)``: writes a finished run's extra files (before the marker).
Artefacts = Callable[["RunFolder", Perturbation], None]

# uap.craft's keyword arguments and their defaults, read once: the record of a run lists
# them all. Its own arguments ``heldout`` and ``callback`` are RunFolder.craft's, and
# ``resume`` is decided by the folder.
_CRAFT_DEFAULTS: dict[str, Any] = {
    name: param.default for name, param in inspect.signature(universal.craft).parameters.items()
    if param.kind is inspect.Parameter.KEYWORD_ONLY and name not in ("heldout", "callback", "resume")
}


# --------------------------------------------------------------------------- errors

class RunError(ValueError):
    """A run folder's contents forbid what was asked (the message says what to do)."""


class RunLocked(RunError):
    """Another process is writing this run; :attr:`pid` is its process id (None if unknown)."""

    def __init__(self, message: str, pid: int | None = None):
        super().__init__(message)
        self.pid = pid


class SettingsMismatch(RunError):
    """The folder holds a run (finished or checkpointed) with another record."""


class UnfinishedRun(RunError):
    """The folder holds a checkpoint and ``resume`` was not asked for."""


# --------------------------------------------------------------------------- fingerprints

def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 over a model's state dict (names, shapes, bytes): changes when it is retrained."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor_fingerprint(t).encode())
    return h.hexdigest()


def _heldout_fingerprint(heldout: Any) -> str | None:
    if heldout is None:
        return None
    parts = heldout if isinstance(heldout, (tuple, list)) else (heldout,)
    if not all(torch.is_tensor(t) or is_images(t) for t in parts):
        raise ValueError("heldout must be images or an (images, labels) pair of tensors")
    h = hashlib.sha256()
    for t in parts:
        h.update(tensor_fingerprint(t).encode())
    return h.hexdigest()


def craft_arguments(craft_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Every keyword argument of :func:`uap.craft` (but ``heldout``, ``callback``, ``resume``),
    from ``craft_kwargs`` or its default, as JSON values (``norm`` as ``"inf"``/``"2"``/``"1"``).

    Raises ``ValueError`` for an unknown argument or a missing ``eps``.
    """
    kwargs = dict(craft_kwargs)
    own = sorted(set(kwargs) & {"heldout", "callback", "resume"})
    if own:
        raise ValueError(f"{own}: pass heldout and callback to the run itself; resume is decided by the folder")
    unknown = sorted(set(kwargs) - set(_CRAFT_DEFAULTS))
    if unknown:
        raise ValueError(f"unknown uap.craft argument(s) {unknown}; known: {sorted(_CRAFT_DEFAULTS)}")
    args = {name: kwargs.get(name, default) for name, default in _CRAFT_DEFAULTS.items()}
    missing = sorted(name for name, value in args.items() if value is inspect.Parameter.empty)
    if missing:
        raise ValueError(f"uap.craft needs {', '.join(missing)}")
    args["eps"] = check_eps(args["eps"])
    args["norm"] = norm_name(args["norm"])
    return _jsonable(args)


def fingerprint(model: nn.Module, x: torch.Tensor, *, settings: Mapping[str, Any] | None = None,
                craft: Mapping[str, Any] | None = None, heldout: Any = None) -> dict[str, Any]:
    """The record that identifies a run: two runs with equal records craft the same ``v``.

    Args:
        model, x: the target and the crafting images (fingerprinted, not stored).
        settings: the caller's own description of the run (JSON values), e.g. the command
            line's flags or a source model's name.
        craft: the :func:`uap.craft` arguments (see :func:`craft_arguments`).
        heldout: the held-out images (or ``(images, labels)``), fingerprinted: they do not
            change ``v`` but every record of its history.

    Returns ``{"settings", "craft", "model_sha256", "craft_set_sha256", "heldout_sha256"}``
    as canonical JSON values (what ``json.loads(json.dumps(...))`` gives back).
    """
    return _jsonable({
        "settings": dict(settings or {}),
        "craft": dict(craft or {}),
        "model_sha256": model_fingerprint(model),
        "craft_set_sha256": tensor_fingerprint(x),
        "heldout_sha256": _heldout_fingerprint(heldout),
    })


def _jsonable(obj: Any) -> Any:
    """``obj`` as JSON gives it back (tuples → lists, paths → text …)."""
    return json.loads(json.dumps(obj, default=str))


def _canonical(record: Any) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), default=str)


def _differences(saved: Any, wanted: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the entries where two records differ (for error messages)."""
    if isinstance(saved, dict) and isinstance(wanted, dict):
        out: list[str] = []
        for key in sorted(set(saved) | set(wanted), key=str):
            if key not in saved or key not in wanted:
                out.append(f"{prefix}{key}")
            else:
                out += _differences(saved[key], wanted[key], f"{prefix}{key}.")
        return out
    return [] if _canonical(saved) == _canonical(wanted) else [prefix.rstrip(".") or "record"]


def _describe(diffs: list[str]) -> str:
    shown = ", ".join(diffs[:6]) + (f" and {len(diffs) - 6} more" if len(diffs) > 6 else "")
    return f"different settings ({shown})"


# --------------------------------------------------------------------------- summary

def summarize(pert: Perturbation, record: Mapping[str, Any], *,
              perturbation_file: str = "perturbation.safetensors") -> dict[str, Any]:
    """The summary of a finished run, as ``uap craft`` prints it and writes ``summary.json``.

    Fields: model, data, image counts, budget and method as asked (``record["craft"]``), the
    rates of the kept ``v`` (the last pass, or the best with ``keep_best``), its norms, the
    number of passes and DeepFool calls, time, the caller's settings and the history.
    """
    from uap import __version__

    craft = record.get("craft", {})
    kept = pert.record  # the pass that produced v: the last one, or the best with keep_best
    norms = pert.norms()
    return {
        "model": pert.model, "data": pert.data, "n_images": pert.extra.get("n_images"),
        "heldout": pert.extra.get("n_heldout") or 0,
        "eps": pert.eps, "norm": pert.norm, "delta": pert.delta, "method": craft.get("method", pert.method),
        "seed": pert.seed, "passes": pert.passes, "seconds": pert.seconds,
        "best_pass": pert.extra.get("best_pass"),
        "fooling_rate": pert.fooling_rate, "heldout_fooling_rate": pert.heldout_fooling_rate,
        "heldout_accuracy": kept.get("heldout_accuracy"),
        "target": pert.extra.get("target"),
        "targeted_success_rate": kept.get("targeted_success_rate"),
        "heldout_targeted_success_rate": kept.get("heldout_targeted_success_rate"),
        "clean_heldout_accuracy": pert.extra.get("clean_heldout_accuracy"),
        "norm_2": norms["norm_2"], "norm_inf": norms["norm_inf"],
        "deepfool_calls": sum(int(r.get("deepfool_calls", 0)) for r in pert.history),
        "perturbation": perturbation_file, "version": __version__,
        "settings": record.get("settings"), "history": pert.history,
    }


# --------------------------------------------------------------------------- the folder

@dataclass
class RunResult:
    """What a run gave: its perturbation, its record, and how it was obtained.

    Attributes:
        perturbation: the finished perturbation (``extra["run"]`` holds the record).
        record: see :func:`fingerprint`.
        run: the folder.
        reused: True when the folder already held this finished run (nothing was crafted).
        resumed_passes: passes taken over from a checkpoint (0: crafted from scratch).
    """

    perturbation: Perturbation
    record: dict[str, Any]
    run: "RunFolder"
    reused: bool = False
    resumed_passes: int = 0
    baseline: dict[str, Any] | None = None  # craft_run: the strongest data-free baseline, held out

    @property
    def summary(self) -> dict[str, Any]:
        """:func:`summarize` of this run (with the held-out baseline when :func:`craft_run` measured it)."""
        summary = summarize(self.perturbation, self.record, perturbation_file=self.run.result_path.name)
        return {**summary, "baseline": self.baseline} if self.baseline is not None else summary


class RunFolder:
    """The run ``name`` kept in ``folder`` (see the module docstring for files and rules).

    Nothing touches the disk until :meth:`lock` (which creates the folder). Every method
    that writes must be called with the lock held; :meth:`craft` takes it itself.
    """

    def __init__(self, folder: str | os.PathLike, name: str = "perturbation"):
        name = str(name)
        if not name or name.startswith(".") or any(c in name for c in "/\\\0") or name != name.strip():
            raise ValueError(f"{name!r} cannot name the files of a run in {folder}: use a plain file name")
        self.folder = Path(folder)
        self.name = name
        self._lock_fd: int | None = None
        self._lock_depth = 0

    def __repr__(self) -> str:
        return f"RunFolder({str(self.folder)!r}, name={self.name!r})"

    # ------------------------------------------------------------------ paths
    def _path(self, suffix: str) -> Path:
        return self.folder / f"{self.name}{suffix}"

    @property
    def result_path(self) -> Path:
        """``NAME.safetensors``: the finished perturbation (with its ``NAME.json``)."""
        return self._path(".safetensors")

    @property
    def checkpoint_path(self) -> Path:
        """``NAME.partial.safetensors``: the checkpoint of an unfinished run (with its ``.json``)."""
        return self._path(".partial.safetensors")

    @property
    def marker_path(self) -> Path:
        """``NAME.settings.json``: the record of the finished run, written last."""
        return self._path(".settings.json")

    @property
    def lock_path(self) -> Path:
        """``NAME.lock``: the lock file (holds the writer's pid while it writes)."""
        return self._path(".lock")

    # ------------------------------------------------------------------ lock
    @contextlib.contextmanager
    def lock(self) -> Iterator["RunFolder"]:
        """Hold the run's exclusive lock for the ``with`` block (creating the folder).

        Raises :class:`RunLocked` at once if another process holds it, and ``ValueError`` if
        the folder cannot be created (e.g. a parent is a file). Re-entrant on this object.
        The lock file is removed on release, and the folder too if this call created it
        and it is still empty.
        """
        if self._lock_fd is not None:
            self._lock_depth += 1
            try:
                yield self
            finally:
                self._lock_depth -= 1
            return
        created = self._make_folder()
        try:
            fd = self._acquire()
            self._lock_fd = fd
            try:
                yield self
            finally:
                self._lock_fd = None
                self._release(fd)
        finally:
            if created:
                with contextlib.suppress(OSError):
                    self.folder.rmdir()  # only if nothing was written in it

    def _make_folder(self) -> bool:
        """Create the folder if needed; True if it did not exist."""
        if self.folder.is_dir():
            return False
        try:
            self.folder.mkdir(parents=True)
        except FileExistsError:
            if self.folder.is_dir():  # another process created it meanwhile
                return False
            raise ValueError(f"cannot use {self.folder} as a run folder: it is a file") from None
        except OSError as e:
            raise ValueError(f"cannot use {self.folder} as a run folder: {e.strerror or e}") from None
        return True

    def _acquire(self) -> int:
        """Open and lock ``NAME.lock`` (not waiting), then write this process's pid into it."""
        path = self.lock_path
        while True:
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
            except OSError as e:
                raise ValueError(f"cannot use {self.folder} as a run folder: {e.strerror or e}") from None
            try:
                locked = _try_lock(fd)
            except OSError as e:
                os.close(fd)
                raise ValueError(f"cannot lock {path}: {e.strerror or e}") from None
            if not locked:
                pid = _read_pid(fd)
                os.close(fd)
                holder = f"pid {pid}" if pid is not None else "pid unknown"
                raise RunLocked(f"{self.folder} is in use: another process ({holder}) is writing the run "
                                f"{self.name!r} there; wait for it to finish or choose another folder", pid)
            if _is_same_file(fd, path):
                break
            os.close(fd)  # the previous holder removed this file after we opened it: lock the new one
        # The pid is written in place, not through atomic_write: replacing the file would
        # give it a new inode, which other processes would lock independently of this one.
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._remove_stale_temporaries()
        return fd

    def _remove_stale_temporaries(self) -> None:
        """Remove temporary files of this run's writes left by a killed writer (``kill -9`` inside
        :func:`~uap.atomic.atomic_write`); with the lock held no live writer owns one."""
        for tmp in self.folder.glob(f".{self.name}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _release(self, fd: int) -> None:
        try:
            if os.name == "nt":  # an open file cannot be removed there
                os.ftruncate(fd, 0)
            else:  # removed while still locked, so a process that opened it sees it is stale
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(self.lock_path)
        finally:
            os.close(fd)  # releases the lock

    def _require_lock(self) -> None:
        if self._lock_fd is None:
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
        """Decide what to do for a run with ``record`` (the table in the module docstring).

        Returns ``("reuse", finished perturbation)``, ``("resume", checkpoint)`` or
        ``("fresh", None)``. Nothing is removed here: for ``"fresh"``, :meth:`craft` removes
        the run's old files when the new run first writes, so a run that fails before its
        first pass (e.g. on a bad argument) leaves the folder as it was. Needs the lock.
        """
        self._require_lock()
        record = _jsonable(dict(record))
        if force:
            return "fresh", None
        finished = self.finished()
        if finished is not None:
            diffs = _differences(finished, record)
            if not diffs:
                try:
                    pert = self.load()
                except (OSError, ValueError) as e:
                    if not replace:
                        raise RunError(f"{self.folder} records a finished run but {self.result_path.name} cannot be "
                                       f"read ({e}); pass force=True (--force) to recraft it") from None
                else:
                    self._remove_checkpoint()  # left over if the last run stopped right after its marker
                    return "reuse", pert
            elif not replace:
                raise SettingsMismatch(f"{self.folder} holds a finished run with {_describe(diffs)}; choose another "
                                       "folder, or pass force=True (--force) to recraft it")
            return "fresh", None
        try:
            checkpoint = self.load_checkpoint()
        except RunError:
            if not replace:
                raise
            checkpoint = None
        if checkpoint is not None:
            diffs = _differences(checkpoint.extra.get("run"), record)
            if diffs and not replace:
                raise SettingsMismatch(f"{self.checkpoint_path} was written with {_describe(diffs)}, so it cannot be "
                                       "resumed; choose another folder, or pass force=True (--force) to discard it")
            if not diffs:
                if not resume:
                    raise UnfinishedRun(f"{self.folder} holds an unfinished run (checkpoint after pass "
                                        f"{checkpoint.passes}); pass resume=True (--resume) to continue it, or "
                                        "force=True (--force) to discard it and start over")
                return "resume", checkpoint
        elif self.result_path.exists() and not replace:
            raise RunError(f"{self.folder} holds {self.result_path.name} but no record of a finished run "
                           f"({self.marker_path.name}); choose another folder, or pass force=True (--force) "
                           "to replace it")
        return "fresh", None

    # ------------------------------------------------------------------ writing
    def save_checkpoint(self, pert: Perturbation) -> None:
        """Replace the checkpoint with ``pert`` (whose ``extra["run"]`` must hold the record)."""
        self._require_lock()
        if "run" not in pert.extra:
            raise ValueError("a checkpoint needs its run's record in extra['run']")
        self.checkpoint_path.with_suffix(".json").unlink(missing_ok=True)  # see the module docstring
        pert.save(self.checkpoint_path)

    def finish(self, pert: Perturbation, record: Mapping[str, Any], artefacts: Artefacts | None = None) -> None:
        """Write the finished run: the perturbation, ``artefacts(self, pert)``, then the
        marker; then remove the checkpoint. ``pert.extra["run"]`` is set to ``record``."""
        self._require_lock()
        record = _jsonable(dict(record))
        self.marker_path.unlink(missing_ok=True)
        pert.extra["run"] = record
        pert.save(self.result_path)
        if artefacts is not None:
            artefacts(self, pert)
        atomic_write(self.marker_path, json.dumps(record, indent=2, sort_keys=True) + "\n")
        self._remove_checkpoint()

    def discard(self) -> None:
        """Remove this run's marker, result and checkpoint (the marker first)."""
        self._require_lock()
        self.marker_path.unlink(missing_ok=True)
        for path in (self.result_path.with_suffix(".json"), self.result_path):
            path.unlink(missing_ok=True)
        self._remove_checkpoint()

    def _remove_checkpoint(self) -> None:
        # the sidecar first: a tensor file left alone is still a consistent checkpoint
        self.checkpoint_path.with_suffix(".json").unlink(missing_ok=True)
        self.checkpoint_path.unlink(missing_ok=True)

    # ------------------------------------------------------------------ crafting
    def _decide(self, record: Mapping[str, Any], x: torch.Tensor, *, resume: bool, force: bool,
                replace: bool) -> tuple[str, Perturbation | None]:
        """:meth:`prepare` on rank 0, its outcome shared with every rank under torch.distributed."""
        if not is_distributed():
            return self.prepare(record, resume=resume, force=force, replace=replace)
        action, found, failure = "fresh", None, None
        if is_main():
            try:
                action, found = self.prepare(record, resume=resume, force=force, replace=replace)
            except Exception as e:  # every rank must hear of it, or the others wait for rank 0 forever
                failure = e
        shared = _share_decision(action, found, None if failure is None else str(failure), tuple(x.shape[1:]))
        if failure is not None:
            raise failure
        return shared

    def craft(self, model: nn.Module, x: torch.Tensor, *, settings: Mapping[str, Any] | None = None,
              heldout: Any = None, callback: Callback | None = None, resume: bool = False, force: bool = False,
              replace: bool = False, artefacts: Artefacts | None = None, **craft_kwargs: Any) -> RunResult:
        """Reuse, continue or craft this run with :func:`uap.craft`, checkpointing every pass.

        Args:
            model, x: the target and the crafting images.
            settings: the caller's description of the run, part of its record.
            heldout: passed to :func:`uap.craft` (and fingerprinted).
            callback: ``callback(event)`` gets :func:`uap.craft`'s events (``"progress"``,
                ``"pass"``: returning True from the latter stops after that pass, which is
                then checkpointed) and the run's own: ``{"event": "reused", "path", "passes"}``,
                ``{"event": "start", "resumed_passes", "checkpoint"}`` (crafting begins;
                ``checkpoint`` is the path resumed from, or None) and
                ``{"event": "saved", "path"}``.
            resume, force, replace: see :meth:`prepare`.
            artefacts: writes extra files of a finished run (see :meth:`finish`).
            **craft_kwargs: :func:`uap.craft`'s keyword arguments (``eps`` …).

        Raises :class:`RunLocked` if another process writes this run, and
        :class:`SettingsMismatch`, :class:`UnfinishedRun` or :class:`RunError` when the
        folder's contents forbid it.
        """
        args = craft_arguments(craft_kwargs)
        record = fingerprint(model, x, settings=settings, craft=args, heldout=heldout)
        emit = callback or (lambda _event: None)
        main = is_main()  # under torch.distributed only rank 0 locks, decides and writes
        with self.lock() if main else contextlib.nullcontext():
            action, found = self._decide(record, x, resume=resume, force=force, replace=replace)
            if action == "reuse":
                assert found is not None
                emit({"event": "reused", "path": str(self.result_path), "passes": found.passes})
                return RunResult(found, record, self, reused=True)
            start = found if action == "resume" else None
            history = [dict(h) for h in start.history] if start is not None else []
            replacing = start is None  # the old files go when the new run first writes (see prepare)
            emit({"event": "start", "resumed_passes": len(history),
                  "checkpoint": str(self.checkpoint_path) if start is not None else None})

            def on_event(event: dict) -> Any:
                nonlocal replacing
                if event.get("event") == "pass" and main:  # checkpoint first: the callback may stop or raise
                    if replacing:
                        self.discard()
                        replacing = False
                    history.append({k: v for k, v in event.items() if k not in ("event", "v")})
                    self.save_checkpoint(Perturbation(
                        v=event["v"].detach().cpu().float(), model=args["model_id"] or type(model).__name__,
                        data=args["data"] or f"{x.shape[0]} images", eps=args["eps"], norm=args["norm"],
                        delta=args["delta"], method=args["method"], seed=args["seed"], history=list(history),
                        seconds=sum(float(h.get("seconds", 0.0)) for h in history), extra={"run": record}))
                return emit(event)

            pert = universal.craft(model, x, heldout=heldout, callback=on_event, resume=start, **args)
            if main:
                self.finish(pert, record, artefacts)
                emit({"event": "saved", "path": str(self.result_path)})
            return RunResult(pert, record, self, resumed_passes=len(start.history) if start is not None else 0)


def _share_decision(action: str, found: Perturbation | None, error: str | None, shape: tuple[int, ...]
                    ) -> tuple[str, Perturbation | None]:
    """Rank 0's decision about a run (and the perturbation it starts from) on every rank."""
    message = broadcast_json({"action": action, "error": error,
                              "meta": found.metadata() if found is not None else None})
    if message["error"] is not None:
        if is_main():
            return action, found  # rank 0 raises its own exception
        raise RunError(message["error"])
    if message["meta"] is None:
        return message["action"], None
    v = broadcast(found.v.float() if found is not None else torch.zeros(shape))
    return message["action"], found if found is not None else Perturbation.from_metadata(v, message["meta"])


def craft_run(out_dir: str | os.PathLike | RunFolder, model: nn.Module, x: torch.Tensor, *,
              settings: Mapping[str, Any] | None = None, heldout: Any = None, resume: bool = False,
              force: bool = False, callback: Callback | None = None, **craft_kwargs: Any) -> RunResult:
    """What ``uap craft --out`` does: craft a UAP into a run folder, or reuse / continue the run there.

    Writes ``perturbation.safetensors`` + ``perturbation.json``, ``perturbation.png`` (``v``
    scaled to [0, 255], as in Fig. 4 of the paper) and ``summary.json`` (:func:`summarize`),
    then the marker ``perturbation.settings.json``; a checkpoint
    ``perturbation.partial.*`` exists while crafting. ``out_dir`` may be a
    :class:`RunFolder` (e.g. one whose lock the caller already holds).

    Args:
        out_dir: the folder (created if needed).
        model, x: target and crafting images.
        settings: the caller's description of the run (stored in the record and the summary).
        heldout, callback, resume, force: see :meth:`RunFolder.craft`.
        **craft_kwargs: :func:`uap.craft`'s keyword arguments (``eps``, ``norm`` …).

    Returns the :class:`RunResult` (``.summary`` is what ``summary.json`` holds).
    """
    run = out_dir if isinstance(out_dir, RunFolder) else RunFolder(out_dir)

    measured: dict[str, Any] = {}

    def write_artefacts(folder: RunFolder, pert: Perturbation) -> None:
        pert.to_png(folder._path(".png"))
        measured["baseline"] = _heldout_baseline(model, heldout, pert)
        summary = summarize(pert, pert.extra["run"], perturbation_file=folder.result_path.name)
        atomic_write(folder.folder / SUMMARY_FILE,
                     json.dumps({**summary, "baseline": measured["baseline"]}, indent=2) + "\n")

    result = run.craft(model, x, settings=settings, heldout=heldout, callback=callback, resume=resume, force=force,
                       artefacts=write_artefacts, **craft_kwargs)
    if result.reused:  # measured when the run finished
        try:
            measured["baseline"] = json.loads((run.folder / SUMMARY_FILE).read_text(encoding="utf-8")).get("baseline")
        except (OSError, ValueError, AttributeError):
            pass
    result.baseline = measured.get("baseline")
    return result


def _heldout_baseline(model: nn.Module, heldout: Any, pert: Perturbation) -> dict[str, Any] | None:
    """The strongest data-free baseline at the run's budget on its held-out images (None without
    them), for the summary: the number a crafted UAP should be read against. Rank 0 alone."""
    from uap.baselines import strongest_baseline

    if heldout is None:
        return None
    hx, hy = heldout if isinstance(heldout, (tuple, list)) else (heldout, None)
    with alone():
        found = strongest_baseline(model, hx, pert.eps, pert.p, y=hy, seed=pert.seed)
    return {"name": found["name"], "heldout_fooling_rate": found["fooling_rate"],
            "heldout_accuracy": found["accuracy"], "heldout_fooling_rates": found["rates"]}


# --------------------------------------------------------------------------- locking primitives

def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False if another holder has it."""
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        return True
    os.lseek(fd, 1 << 20, os.SEEK_SET)  # lock a byte past the pid, so others can still read it
    try:
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError:
        return False
    finally:
        os.lseek(fd, 0, os.SEEK_SET)
    return True


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def _is_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    held = os.fstat(fd)
    return (held.st_dev, held.st_ino) == (on_disk.st_dev, on_disk.st_ino)
