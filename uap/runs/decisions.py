"""What happens to a run folder, given the record of the run asked for.

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

A record written by an older version that names a :func:`uap.craft` argument which no longer
exists is "another record" that no run of this version can match; the refusal says so.

``force=True`` crafts from scratch whatever is there; ``replace=True`` does so only when what
is there does not match (a finished run with the same record is still reused and a matching
checkpoint still continued) — the rule ``transfer_matrix`` follows. Nothing is removed here:
for ``"fresh"`` the run's old files go when the new run first writes, so a run that fails at
the start (a bad argument, a model that does not fit the images) costs nothing.

Under ``torch.distributed`` rank 0 decides and every rank gets its decision
(:func:`decide_everywhere`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from uap.distributed import is_distributed, is_main
from uap.perturbation import Perturbation, share_perturbation
from uap.runs.errors import RunError, SettingsMismatch, UnfinishedRun
from uap.runs.record import describe_differences, differences, jsonable, retired_arguments, with_added_arguments

if TYPE_CHECKING:
    from uap.runs.folder import RunFolder

__all__ = ["decide", "decide_everywhere"]


def decide(run: RunFolder, record: Mapping[str, Any], *, resume: bool = False, force: bool = False,
           replace: bool = False) -> tuple[str, Perturbation | None]:
    """The table in the module docstring for ``run`` (whose lock must be held).

    Returns ``("reuse", finished perturbation)``, ``("resume", checkpoint)`` or ``("fresh", None)``.
    """
    record = jsonable(dict(record))
    if force:
        return "fresh", None
    finished = run.finished()
    if finished is not None:
        diffs = differences(with_added_arguments(finished), record)
        if not diffs:
            try:
                pert = run.load()
            except (OSError, ValueError) as e:
                if not replace:
                    raise RunError(f"{run.folder} records a finished run but {run.result_path.name} cannot be "
                                   f"read ({e}); pass force=True (--force) to recraft it") from None
            else:
                run.remove_checkpoint()  # left over if the last run stopped right after its marker
                return "reuse", pert
        elif not replace:
            raise SettingsMismatch(_refusal(f"{run.folder} holds a finished run", finished, diffs,
                                            "; choose another folder, or pass force=True (--force) to recraft it"))
        return "fresh", None
    try:
        checkpoint = run.load_checkpoint()
    except RunError:
        if not replace:
            raise
        checkpoint = None
    if checkpoint is not None:
        saved = checkpoint.extra.get("run")
        diffs = differences(with_added_arguments(saved), record)
        if diffs and not replace:
            raise SettingsMismatch(_refusal(f"{run.checkpoint_path} was written", saved, diffs,
                                            ", so it cannot be resumed; choose another folder, or pass "
                                            "force=True (--force) to discard it"))
        if not diffs:
            if not resume:
                raise UnfinishedRun(f"{run.folder} holds an unfinished run (checkpoint after pass "
                                    f"{checkpoint.passes}); pass resume=True (--resume) to continue it, or "
                                    "force=True (--force) to discard it and start over")
            return "resume", checkpoint
    elif run.result_path.exists() and not replace:
        raise RunError(f"{run.folder} holds {run.result_path.name} but no record of a finished run "
                       f"({run.marker_path.name}); choose another folder, or pass force=True (--force) "
                       "to replace it")
    return "fresh", None


def _refusal(found: str, saved: Any, diffs: list[str], advice: str) -> str:
    """One line: what was found, why it does not match, and what to do."""
    retired = retired_arguments(saved)
    if retired:
        return (f"{found} by an older version of uap (its record names the uap.craft argument(s) {retired}, which "
                f"no longer exist){advice}")
    return f"{found} with {describe_differences(diffs)}{advice}"


def decide_everywhere(run: RunFolder, record: Mapping[str, Any], *, resume: bool, force: bool,
                      replace: bool) -> tuple[str, Perturbation | None]:
    """:func:`decide` on rank 0 (the only rank holding the lock), its outcome — and the
    perturbation it starts from — shared with every rank under torch.distributed."""
    if not is_distributed():
        return decide(run, record, resume=resume, force=force, replace=replace)
    action, found, failure = "fresh", None, None
    if is_main():
        try:
            action, found = decide(run, record, resume=resume, force=force, replace=replace)
        except Exception as e:  # every rank must hear of it, or the others wait for rank 0 forever
            failure = e
    found, info = share_perturbation(found, action=action, error=None if failure is None else str(failure))
    if failure is not None:
        raise failure
    if info["error"] is not None:
        raise RunError(info["error"])
    return info["action"], found
