"""``uap.criteria``: untargeted vs targeted success, decided once and asked by driver and methods."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import uap
from tests.tiny_models import tiny_mlp
from uap.criteria import Targeted, Untargeted, clamped_cross_entropy, target_margin, targeted_success_rate
from uap.metrics import fooling_rate, predict

LOGITS = torch.tensor([[2.0, 1.0, 0.0],    # predicts 0
                       [0.0, 3.0, 1.0],    # predicts 1
                       [1.0, 1.0, 5.0],    # predicts 2
                       [4.0, 0.0, 4.0]])   # a tie between 0 and 2
CLEAN = torch.tensor([0, 2, 2, 1])


def test_untargeted_counts_a_changed_prediction():
    c = Untargeted()
    assert c.reached(LOGITS, CLEAN).tolist() == [False, True, False, True]
    assert c.needs_update(LOGITS, CLEAN).tolist() == [True, False, True, False]
    assert torch.equal(c.labels(CLEAN), CLEAN)
    assert c.key == "fooling_rate" and c.target is None and c.describe() == {}
    assert not c.checks_updates and c.improves(LOGITS[:1], LOGITS[1:2])
    assert c.foolbox == "Misclassification"
    assert torch.equal(c.ascent_loss(LOGITS, CLEAN, 0.5), clamped_cross_entropy(LOGITS, CLEAN, 0.5))
    assert c.ascent_loss(LOGITS, CLEAN, math.inf) == pytest.approx(F.cross_entropy(LOGITS, CLEAN).item())


def test_targeted_counts_a_positive_margin_and_judges_updates():
    c = Targeted(2)
    assert c.reached(LOGITS, CLEAN).tolist() == [False, False, True, False]  # a tie is not reached
    assert c.needs_update(LOGITS, CLEAN).tolist() == [True, True, False, True]
    assert c.labels(CLEAN).tolist() == [2, 2, 2, 2] and c.labels(CLEAN).dtype == CLEAN.dtype
    assert c.key == "targeted_success_rate" and c.target == 2 and c.describe() == {"target": 2}
    assert c.foolbox == "TargetedMisclassification"
    assert c.ascent_loss(LOGITS, CLEAN, 0.1).item() == pytest.approx(-F.cross_entropy(LOGITS, c.labels(CLEAN)).item())
    assert c.checks_updates
    assert c.improves(LOGITS[0:1], LOGITS[2:3]) and not c.improves(LOGITS[2:3], LOGITS[0:1])
    assert target_margin(LOGITS, 2).tolist() == [-2.0, -2.0, 4.0, 0.0]
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="class index"):
            Targeted(bad)


def test_rates_and_record_entries_measure_the_model():
    model = tiny_mlp()
    x = torch.rand(20, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    held = torch.rand(10, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    v = 0.2 * torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(2))
    clean = predict(model, x)
    assert Untargeted().rate(model, x, v, clean=clean, batch_size=8) == fooling_rate(model, x, v)
    assert Untargeted().rate(model, x, v, clean=clean, batch_size=8, fooling=0.25) == 0.25  # measured already
    assert Untargeted().record(model, held, v, 0.5, batch_size=8) == {}
    t = Targeted(1)
    rate = targeted_success_rate(model, x, v, 1)
    assert t.rate(model, x, v, clean=clean, batch_size=8, fooling=0.25) == rate  # its own rate, not Err(X_v)
    assert t.record(model, held, v, rate, batch_size=8) == {
        "targeted_success_rate": rate, "heldout_targeted_success_rate": targeted_success_rate(model, held, v, 1)}
    assert t.record(model, None, v, rate, batch_size=8)["heldout_targeted_success_rate"] is None


def test_craft_hands_the_run_its_criterion_once():
    seen = []

    @uap.register_method("criterion-probe")
    def probe(ctx) -> None:
        seen.append(ctx.criterion)

    model, x = tiny_mlp(), torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    targeted = uap.craft(model, x, eps=0.1, method="criterion-probe", max_passes=2, delta=0, target=1)
    assert [repr(c) for c in seen] == ["Targeted(1)", "Targeted(1)"] and seen[0] is seen[1]
    assert targeted.extra["target"] == 1 and "targeted_success_rate" in targeted.history[0]
    seen.clear()
    plain = uap.craft(model, x, eps=0.1, method="criterion-probe", max_passes=1)
    assert [repr(c) for c in seen] == ["Untargeted()"]
    assert "target" not in plain.extra and "targeted_success_rate" not in plain.history[0]
    with pytest.raises(ValueError, match="out of range"):
        uap.craft(model, x, eps=0.1, method="criterion-probe", target=99)
