"""Data-parallel training: two gloo ranks with half a batch each take the step one process
takes with the whole batch (SimCLR, CLIP, MoCo), FSDP takes DDP's steps, and ``uap train``
under torchrun writes one checkpoint.

The views are fixed (augmentations are each rank's own random draws, so they cannot match a
one-process run); everything else is the training code as it runs. Each equality has
controls that switch one ingredient off (SyncBN, gathered negatives, the cross-rank
shuffle) and must then differ, so the equalities are not vacuous.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import torch
import torch.distributed as dist

from tests.test_distributed import spawn_two_ranks

B, SIZE = 128, 16  # global batch (2 ranks × 64 against one process × 128), image side
TOL = 1e-5


def _batch(seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(B, 3, SIZE, SIZE, generator=g), torch.randint(0, 10, (B,), generator=g)


def _method(kind: str):
    """A tiny method whose views are fixed functions of the images."""
    from models.backbones import build_backbone, vit_small_cifar

    torch.manual_seed(0)
    if kind.startswith("vit"):  # a two-block ViT, no stochastic depth
        backbone = vit_small_cifar(dim=32, depth=2, heads=2, drop_path=0.0, image_size=SIZE)
        backbone.spec = {"backbone": "vit_small", "width": 0}
    else:
        backbone = build_backbone("resnet18", 4)
    if kind in ("simclr", "vit-simclr"):
        from models.methods.simclr import SimCLR

        method = SimCLR(backbone, proj_dim=16, hidden_dim=32)
        method.augment = _Views()
    elif kind == "vit-byol":
        from models.methods.byol import BYOL

        method = BYOL(backbone, proj_dim=16, hidden_dim=32)
        method.augment = _Views()
    elif kind == "vit-dino":  # the packed multi-crop forward through FSDP's per-block units
        from models.augment import MultiCrop
        from models.methods.dino import DINO

        method = DINO(backbone, out_dim=64, n_local=2, warmup_teacher_steps=0)
        method.multicrop = MultiCrop(global_size=SIZE, local_size=SIZE // 2, n_local=2)
    elif kind == "moco":
        from models.methods.moco import MoCo

        method = MoCo(backbone, queue_size=640, proj_dim=16, hidden_dim=32, bn_splits=2)  # more slots than 2 steps fill
        method.augment = _Views()
    elif kind == "clip":
        method = _FixedCaptionCLIP(backbone, embed_dim=16, text_width=16, text_layers=1, text_heads=2, val_size=0)
    else:
        raise ValueError(kind)
    return method


class _Views:
    """Two different deterministic 'augmentations', alternating: the image and its mirror."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x if self.calls % 2 else x.flip(3)


def _fixed_caption_clip():
    from models.methods.clip import CLIPMethod

    class FixedCaptionCLIP(CLIPMethod):
        """CLIP trained on one fixed caption per class and unaugmented images."""

        def training_step(self, x, y, step, max_steps):
            ids, eot = self.clip.tokenize([f"a photo of a {self.classes[int(c)]}" for c in y])
            return self.clip.loss(x, ids, eot)

    return FixedCaptionCLIP


def _FixedCaptionCLIP(*args, **kwargs):
    return _fixed_caption_clip()(*args, **kwargs)


def _steps(kind: str, strategy: str = "ddp", sync_bn: bool = True, steps: int = 2) -> dict:
    """``steps`` optimiser steps of ``kind`` on this rank's rows of the batch: the losses, the
    parameters after them (whole), and MoCo's queue."""
    from models.parallel import full_tensor, parallelize, rank_rows, rank_share
    from models.train import build_optimizer, optimisation_step, sync_batchnorm_if_distributed

    method = _method(kind)
    if sync_bn:
        method = sync_batchnorm_if_distributed(method)
    stepper = parallelize(method, strategy)
    optimizer = build_optimizer(method, "adamw" if kind.startswith("vit") else "sgd", 0.05, 1e-4)
    x, y = _batch()
    rows = rank_rows(B)
    method.train()
    losses = []
    for step in range(steps):
        xs, ys = (x, y) if step % 2 == 0 else (x.flip(2), y)  # a second batch
        losses.append(float(optimisation_step(method, optimizer, xs[rows], ys[rows], step, 10, forward=stepper,
                                              share=rank_share(B))))
    params = torch.cat([full_tensor(p.detach()).flatten() for p in method.parameters()])
    out = {"losses": losses, "params": params}
    if kind == "moco":
        out["queue"], out["ptr"] = method.queue.keys.clone(), int(method.queue.ptr)
    return out


@contextlib.contextmanager
def _local(module, name: str):
    """``module.name`` computed by each rank alone (no collectives inside it)."""
    from uap.distributed import alone

    original = getattr(module, name)

    def local(*args, **kwargs):
        with alone():
            return original(*args, **kwargs)

    with mock.patch.object(module, name, local):
        yield


def _two_rank_cases() -> dict:
    import models.clip as clip_module
    import models.methods.simclr as simclr_module
    from models.methods.moco import MoCo
    from uap.distributed import gather_rows

    out = {}
    for kind in ("simclr", "clip", "moco"):
        out[kind] = _steps(kind)
        ranks = gather_rows(out[kind]["params"].view(1, -1), 2)
        out[kind]["ranks_differ_by"] = float((ranks[0] - ranks[1]).abs().max())
    out["simclr-no-syncbn"] = _steps("simclr", sync_bn=False)
    with _local(simclr_module, "nt_xent"):
        out["simclr-local-negatives"] = _steps("simclr")
    with _local(clip_module, "clip_loss"):
        out["clip-local-negatives"] = _steps("clip")
    with _local(MoCo, "_keys"):
        out["moco-local-shuffle"] = _steps("moco")
    for kind in ("vit-simclr", "vit-byol", "vit-dino"):
        for strategy in ("ddp", "fsdp"):
            out[f"{kind}-{strategy}"] = _steps(kind, strategy, steps=3)
    return out


def _transfer(out_dir: Path | None) -> dict:
    """A three-source transfer matrix (two sources on rank 0, one on rank 1) and its re-run."""
    from tests.eval_models import EncoderTarget, LinearTarget, images
    from uap.transfer import transfer_matrix

    x_craft, _ = images(n=16, seed=10)
    x_eval, y_eval = images(n=12, seed=11)
    models = {"lin": LinearTarget(seed=0), "probe": EncoderTarget(seed=1), "lin2": LinearTarget(seed=2)}
    settings = dict(eps=0.25, norm="inf", delta=0.2, max_passes=2, seed=0, batch_size=5, baselines="random")
    first = transfer_matrix(models, x_craft, x_eval, y_eval, out_dir=out_dir, **settings)
    again = transfer_matrix(models, x_craft, x_eval, y_eval, out_dir=out_dir, **settings)
    return {"report": first.report.to_json(), "v": {k: v.clone() for k, v in first.perturbations.items()},
            "reused": again.reused, "again": again.report.to_json()}


def _worker(rank: int, size: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=size)
    try:
        out = _two_rank_cases()
        out["transfer"] = _transfer(Path(path).parent / "transfer")
        if rank == 0:
            torch.save(out, path)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return spawn_two_ranks(_worker, tmp_path_factory.mktemp("dist-train"))


@pytest.fixture(scope="module")
def one_process():
    torch.set_num_threads(1)
    return {kind: _steps(kind) for kind in ("simclr", "clip", "moco")}


def _difference(a: dict, b: dict) -> float:
    diffs = [max(abs(u - v) for u, v in zip(a["losses"], b["losses"])), float((a["params"] - b["params"]).abs().max())]
    if "queue" in a:
        diffs.append(float((a["queue"] - b["queue"]).abs().max()))
    return max(diffs)


@pytest.mark.parametrize("kind", ["simclr", "clip", "moco"])
def test_two_ranks_take_the_one_process_step(two_ranks, one_process, kind):
    two, one = two_ranks[kind], one_process[kind]
    assert two["ranks_differ_by"] == 0.0  # the ranks' parameters stay identical
    assert _difference(two, one) <= TOL
    if kind == "moco":
        assert two["ptr"] == one["ptr"] == 2 * 2 * B  # two steps of 2B global keys each


@pytest.mark.parametrize("control, kind", [("simclr-no-syncbn", "simclr"), ("simclr-local-negatives", "simclr"),
                                           ("clip-local-negatives", "clip"), ("moco-local-shuffle", "moco")])
def test_each_ingredient_switched_off_changes_the_step(two_ranks, one_process, control, kind):
    assert _difference(two_ranks[control], one_process[kind]) > 100 * TOL


def test_the_parameter_update_is_not_negligible(one_process):
    before = torch.cat([p.detach().flatten() for p in _method("simclr").parameters()])
    assert float((one_process["simclr"]["params"] - before).abs().max()) > 1000 * TOL


@pytest.mark.parametrize("kind", ["vit-simclr", "vit-byol", "vit-dino"])
def test_fsdp_takes_the_ddp_steps(two_ranks, kind):
    assert _difference(two_ranks[f"{kind}-fsdp"], two_ranks[f"{kind}-ddp"]) <= TOL


def test_two_rank_transfer_matrix_is_the_one_process_matrix(two_ranks, tmp_path):
    import json

    one, two = _transfer(tmp_path / "one"), two_ranks["transfer"]
    report = json.loads(two["report"])
    assert report["fooling_rate"] == json.loads(one["report"])["fooling_rate"]
    assert report["perturbations"] == json.loads(one["report"])["perturbations"]
    for name, v in one["v"].items():
        torch.testing.assert_close(two["v"][name], v, rtol=0, atol=1e-6)
    assert two["reused"] == one["reused"] == ["lin", "probe", "lin2"]  # each rank's runs were written and found
    assert json.loads(two["again"])["fooling_rate"] == report["fooling_rate"]


# --------------------------------------------------------------------------- uap train under torchrun


def _torchrun(args: list[str], timeout: float = 150) -> subprocess.CompletedProcess:
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "UAP_DIST_TIMEOUT": "30"}
    entry = str(root / "tests" / "train_entry.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           entry, *args]
    return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)


TRAIN = ["train", "simclr", "--epochs", "1", "--batch-size", "32", "--width", "4", "--n-train", "96",
         "--knn-every", "0", "--threads", "1", "-H", "proj_dim=16", "-H", "hidden_dim=32"]


def test_uap_train_under_torchrun_writes_one_checkpoint_on_rank_0(tmp_path, data_root):
    from models.methods import get_training_method
    from models.train import CKPT_NAME, STATE_NAME, TrainConfig, build_method, load_checkpoint

    done = _torchrun([*TRAIN, "--out", str(tmp_path / "two")])
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 1/1") == 1  # rank 0 alone reports
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted([CKPT_NAME, STATE_NAME])
    method = build_method(TrainConfig(method="simclr", width=4, hparams={"proj_dim": 16, "hidden_dim": 32}).resolved())
    state = load_checkpoint(tmp_path / "two", method)
    assert state["step"] == 3 and state["epoch"] == 1 and state["world_size"] == 2
    assert len(state["history"]) == 1 and torch.isfinite(torch.tensor(state["history"][0]["loss"]))
    from safetensors.torch import load_file

    rng = load_file(str(tmp_path / "two" / CKPT_NAME))["rng.torch.ranks"]
    assert rng.shape[0] == 2 and not torch.equal(rng[0], rng[1])  # each rank's own augmentation stream
    assert get_training_method("simclr") is type(method)


def test_a_rank_that_raises_ends_the_training_job_with_one_line(tmp_path, data_root):
    out = tmp_path / "failed"
    failing = _torchrun(["--fail-on-rank", "1", *TRAIN, "--out", str(out)], timeout=150)
    assert failing.returncode != 0
    ours = [line for line in failing.stderr.splitlines() if line.startswith("error:")]
    assert any("refuses to train on rank 1" in line for line in ours), failing.stderr[-3000:]
    assert any("another rank failed" in line for line in ours), failing.stderr[-3000:]
    assert "Traceback (most recent call last):\n  File \"/work" not in failing.stderr  # none of ours
    assert not out.exists() or not any(out.iterdir())  # rank 0 never got to write
