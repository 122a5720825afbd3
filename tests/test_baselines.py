"""``uap.baselines``: noise, chessboards and the Fourier-basis search, at the asked norm."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tests.eval_models import LinearTarget, images
from uap.baselines import (
    BASELINES,
    CHESSBOARD_CELLS,
    CHESSBOARDS,
    build_baselines,
    chessboard,
    fourier_basis,
    fourier_search,
    gaussian_perturbation,
    parse_baselines,
    random_perturbation,
)

NORMS = [math.inf, 2.0, 1.0]


# ---------------------------------------------------------------------------- random baseline

@pytest.mark.parametrize("p", [math.inf, 2.0, 1.0])
@pytest.mark.parametrize("eps", [8 / 255, 0.5, 3.0])
def test_random_perturbation_has_exactly_the_asked_norm(p, eps):
    r = random_perturbation((3, 16, 16), eps, p, seed=1)
    assert r.shape == (3, 16, 16) and r.dtype == torch.float32
    assert torch.linalg.vector_norm(r.flatten().double(), ord=p).item() == pytest.approx(eps, rel=1e-6)


def test_random_linf_is_signs_times_eps_and_balanced():
    r = random_perturbation((3, 32, 32), 8 / 255, math.inf, seed=0)
    eps = torch.tensor(8 / 255, dtype=torch.float32)
    assert torch.equal(r.abs(), eps.expand_as(r))
    assert abs((r > 0).float().mean().item() - 0.5) < 0.05  # fair coin over 3072 pixels


def test_random_l2_direction_is_isotropic():
    draws = torch.stack([random_perturbation((50,), 1.0, 2.0, seed=s) for s in range(400)])
    # uniform on the sphere: E[r] = 0 and E[r r^T] = I / d
    assert draws.mean(0).abs().max() < 0.03
    assert (draws.pow(2).mean(0) * 50).sub(1).abs().max() < 0.35


def test_random_perturbation_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = random_perturbation((3, 4, 4), 0.1, 2.0, seed=5)
    after = torch.rand(1)
    assert torch.equal(before, after)
    assert torch.equal(a, random_perturbation((3, 4, 4), 0.1, 2.0, seed=5))
    assert not torch.equal(a, random_perturbation((3, 4, 4), 0.1, 2.0, seed=6))


@pytest.mark.parametrize("args, match", [(((3, 4), 0.0, 2.0), "eps"), (((3, 4), 0.1, 3.0), "p must"),
                                         (((), 0.1, 2.0), "shape"), (((3, 0), 0.1, 2.0), "shape")])
def test_random_perturbation_rejects_bad_input(args, match):
    with pytest.raises(ValueError, match=match):
        random_perturbation(*args)


# ---------------------------------------------------------------------------- every baseline

@pytest.mark.parametrize("p", NORMS)
@pytest.mark.parametrize("make", [
    lambda eps, p: gaussian_perturbation((3, 10, 12), eps, p, seed=3),
    *[(lambda eps, p, c=c: chessboard((3, 10, 12), eps, p, cell=c)) for c in CHESSBOARD_CELLS],
    lambda eps, p: fourier_basis((3, 10, 12), eps, p, frequency=(2, 7), phase=1, channel_signs=(1, -1, -1)),
    lambda eps, p: fourier_basis((3, 10, 12), eps, p, frequency=(0, 0)),
], ids=["gaussian", *(f"chessboard{c}" for c in CHESSBOARD_CELLS), "fourier", "fourier-dc"])
def test_every_baseline_has_exactly_the_requested_norm(make, p):
    for eps in (10 / 255, 1.5):
        r = make(eps, p)
        assert r.shape == (3, 10, 12) and r.dtype == torch.float32
        assert torch.linalg.vector_norm(r.flatten().double(), ord=p).item() == pytest.approx(eps, rel=1e-6)


@pytest.mark.parametrize("p", NORMS)
def test_build_baselines_gives_every_row_at_the_norm(p):
    x, _ = images(n=6, seed=1)
    built = build_baselines("all", (3, 8, 8), 0.1, p, models={"lin": LinearTarget()}, x_craft=x)
    assert list(built.perturbations) == ["random", "gaussian", *CHESSBOARDS, "fourier:lin"]
    for name, v in built.perturbations.items():
        assert torch.linalg.vector_norm(v.flatten().double(), ord=p).item() == pytest.approx(0.1, rel=1e-6), name
    assert built.info["fourier:lin"]["kind"] == "fourier" and built.info["chessboard2"]["norm"] == {
        math.inf: "inf", 2.0: "2", 1.0: "1"}[p]


@pytest.mark.parametrize("cell", CHESSBOARD_CELLS)
def test_chessboard_cells(cell):
    h, w = 20, 18  # not multiples of every cell size: the last cells are cut
    r = chessboard((3, h, w), 0.05, math.inf, cell=cell)
    assert torch.equal(r[0], r[1]) and torch.equal(r[0], r[2]), "the same sign on every channel"
    assert torch.equal(r.abs(), torch.full_like(r, 0.05))
    assert r[0, 0, 0] > 0, "the top-left cell is positive"
    for i in range(h):
        for j in range(w):
            expected = 1 if (i // cell + j // cell) % 2 == 0 else -1
            assert r[0, i, j].sign().item() == expected, (i, j)
    # a cell is constant, the next cell right and below flips
    assert torch.unique(r[0, :cell, :cell]).numel() == 1
    if w > cell:
        assert r[0, 0, cell] == -r[0, 0, 0]
    if h > cell:
        assert r[0, cell, 0] == -r[0, 0, 0]


def test_chessboard_l2_is_the_pattern_rescaled():
    r = chessboard((3, 8, 8), 2.0, 2.0, cell=2)
    assert torch.allclose(r, chessboard((3, 8, 8), 1.0, math.inf, cell=2) * (2.0 / math.sqrt(3 * 64)))


def test_baselines_are_deterministic_by_seed():
    shape, x = (3, 8, 8), images(n=6, seed=1)[0]
    a = build_baselines("all", shape, 0.1, 2.0, seed=4, models={"lin": LinearTarget()}, x_craft=x)
    b = build_baselines("all", shape, 0.1, 2.0, seed=4, models={"lin": LinearTarget()}, x_craft=x)
    c = build_baselines("all", shape, 0.1, 2.0, seed=5, models={"lin": LinearTarget()}, x_craft=x)
    for name in a.perturbations:
        assert torch.equal(a.perturbations[name], b.perturbations[name]), name
    for name in ("random", "gaussian"):
        assert not torch.equal(a.perturbations[name], c.perturbations[name]), name
    for name in ("chessboard1", "chessboard8"):  # patterns: no randomness at all
        assert torch.equal(a.perturbations[name], c.perturbations[name])


def test_fourier_basis_is_the_cosine_and_its_sign():
    c, h, w = 3, 10, 12
    i = torch.arange(h, dtype=torch.float64)[:, None]
    j = torch.arange(w, dtype=torch.float64)[None, :]
    cos = torch.cos(2 * math.pi * (3 * i / h + 5 * j / w) + math.pi / 2)  # phase 1 = +π/2
    r = fourier_basis((c, h, w), 1.0, 2.0, frequency=(3, 5), phase=1, channel_signs=(1, -1, 1)).double()
    expected = torch.stack([cos, -cos, cos])
    assert torch.allclose(r, expected / expected.norm(), atol=1e-6)
    sq = fourier_basis((c, h, w), 0.1, math.inf, frequency=(3, 5), phase=1)
    nonzero = cos.abs() > 1e-9
    assert torch.equal(sq[0][nonzero].sign(), cos[nonzero].sign().float())
    # conjugate frequency with the opposite phase: the same image
    assert torch.allclose(r, fourier_basis((c, h, w), 1.0, 2.0, frequency=(h - 3, w - 5), phase=3,
                                           channel_signs=(1, -1, 1)).double(), atol=1e-6)
    with pytest.raises(ValueError, match="is zero"):
        fourier_basis((c, h, w), 1.0, 2.0, frequency=(0, 0), phase=1)  # sin of a constant


def test_parse_baselines():
    assert parse_baselines("fourier, chessboard,random") == ("random", *CHESSBOARDS, "fourier")
    assert parse_baselines("all") == BASELINES and parse_baselines("none") == () == parse_baselines("")
    assert parse_baselines(["chessboard2", "chessboard2"]) == ("chessboard2",)
    with pytest.raises(ValueError, match="unknown baseline 'checkers'"):
        parse_baselines("random,checkers")


# ---------------------------------------------------------------------------- Fourier search

class CosineDirection(nn.Module):
    """Two classes; the logit difference is ``<w, x − 0.5>`` with ``w`` a 2-D cosine at a known
    frequency and per-channel signs: that basis direction is the model's most sensitive one."""

    def __init__(self, shape, frequency, signs):
        super().__init__()
        w = fourier_basis(shape, 1.0, 2.0, frequency=frequency, phase=0, channel_signs=signs)
        self.register_buffer("w", w.flatten())

    def forward(self, x):
        m = (x - 0.5).flatten(1) @ self.w
        return torch.stack([m, torch.zeros_like(m)], dim=1)


class Recorder(nn.Module):
    """Wraps a model and keeps every batch it is run on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.batches = model, []

    def forward(self, x):
        self.batches.append(x.detach().clone())
        return self.model(x)


def _flat_images(n, shape, seed):
    gen = torch.Generator().manual_seed(seed)
    return 0.5 + 0.25 * (2 * torch.rand((n, *shape), generator=gen) - 1)  # in [0.25, 0.75]: no clipping


@pytest.mark.parametrize("p, eps", [(math.inf, 0.01), (2.0, 0.25)])
def test_fourier_search_finds_the_most_sensitive_frequency(p, eps):
    shape, freq, signs = (3, 16, 16), (3, 5), (1, -1, 1)
    model = CosineDirection(shape, freq, signs)
    x = _flat_images(64, shape, seed=0)
    found = fourier_search(model, x, eps, p, seed=0)
    assert found.frequency == freq and found.channel_signs == signs and found.phase in (0, 2)
    assert found.fooling_rate > 0.25
    assert torch.linalg.vector_norm(found.v.flatten().double(), ord=p).item() == pytest.approx(eps, rel=1e-6)
    # the reported rate is the fooling rate of the returned v on the crafting images
    with torch.no_grad():
        fooled = (model(x).argmax(1) != model((x + found.v).clamp(0, 1)).argmax(1)).double().mean().item()
    assert found.fooling_rate == pytest.approx(fooled)
    # successive halving: far cheaper than every candidate on every image
    assert found.evaluations < found.candidates * len(x) / 2
    assert found.rounds[0]["candidates"] > found.rounds[-1]["candidates"]


def test_fourier_search_runs_batched_on_the_crafting_images_only():
    x_craft, _ = images(n=12, seed=3)
    x_heldout, _ = images(n=12, seed=4)
    model = Recorder(LinearTarget(seed=0))
    eps = 0.05
    found = fourier_search(model, x_craft, eps, math.inf, seed=0, batch_size=32)
    seen = torch.cat(model.batches)
    assert all(len(b) > 1 for b in model.batches), "never one image at a time"
    assert len(seen) == found.evaluations + len(x_craft)  # the search plus one clean pass
    # every image the model saw is a crafting image moved by at most eps; none is near a held-out one
    to_craft = (seen[:, None] - x_craft[None]).abs().flatten(2).amax(2).min(1).values
    to_heldout = (seen[:, None] - x_heldout[None]).abs().flatten(2).amax(2).min(1).values
    assert bool((to_craft <= eps + 1e-6).all()) and bool((to_heldout > 4 * eps).all())


def test_fourier_search_is_deterministic_and_checks_its_options():
    x, _ = images(n=10, seed=5)
    model = LinearTarget(seed=2)
    a, b = (fourier_search(model, x, 0.1, 2.0, seed=1) for _ in range(2))
    assert torch.equal(a.v, b.v) and (a.frequency, a.phase, a.channel_signs) == (b.frequency, b.phase, b.channel_signs)
    small = fourier_search(model, x, 0.1, 2.0, max_frequency=1)
    assert all(min(f, 8 - f) <= 1 for f in small.frequency)
    with pytest.raises(ValueError, match="eta"):
        fourier_search(model, x, 0.1, 2.0, eta=1)
    with pytest.raises(ValueError, match="needs models"):
        build_baselines("fourier", (3, 8, 8), 0.1, 2.0)


def test_strongest_baseline_is_the_best_data_free_row():
    from tests.tiny_models import tiny_mlp
    from uap.baselines import DATA_FREE, strongest_baseline

    model = tiny_mlp()
    x = torch.rand(30, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    y = torch.arange(30) % 5
    found = strongest_baseline(model, x, 0.2, math.inf, y=y, seed=0)
    assert set(found["rates"]) == set(DATA_FREE)
    assert found["fooling_rate"] == max(found["rates"].values()) == found["rates"][found["name"]]
    assert 0.0 <= found["accuracy"] <= 1.0


def test_negated_chessboards_are_the_boards_with_the_other_sign():
    from uap.baselines import build_baselines, chessboard

    built = build_baselines("chessboard", (3, 8, 8), 0.1, "inf").perturbations
    for cell in (1, 2, 4, 8):
        assert torch.equal(built[f"chessboard{cell}n"], -built[f"chessboard{cell}"])
        assert float(built[f"chessboard{cell}"][0, 0, 0]) == pytest.approx(0.1)
    assert torch.equal(chessboard((3, 8, 8), 1.0, 2, sign=-1), -chessboard((3, 8, 8), 1.0, 2))
    with pytest.raises(ValueError, match="sign"):
        chessboard((3, 8, 8), 0.1, sign=0)


# ---------------------------------------------------------------------------- the registry

def test_the_registry_holds_every_built_in_baseline_in_row_order():
    import uap.baselines
    from uap.baselines import DATA_FREE, available_baselines, data_free_baselines, get_baseline, needs_of, row_names

    assert available_baselines() == BASELINES == ("random", "gaussian", *CHESSBOARDS, "fourier")
    assert DATA_FREE == data_free_baselines() == ("random", "gaussian", *CHESSBOARDS)
    assert parse_baselines("data-free") == DATA_FREE and parse_baselines("chessboard") == CHESSBOARDS
    assert get_baseline("chessboard4n") is get_baseline("chessboard") is uap.baselines.Chessboard
    assert needs_of("random,chessboard") == frozenset() and needs_of("all") == {"models", "x_craft"}
    assert row_names("fourier,random", ["a", "b"]) == ["random", "fourier:a", "fourier:b"]
    assert row_names("all") == list(DATA_FREE)  # no models, no per-model rows
    with pytest.raises(ValueError, match="unknown baseline 'stripes'"):
        get_baseline("stripes")


class Stripes:
    """The body of a baseline defined in a test: vertical stripes one pixel wide, a pattern no
    built-in baseline has (the chessboards alternate along both axes)."""

    @staticmethod
    def pattern(shape):
        c, h, w = shape
        return (1.0 - 2.0 * (torch.arange(w) % 2).to(torch.float64)).expand(c, h, w)


@pytest.fixture
def stripes():
    """Registers ``stripes`` by one class and one decorator, as a user would; removes it after."""
    from uap.baselines import Baseline, available_baselines, register_baseline, unregister_baseline

    before = available_baselines()

    @register_baseline()
    class StripesBaseline(Baseline):
        name = "stripes"

        def make(self, variant, ctx):
            return ctx.scaled(Stripes.pattern(ctx.shape))

    yield StripesBaseline
    unregister_baseline("stripes")
    assert available_baselines() == before


class StripeDetector(nn.Module):
    """Two classes; the logit difference is the image's correlation with the stripes, so the
    stripes pattern is the single most harmful direction at any budget."""

    def __init__(self, shape=(3, 8, 8)):
        super().__init__()
        self.register_buffer("w", Stripes.pattern(shape).float().flatten() / math.prod(shape))

    def forward(self, x):
        m = (x - 0.5).flatten(1) @ self.w
        return torch.stack([m, torch.zeros_like(m)], dim=1)


def test_a_new_baseline_is_one_class_and_one_registration(stripes):
    import uap
    from uap.baselines import DATA_FREE, needs_of, strongest_baseline

    assert parse_baselines("all") == (*BASELINES, "stripes") and parse_baselines("stripes,random") == ("random", "stripes")
    assert DATA_FREE[-1] == "stripes" and parse_baselines("data-free")[-1] == "stripes"
    assert needs_of("stripes") == frozenset()

    built = build_baselines("random,stripes", (3, 8, 8), 0.1, math.inf)
    assert list(built.perturbations) == ["random", "stripes"]
    v = built.perturbations["stripes"]
    assert torch.equal(v, (Stripes.pattern((3, 8, 8)) * 0.1).float())
    assert built.info["stripes"] == {"kind": "stripes", "eps": 0.1, "norm": "inf", "seed": 0}
    assert torch.linalg.vector_norm(build_baselines("stripes", (3, 8, 8), 0.5, 1.0).perturbations["stripes"].double(),
                                    ord=1).item() == pytest.approx(0.5)

    # it is data-free, so a crafted UAP is read against it too: here it is the strongest
    model = StripeDetector()
    x = _flat_images(40, (3, 8, 8), seed=1)
    found = strongest_baseline(model, x, 0.1, math.inf)
    assert set(found["rates"]) == set(DATA_FREE) and found["name"] == "stripes"
    assert found["fooling_rate"] > max(r for name, r in found["rates"].items() if name != "stripes")

    # and a row of uap.evaluate, built there at the perturbations' budget
    uap_v = torch.full((3, 8, 8), 0.05)
    report = uap.evaluate({"uap": uap_v}, {"stripes-detector": model}, x, baselines="stripes,chessboard1", norm="inf")
    assert report.perturbations == ["uap", "chessboard1", "stripes"] and report.baselines == ["chessboard1", "stripes"]
    assert report.meta["baseline_norm"] == pytest.approx(0.05) and report.meta["baselines"]["stripes"]["kind"] == "stripes"
    with torch.no_grad():
        rows = build_baselines("stripes", (3, 8, 8), 0.05).perturbations["stripes"]
        direct = (model(x).argmax(1) != model((x + rows).clamp(0, 1)).argmax(1)).double().mean().item()
    assert report.fooling_rate[2, 0] == pytest.approx(direct, abs=1e-12) and direct > 0.3


def test_unregistering_leaves_the_registry_as_it_was():
    from uap.baselines import (DATA_FREE, Baseline, available_baselines, register_baseline, row_names,
                               unregister_baseline)

    before = (available_baselines(), DATA_FREE, parse_baselines("all"), row_names("all", ["m"]))

    @register_baseline("edges")
    class Edges(Baseline):
        """A family of two that needs crafting images (but no model): one row each."""

        variants = ("edges-h", "edges-v")
        needs = frozenset({"x_craft"})

        def make(self, variant, ctx):
            axis = 1 if variant == "edges-h" else 2
            return ctx.scaled(ctx.x_craft.mean(0).diff(dim=axis, append=ctx.x_craft.mean(0).narrow(axis, 0, 1)))

    assert parse_baselines("edges") == ("edges-h", "edges-v") and "edges-h" not in DATA_FREE
    assert row_names("edges", ["m"]) == ["edges-h", "edges-v"]
    with pytest.raises(ValueError, match=r"the edges-h baseline needs crafting images \(x_craft\)"):
        build_baselines("edges", (3, 8, 8), 0.1)
    x, _ = images(n=6, seed=1)
    built = build_baselines("edges-v", (3, 8, 8), 0.1, 2.0, x_craft=x)
    assert list(built.perturbations) == ["edges-v"] and built.n_craft == 6
    assert unregister_baseline("edges") is Edges
    assert (available_baselines(), DATA_FREE, parse_baselines("all"), row_names("all", ["m"])) == before
    with pytest.raises(ValueError, match="unknown baseline 'edges'"):
        parse_baselines("edges")
    with pytest.raises(ValueError, match="no baseline is registered as 'edges'"):
        unregister_baseline("edges")


def test_registration_refuses_what_would_make_names_ambiguous():
    from uap.baselines import Baseline, available_baselines, register_baseline

    before = available_baselines()
    for name, variants, match in [("random", (), "taken"), ("all", (), "taken"), ("boards", ("chessboard2",), "taken"),
                                  ("Stripes", (), "lower-case"), ("a,b", (), "lower-case"), ("x:y", (), "lower-case")]:
        with pytest.raises(ValueError, match=match):
            register_baseline(name)(type("B", (Baseline,), {"variants": variants}))
    with pytest.raises(ValueError, match="needs"):
        register_baseline("labels")(type("B", (Baseline,), {"needs": frozenset({"labels"})}))
    with pytest.raises(ValueError, match="Baseline subclass"):
        register_baseline("plain")(object)
    with pytest.raises(ValueError, match="needs a name"):
        register_baseline()(Baseline)
    assert available_baselines() == before


def test_a_baseline_over_the_budget_or_of_the_wrong_shape_is_refused():
    from uap.baselines import Baseline, register_baseline, unregister_baseline

    @register_baseline("too-big")
    class TooBig(Baseline):
        def make(self, variant, ctx):
            return torch.full(ctx.shape, 2 * ctx.eps)

    @register_baseline("too-small")
    class TooSmall(Baseline):
        def make(self, variant, ctx):
            return ctx.scaled(torch.ones(ctx.shape))[0]

    try:
        with pytest.raises(ValueError, match="'too-big' has ℓinf norm 0.2, over the budget 0.1"):
            build_baselines("too-big", (3, 4, 4), 0.1)
        with pytest.raises(ValueError, match=r"'too-small' must give a float tensor of shape \(3, 4, 4\)"):
            build_baselines("too-small", (3, 4, 4), 0.1)
    finally:
        unregister_baseline("too-big")
        unregister_baseline("too-small")


def test_search_options_reach_the_baselines_that_need_models():
    x, _ = images(n=6, seed=1)
    small = build_baselines("fourier,random", (3, 8, 8), 0.1, 2.0, models={"lin": LinearTarget()}, x_craft=x,
                            search={"max_frequency": 1})
    assert all(min(f, 8 - f) <= 1 for f in small.info["fourier:lin"]["frequency"])
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['steps'\] for baseline 'fourier'"):
        build_baselines("fourier", (3, 8, 8), 0.1, 2.0, models={"lin": LinearTarget()}, x_craft=x, search={"steps": 3})
