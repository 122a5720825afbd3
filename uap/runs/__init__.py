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
source model in ``out_dir/perturbations/``). The checkpoint and the result carry the record
too (``extra["run"]``).

The parts:

- :mod:`uap.runs.record` — the record: every :func:`uap.craft` argument and fingerprints of
  the model and the images (:func:`fingerprint`, :func:`craft_arguments`), and their diff;
- :mod:`uap.runs.decisions` — what happens to a folder given a record: reuse, resume,
  craft afresh or refuse (the table there);
- :mod:`uap.runs.lock` — the exclusive, non-waiting lock of one run;
- :mod:`uap.runs.folder` — :class:`RunFolder`: the files, reading and writing them;
- :mod:`uap.runs.craft` — crafting into a folder (:meth:`RunFolder.craft`, :func:`craft_run`)
  and the summary.

Resuming is exact: pass ``k`` visits the images in an order that depends only on the seed
and ``k`` (:func:`uap.universal.visiting_order`), and the checkpoint holds ``v`` and the history after
the last finished pass, from which ``uap.craft(resume=...)`` continues.

Every artefact is written through :func:`uap.atomic.atomic_write`. A checkpoint's JSON sidecar
is deleted before its tensor file is replaced, so a crash between the two writes leaves a
tensor file whose embedded header (same file, same write) describes it, never a sidecar
from the previous pass. The marker is removed before anything else of a run is replaced and
written after everything else, so a crash at any point reads as "not finished".
"""
from __future__ import annotations

from uap.runs.craft import SUMMARY_FILE, RunResult, craft_run, summarize
from uap.runs.errors import RunError, RunLocked, SettingsMismatch, UnfinishedRun
from uap.runs.folder import RunFolder
from uap.runs.record import craft_arguments, fingerprint, model_fingerprint, tensor_fingerprint

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
