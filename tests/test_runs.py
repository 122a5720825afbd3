"""``uap.runs``: resumable run folders — reuse, exact resume, completion marker, mismatches, lock."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

import uap
import uap.universal
from tests.eval_models import EncoderTarget, LinearTarget, images
from uap.runs import (RunError, RunFolder, RunLocked, SettingsMismatch, UnfinishedRun, craft_arguments, craft_run,
                      fingerprint)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# a multi-pass run on 8×8 toy images (the transfer tests use the same model and budget)
CRAFT = dict(eps=0.25, norm="inf", delta=0.05, max_passes=3, seed=0, batch_size=5)
SETTINGS = {"what": "test run"}


class Interrupt(Exception):
    pass


@pytest.fixture(scope="module")
def data():
    x, _ = images(n=16, seed=10)
    return EncoderTarget(seed=1), x, images(n=12, seed=11)


def _run(folder, data, **kwargs):
    model, x, heldout = data
    options = {**CRAFT, **kwargs}
    return craft_run(folder, model, x, settings=options.pop("settings", SETTINGS), heldout=heldout, **options)


def _stop_after_pass(k: int):
    def callback(event: dict) -> None:
        if event["event"] == "pass" and event["pass"] == k:
            raise Interrupt

    return callback


def _copy_run(source, folder):
    folder.mkdir()
    for p in source.iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    return folder


def _without_seconds(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in h.items() if k != "seconds"} for h in history]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """An uninterrupted run."""
    result = _run(tmp_path_factory.mktemp("straight") / "run", data)
    assert result.perturbation.passes >= 2, "resuming needs a multi-pass run"
    return result


@pytest.fixture
def interrupted(data, tmp_path):
    """A folder whose run stopped (an exception in the callback) after pass 1."""
    folder = tmp_path / "run"
    with pytest.raises(Interrupt):
        _run(folder, data, callback=_stop_after_pass(1))
    return folder


# ---------------------------------------------------------------------------- layout and reuse

def test_finished_run_layout_and_summary(straight):
    run = straight.run
    names = sorted(p.name for p in run.folder.iterdir())
    assert names == ["perturbation.json", "perturbation.png", "perturbation.safetensors",
                     "perturbation.settings.json", "summary.json"]  # no checkpoint, no lock, no temporary file
    summary = json.loads((run.folder / "summary.json").read_text())
    assert summary == json.loads(json.dumps(straight.summary))
    assert summary["settings"] == SETTINGS and summary["passes"] == straight.perturbation.passes
    assert summary["eps"] == CRAFT["eps"] and summary["norm"] == "inf" and summary["method"] == "deepfool"
    assert summary["fooling_rate"] == straight.perturbation.fooling_rate
    assert summary["heldout"] == 12 and summary["n_images"] == 16
    calls = sum(r["deepfool_calls"] for r in straight.perturbation.history)
    assert summary["counters"] == {"deepfool_calls": calls} and calls > 0  # the method's counters, summed
    record = json.loads(run.marker_path.read_text())
    assert record == straight.record == uap.Perturbation.load(run.result_path).extra["run"]
    assert record["settings"] == SETTINGS and record["craft"]["max_passes"] == 3
    assert all(len(record[k]) == 64 for k in ("model_sha256", "craft_set_sha256", "heldout_sha256"))


def test_the_folder_does_not_change_what_is_crafted(data, straight):
    model, x, heldout = data
    plain = uap.craft(model, x, heldout=heldout, **CRAFT)
    assert torch.equal(plain.v, straight.perturbation.v)
    assert _without_seconds(plain.history) == _without_seconds(straight.perturbation.history)


def test_same_settings_are_reused_without_crafting(data, straight, monkeypatch):
    def no_crafting(*args, **kwargs):
        raise AssertionError("a finished run with the same settings must be reused")

    monkeypatch.setattr(uap.universal, "craft", no_crafting)
    events = []
    # delta and max_passes given explicitly or left to their defaults are the same run
    again = _run(straight.run.folder, data, callback=events.append, norm=float("inf"))
    assert again.reused and torch.equal(again.perturbation.v, straight.perturbation.v)
    assert [e["event"] for e in events] == ["reused"]
    assert again.summary["fooling_rate"] == straight.summary["fooling_rate"]


def test_craft_arguments_fill_in_defaults():
    args = craft_arguments({"eps": 0.1})
    assert args == craft_arguments({"eps": 0.1, "delta": 0.2, "norm": "linf", "max_passes": 10})
    assert args["norm"] == "inf" and args["method"] == "deepfool" and args["seed"] == 0
    with pytest.raises(ValueError, match="unknown uap.craft argument"):
        craft_arguments({"eps": 0.1, "epsilon": 2})
    with pytest.raises(ValueError, match="eps"):
        craft_arguments({})
    with pytest.raises(ValueError, match="resume"):
        craft_arguments({"eps": 0.1, "resume": None})


def test_fingerprint_tells_models_images_and_heldout_apart(data):
    model, x, heldout = data
    base = fingerprint(model, x, settings=SETTINGS, heldout=heldout)
    assert base == fingerprint(model, x.clone(), settings=dict(SETTINGS), heldout=heldout)
    assert base != fingerprint(LinearTarget(seed=0), x, settings=SETTINGS, heldout=heldout)
    assert base != fingerprint(model, x[:-1], settings=SETTINGS, heldout=heldout)
    assert base != fingerprint(model, x, settings=SETTINGS, heldout=heldout[0])  # the labels count too
    assert base != fingerprint(model, x, settings={"what": "other"}, heldout=heldout)


# ---------------------------------------------------------------------------- resume and the marker

def test_interrupted_run_resumed_equals_an_uninterrupted_one(data, straight, interrupted):
    run = RunFolder(interrupted)
    assert run.finished() is None, "a checkpoint without the marker is an unfinished run"
    assert run.checkpoint_path.is_file() and not run.result_path.exists()
    assert run.load_checkpoint().passes == 1
    events = []
    resumed = _run(interrupted, data, resume=True, callback=events.append)
    assert not resumed.reused and resumed.resumed_passes == 1
    assert events[0] == {"event": "start", "resumed_passes": 1, "checkpoint": str(run.checkpoint_path)}
    assert [e["pass"] for e in events if e["event"] == "pass"] == list(range(2, straight.perturbation.passes + 1))
    assert torch.equal(resumed.perturbation.v, straight.perturbation.v)  # bitwise
    assert _without_seconds(resumed.perturbation.history) == _without_seconds(straight.perturbation.history)
    assert run.finished() == straight.record
    assert not run.checkpoint_path.exists() and not run.checkpoint_path.with_suffix(".json").exists()
    assert not run.lock_path.exists()


def test_checkpoint_without_resume_is_an_error_not_a_loss(data, interrupted):
    run = RunFolder(interrupted)
    before = run.checkpoint_path.read_bytes()
    with pytest.raises(UnfinishedRun, match=r"checkpoint after pass 1.*resume=True.*force=True"):
        _run(interrupted, data)
    assert run.checkpoint_path.read_bytes() == before


def test_checkpoint_with_other_settings_cannot_be_resumed(data, interrupted):
    with pytest.raises(SettingsMismatch, match=r"craft\.eps.*cannot be resumed"):
        _run(interrupted, data, resume=True, eps=0.2)
    assert RunFolder(interrupted).checkpoint_path.is_file()


def _as_recorded_by_an_older_version(record: dict) -> dict:
    """``record`` as a version whose uap.craft took DeepFool's settings as ``deepfool_options`` wrote it."""
    return {**record, "craft": {**record["craft"], "deepfool_options": {"precision": "fp32"}}}


def test_a_finished_run_of_an_older_version_is_refused_in_one_line(data, straight, tmp_path):
    folder = _copy_run(straight.run.folder, tmp_path / "old")
    run = RunFolder(folder)
    run.marker_path.write_text(json.dumps(_as_recorded_by_an_older_version(straight.record)))
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    with pytest.raises(SettingsMismatch) as refused:
        _run(folder, data, resume=True)
    message = str(refused.value)
    assert "\n" not in message
    assert re.search(r"finished run by an older version of uap \(its record names the uap.craft argument\(s\) "
                     r"\['deepfool_options'\], which no longer exist\); .*force=True \(--force\) to recraft it", message)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # nothing touched
    forced = _run(folder, data, force=True)
    assert torch.equal(forced.perturbation.v, straight.perturbation.v) and not forced.reused


def test_a_checkpoint_of_an_older_version_is_refused_in_one_line(data, interrupted):
    run = RunFolder(interrupted)
    checkpoint = run.load_checkpoint()
    checkpoint.extra["run"] = _as_recorded_by_an_older_version(checkpoint.extra["run"])
    with run.lock():
        run.save_checkpoint(checkpoint)
    with pytest.raises(SettingsMismatch, match=r"partial.safetensors was written by an older version of uap .*"
                                               r"\['deepfool_options'\].*cannot be resumed.*force=True"):
        _run(interrupted, data, resume=True)
    assert run.checkpoint_path.is_file()
    assert _run(interrupted, data, force=True).perturbation.passes >= 2


def test_crash_while_saving_reads_as_unfinished_and_resumes(data, straight, tmp_path):
    """The marker is written last: a failure after the perturbation but before the marker
    leaves an unfinished run whose checkpoint continues (here with no pass left to do)."""
    model, x, heldout = data
    run = RunFolder(tmp_path / "run")

    def crash(folder, pert):
        raise Interrupt

    with pytest.raises(Interrupt):
        run.craft(model, x, settings=SETTINGS, heldout=heldout, artefacts=crash, **CRAFT)
    assert run.result_path.is_file() and run.finished() is None and run.checkpoint_path.is_file()
    resumed = _run(run.folder, data, resume=True)
    assert resumed.resumed_passes == straight.perturbation.passes and not resumed.reused
    assert torch.equal(resumed.perturbation.v, straight.perturbation.v)
    assert run.finished() is not None and not run.checkpoint_path.exists()


def test_result_without_marker_or_checkpoint_is_not_overwritten(data, straight, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    for name in ("perturbation.safetensors", "perturbation.json"):
        (folder / name).write_bytes((straight.run.folder / name).read_bytes())
    with pytest.raises(RunError, match="no record of a finished run"):
        _run(folder, data)
    assert _run(folder, data, force=True).run.finished() is not None


# ---------------------------------------------------------------------------- mismatches and force

@pytest.mark.parametrize("change, key", [({"eps": 0.2}, "craft.eps"), ({"settings": {"what": "else"}}, "settings.what"),
                                         ({"method": "deepfool-batched"}, "craft.method")])
def test_finished_run_with_other_settings_is_an_error(data, straight, change, key):
    with pytest.raises(SettingsMismatch, match=rf"different settings \(.*{key}.*force=True"):
        _run(straight.run.folder, data, **change)
    assert straight.run.finished() == straight.record  # untouched


def test_retrained_model_is_another_run(data, straight):
    _, x, heldout = data
    with pytest.raises(SettingsMismatch, match="model_sha256"):
        craft_run(straight.run.folder, EncoderTarget(seed=7), x, settings=SETTINGS, heldout=heldout, **CRAFT)


def test_force_recrafts(data, tmp_path, straight):
    folder = _copy_run(straight.run.folder, tmp_path / "run")
    again = _run(folder, data, force=True)
    assert not again.reused and torch.equal(again.perturbation.v, straight.perturbation.v)
    other = _run(folder, data, force=True, eps=0.125, max_passes=1)
    assert not other.reused and other.perturbation.eps == 0.125 and other.perturbation.passes == 1
    assert json.loads(RunFolder(folder).marker_path.read_text())["craft"]["eps"] == 0.125
    assert json.loads((folder / "summary.json").read_text())["eps"] == 0.125


def test_force_discards_a_checkpoint(data, interrupted, straight):
    result = _run(interrupted, data, force=True)
    assert result.resumed_passes == 0 and torch.equal(result.perturbation.v, straight.perturbation.v)


def test_replace_crafts_over_a_mismatch_but_reuses_a_match(data, straight, tmp_path):
    model, x, heldout = data
    run = RunFolder(tmp_path / "run")
    first = run.craft(model, x, settings=SETTINGS, heldout=heldout, replace=True, **{**CRAFT, "max_passes": 1})
    same = run.craft(model, x, settings=SETTINGS, heldout=heldout, replace=True, **{**CRAFT, "max_passes": 1})
    assert not first.reused and same.reused
    other = run.craft(model, x, settings=SETTINGS, heldout=heldout, replace=True, **CRAFT)
    assert not other.reused and torch.equal(other.perturbation.v, straight.perturbation.v)


# ---------------------------------------------------------------------------- folder and lock

def test_unusable_folder_or_name_is_a_value_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="cannot use"):
        with RunFolder(tmp_path / "file" / "run").lock():
            pass
    with pytest.raises(ValueError, match="it is a file"):
        with RunFolder(tmp_path / "file").lock():
            pass
    for name in ("", "a/b", ".hidden"):
        with pytest.raises(ValueError, match="plain file name"):
            RunFolder(tmp_path, name)


def test_lock_is_reentrant_on_one_object_exclusive_across_objects(tmp_path):
    run = RunFolder(tmp_path / "run")
    with run.lock():
        assert run.lock_path.read_text().strip() == str(os.getpid())
        with run.lock():  # the same object: re-entrant
            pass
        assert run.lock_path.exists()
        in_use = rf"{re.escape(str(tmp_path / 'run'))} is in use.*pid {os.getpid()}"
        with pytest.raises(RunLocked, match=in_use) as caught:
            with RunFolder(tmp_path / "run").lock():
                pass
        assert caught.value.pid == os.getpid()
        other = RunFolder(tmp_path / "run", "other")  # another run in the same folder has its own lock
        with other.lock():
            pass
    assert not run.lock_path.exists()
    with pytest.raises(Interrupt):  # released on exceptions too
        with run.lock():
            raise Interrupt
    with run.lock():
        pass
    assert not (tmp_path / "run").exists(), "a folder the lock created and nothing used is removed again"


def test_write_methods_need_the_lock(tmp_path):
    with pytest.raises(RuntimeError, match="lock"):
        RunFolder(tmp_path).discard()


_HOLDER = textwrap.dedent("""
    import sys, time
    from uap.runs import RunFolder
    with RunFolder(sys.argv[1]).lock():
        print("locked", flush=True)
        time.sleep(120)
""")


def test_a_second_process_gets_a_clear_error_and_a_dead_holder_blocks_nothing(data, straight, tmp_path):
    folder = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER, str(folder)], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLocked) as caught:
            _run(folder, data)
        message = str(caught.value)
        assert str(folder) in message and f"pid {holder.pid}" in message and caught.value.pid == holder.pid
        assert "\n" not in message
    finally:
        holder.kill()  # dies holding the lock, its lock file left behind
        holder.wait(timeout=60)
        holder.stdout.close()
    assert RunFolder(folder).lock_path.read_text().strip() == str(holder.pid)
    result = _run(folder, data)
    assert not result.reused and torch.equal(result.perturbation.v, straight.perturbation.v)
    assert not RunFolder(folder).lock_path.exists()


def test_a_forced_run_that_fails_at_the_start_keeps_the_old_one(data, straight, tmp_path):
    folder = _copy_run(straight.run.folder, tmp_path / "run")
    with pytest.raises(ValueError, match="method"):
        _run(folder, data, force=True, method="no-such-method")
    assert RunFolder(folder).finished() == straight.record
    assert _run(folder, data).reused
