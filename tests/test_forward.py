"""``uap.forward``: the one inference path (hooked embeddings, layout fallback, eval mode) and the image check."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from tests.eval_models import DetachedEncoderTarget, EncoderTarget, LinearTarget, TinyEncoder, images
from uap.forward import Inference, check_images, encoder_features, encoder_of


def _counting(encoder: nn.Module) -> list[int]:
    seen: list[int] = []
    encoder.register_forward_hook(lambda _m, i, _o: seen.append(len(i[0])))
    return seen


def _direct(model: nn.Module, x: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        xp = (x + v).clamp(0, 1)
        return model(xp).argmax(1), model.encoder(xp).flatten(1)


def test_hooked_embeddings_equal_a_direct_encoder_call_and_the_encoder_runs_once():
    x, _ = images(n=13, seed=1)
    v = torch.full((3, 8, 8), 0.2)
    model = EncoderTarget(seed=1)
    seen = _counting(model.encoder)
    run = Inference(model, embeddings=True)
    out = run(x, v, batch_size=5)
    assert sum(seen) == 13 + 5  # one pass per image, plus the check of the hook on the first batch
    seen.clear()
    run(x, v, batch_size=5)  # the finding is kept: no second check
    assert sum(seen) == 13
    labels, features = _direct(model, x, v)
    assert run.use_hook is True
    torch.testing.assert_close(out.embeddings, features)
    assert torch.equal(out.predictions, labels) and out.num_classes == 4


class _ScaledEncoderCall(EncoderTarget):
    """Calls its ``.encoder`` on transformed input: the hook sees other features than ``encoder(x)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(0.5 * x))


@pytest.mark.parametrize("model", [DetachedEncoderTarget(seed=2), _ScaledEncoderCall(seed=3)],
                         ids=["hook-never-fires", "hook-sees-other-input"])
def test_embeddings_fall_back_to_a_direct_call_when_the_hook_disagrees(model):
    x, _ = images(n=9, seed=2)
    v = torch.full((3, 8, 8), -0.1)
    run = Inference(model, embeddings=True)
    out = run(x, v, batch_size=4)
    labels, features = _direct(model, x, v)
    assert run.use_hook is False
    torch.testing.assert_close(out.embeddings, features)
    assert torch.equal(out.predictions, labels)


class _ViewsItsInput(nn.Module):
    """``x.view(...)`` fails on a channels-last batch: the layout must fall back."""

    def __init__(self) -> None:
        super().__init__()
        self.encoder = TinyEncoder()
        self.fc = nn.Linear(3 * 8 * 8, 4)
        self.layouts: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.layouts.append(x.is_contiguous())
        self.encoder(x)
        return self.fc(x.view(len(x), -1))


def test_a_model_that_rejects_channels_last_still_runs():
    x, _ = images(n=10, seed=3)
    model = _ViewsItsInput().eval()
    run = Inference(model, embeddings=True)
    out = run(x, batch_size=4)
    with torch.no_grad():
        assert torch.equal(out.predictions, model.fc(x.flatten(1)).argmax(1))
        torch.testing.assert_close(out.embeddings, model.encoder(x))
    assert run.layout.channels_last is False
    assert model.layouts[0] is False and all(model.layouts[1:])  # one refused channels-last try, then contiguous


class _Modes(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.BatchNorm1d(3 * 8 * 8).eval()
        self.drop = nn.Dropout(0.9)
        self.fc = nn.Linear(3 * 8 * 8, 4)
        self.seen: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen.append(self.training or self.drop.training)
        return self.fc(self.drop(self.frozen(x.flatten(1))))


def test_runs_in_eval_mode_without_autograd_and_restores_each_mode():
    x, _ = images(n=6, seed=4)
    model = _Modes().train()
    model.frozen.eval()
    first = Inference(model)(x)
    second = Inference(model)(x)
    assert model.seen == [False, False]  # eval mode during the passes (dropout off: deterministic)
    assert torch.equal(first.predictions, second.predictions)
    assert model.training and model.drop.training and not model.frozen.training
    out = Inference(EncoderTarget(seed=1).requires_grad_(True), embeddings=True)(x)
    assert not out.embeddings.requires_grad and out.predictions.dtype == torch.int64


def test_bad_batch_size_and_perturbation_shape_are_value_errors():
    x, _ = images(n=4)
    with pytest.raises(ValueError, match="batch_size"):
        Inference(LinearTarget())(x, batch_size=0)
    with pytest.raises(ValueError, match="shape"):
        Inference(LinearTarget())(x, torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="nn.Module"):
        Inference(lambda t: t)  # type: ignore[arg-type]


def test_encoder_lookup_and_feature_check():
    assert encoder_of(LinearTarget()) is None
    enc = EncoderTarget().encoder
    assert encoder_of(EncoderTarget()) is not None and isinstance(enc, nn.Module)
    with pytest.raises(ValueError, match="method 'feature' needs a target with an .encoder"):
        encoder_of(LinearTarget(), required=True, needed_by="method 'feature'")
    x, _ = images(n=3)
    assert encoder_features(enc, x).shape == (3, 16)
    with pytest.raises(ValueError, match=r"m\.encoder must return an N×D feature tensor"):
        encoder_features(lambda t: t.sum(), x, name="m")
    with pytest.raises(ValueError, match="N×D"):
        encoder_features(lambda t: t[:1].flatten(1), x)


# ---------------------------------------------------------------------------- the image check

@pytest.mark.parametrize("x, match", [
    (torch.full((2, 3, 4, 4), float("nan")), "NaN"),
    (torch.rand(2, 3, 4, 4).index_put_((torch.tensor([1]),), torch.tensor(float("nan"))), "NaN"),
    (torch.rand(2, 3, 4, 4).index_fill_(0, torch.tensor([0]), float("inf")), "infinite"),
    (torch.rand(2, 3, 4, 4) * 255, "normalisation lives inside the model"),
    (torch.rand(2, 3, 4, 4) * 255, "255"),
    (torch.rand(2, 3, 4, 4) - 0.5, r"\[0, 1\]"),
    (torch.randint(0, 255, (2, 3, 4, 4), dtype=torch.uint8), "floating-point"),
    (torch.rand(3, 4, 4), "N×C×H×W"),
    (torch.rand(0, 3, 4, 4), "empty"),
])
def test_check_images_refuses_what_is_not_images_in_unit_range(x, match):
    with pytest.raises(ValueError, match=match):
        check_images(x)


def test_check_images_accepts_the_unit_range_in_every_float_dtype():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        x = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1).to(dtype)
        assert check_images(x) is x


def test_every_entry_point_refuses_nan_images(tmp_path):
    from uap.evaluate import evaluate
    from uap.metrics import fooling_rate, predict
    from uap.plots import plot_examples

    x, _ = images(n=4)
    x[2, 0, 0, 0] = float("nan")
    model, v = LinearTarget(), torch.zeros(3, 8, 8)
    for call in (lambda: predict(model, x), lambda: fooling_rate(model, x, v), lambda: evaluate({"v": v}, {"m": model}, x),
                 lambda: plot_examples(x, {"v": v}, {"v": ("m", model)}, tmp_path / "e.png")):
        with pytest.raises(ValueError, match="NaN"):
            call()
    assert not (tmp_path / "e.png").exists()


def test_large_images_run_in_smaller_batches(monkeypatch):
    """A batch over the inference budget is split; small images keep the asked batch size."""
    from uap import forward

    small = torch.zeros(600, 3, 32, 32)
    assert [len(b) for b in forward.batches(small, 256)] == [256, 256, 88]
    monkeypatch.setattr(forward, "INFERENCE_BUDGET", 10 * 3 * 20 * 20)
    large = torch.rand(25, 3, 20, 20)
    parts = list(forward.batches(large, 256))
    assert [len(b) for b in parts] == [10, 10, 5]
    torch.testing.assert_close(torch.cat(parts), large)
    assert [len(b) for b in forward.batches(torch.rand(3, 3, 80, 80), 256)] == [1, 1, 1]  # never 0 per slice
