"""One model spec everywhere: ``SPEC?mean=a/b/c&std=a/b/c`` and ``--mean/--std`` mean the same
model in ``craft``, ``evaluate``, ``transfer``, ``sweep`` and the library, and ``evaluate`` on
the spec a perturbation was crafted on reuses the normalisation it was crafted with."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from cli import app
from uap import targets
from tests.cifar_resnet import FLAGS, MEAN, QUERY, STD, resnet_small, trained_weights
from tests.hostile import one_line_error
from uap import Perturbation
from uap.saved import crafted_normalisation, reuse_normalisation
from uap.targets import (ModelSource, ModelSpecError, Normalized, load_models, register_model_source, resolve_model,
                         short_name, spec_normalisation, split_normalisation, split_query, split_weights,
                         with_normalisation)

FACTORY = "tests.cifar_resnet:resnet_small"
runner = CliRunner()


# --------------------------------------------------------------------------- the spec's query

def test_the_query_is_parsed_once_for_every_use():
    assert split_query("a.b:c") == ("a.b:c", [])
    assert split_query(f"a.b:c?{QUERY}") == ("a.b:c", [("mean", "0.485/0.456/0.406"), ("std", "0.229/0.224/0.225")])
    assert spec_normalisation(f"a.b:c?{QUERY}") == (MEAN, STD)
    assert spec_normalisation("a.b:c") is None
    assert with_normalisation("a.b:c", MEAN, STD) == f"a.b:c?{QUERY}"
    assert with_normalisation(f"a.b:c?mean=1/1/1&std=2/2/2", MEAN, STD) == f"a.b:c?{QUERY}"
    # a weights file after the query, and none when the last '=' is the query's own
    assert split_weights(f"a.b:c?{QUERY}") == (f"a.b:c?{QUERY}", None)
    assert split_weights(f"a.b:c?{QUERY}=w.pth")[0] == f"a.b:c?{QUERY}"
    assert short_name(f"{FACTORY}?{QUERY}=w.pth") == short_name(FACTORY) == "resnet_small"
    assert short_name(f"torchvision:resnet18?{QUERY}") == "resnet18"


@pytest.mark.parametrize("spec, message", [
    (f"{FACTORY}?mean=0.5/0.5/0.5", "both mean and std"),
    (f"{FACTORY}?mean=a/b/c&std=1/1/1", "numbers separated by /"),
    (f"{FACTORY}?mean=0.5&std=0", "std values must be finite and > 0"),
    (f"{FACTORY}?size=224", "unknown option(s) size"),
    (f"{FACTORY}?mean=1&mean=2&std=1", "more than once"),
    (f"{FACTORY}?junk", "key=value pairs"),
])
def test_a_bad_query_is_one_clear_error(spec, message):
    with pytest.raises(ModelSpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_model(spec)


def test_query_and_arguments_are_the_same_model_and_cannot_both_be_given():
    x = torch.rand(4, 3, 32, 32)
    by_query, model_id = resolve_model(f"{FACTORY}?{QUERY}")
    by_args, _ = resolve_model(FACTORY, mean=MEAN, std=STD)
    assert model_id == f"{FACTORY}?{QUERY}" and isinstance(by_query, Normalized)
    assert torch.equal(by_query(x), by_args(x))
    assert torch.equal(by_query(x), resnet_small().eval()((x - torch.tensor(MEAN).view(1, 3, 1, 1))
                                                          / torch.tensor(STD).view(1, 3, 1, 1)))
    with pytest.raises(ModelSpecError, match="give it once"):
        resolve_model(f"{FACTORY}?{QUERY}", mean=MEAN, std=STD)


def test_every_source_takes_the_query(monkeypatch):
    """A source's plain model is wrapped; an adapter's model (a Normalized already) gets its
    normalisation replaced, not a second one stacked on it; a source that reads mean/std itself
    (hub) gets them in its own query."""
    plain = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    adapted = Normalized(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), [0.0], [1.0])
    monkeypatch.setattr(targets, "_REGISTRY", targets._Registry(targets._REGISTRY.entry_points().values))
    register_model_source("trustsrc", ModelSource(load=lambda name: {"plain": plain, "adapted": adapted}.get(name),
                                                  bare=True), replace=True)
    x = torch.rand(2, 3, 2, 2)
    wrapped, _ = resolve_model("trustsrc:plain?mean=0.5/0.5/0.5&std=0.25/0.25/0.25")
    assert isinstance(wrapped, Normalized) and wrapped.model is plain
    assert torch.allclose(wrapped(x), plain((x - 0.5) / 0.25))
    replaced, _ = resolve_model("adapted?mean=0.5/0.5/0.5&std=0.25/0.25/0.25")  # a bare spec, same rule
    assert replaced is adapted and torch.allclose(replaced(x), adapted.model((x - 0.5) / 0.25))
    loaded = load_models(["trustsrc:plain?mean=0.5/0.5/0.5&std=0.25/0.25/0.25"])
    assert list(loaded) == ["plain"]
    assert split_normalisation("hub:/repo:entry?size=224", MEAN, STD) == (f"hub:/repo:entry?size=224&{QUERY}", None, None)
    assert split_normalisation(f"hub:/repo:entry?{QUERY}") == (f"hub:/repo:entry?{QUERY}", None, None)


# --------------------------------------------------------------------------- reusing a recorded normalisation

def _pert(model: str, settings: dict | None = None) -> Perturbation:
    return Perturbation(v=torch.zeros(3, 4, 4), model=model, data="d", eps=0.1, norm="inf", delta=0.2,
                        method="deepfool", seed=0, extra={"run": {"settings": settings or {}}})


def test_a_spec_takes_the_normalisation_its_perturbation_was_crafted_with():
    flags = _pert(FACTORY, {"model": FACTORY, "mean": list(MEAN), "std": list(STD)})
    query = _pert(f"{FACTORY}?{QUERY}")
    assert crafted_normalisation(flags) == crafted_normalisation(query) == (FACTORY, MEAN, STD)
    assert crafted_normalisation(_pert(FACTORY)) is None
    for pert in (flags, query):
        specs, notes = reuse_normalisation([FACTORY, f"{FACTORY}=w.pth", "other.mod:f"], {"run": pert})
        assert specs == [f"{FACTORY}?{QUERY}", f"{FACTORY}?{QUERY}=w.pth", "other.mod:f"]
        assert len(notes) == 2 and "crafted with" in notes[0]
    own = f"{FACTORY}?mean=0/0/0&std=1/1/1"  # a spec's own normalisation overrides the record
    assert reuse_normalisation([own], [flags]) == ([own], [])
    other = _pert(FACTORY, {"mean": [0.5] * 3, "std": [0.5] * 3})
    with pytest.warns(UserWarning, match="different normalisations"):
        assert reuse_normalisation([FACTORY], [flags, other]) == ([FACTORY], [])


# --------------------------------------------------------------------------- the acceptance case, end to end

@pytest.fixture(scope="module")
def resnet(tmp_path_factory, data_root):
    """A CIFAR ResNet trained on ImageNet-normalised images, saved as a plain state dict."""
    folder = tmp_path_factory.mktemp("resnet")
    return folder, trained_weights(folder), data_root


def _clean_accuracy(results: dict, column: str = "resnet_small") -> float:
    return results["clean_accuracy"][results["models"].index(column)]


def test_craft_evaluate_and_transfer_agree_on_one_model_spec(resnet):
    folder, weights, root = resnet
    common = ["--data-root", str(root)]
    craft = ["craft", "--model", FACTORY, "--weights", str(weights), "--n-images", "10", "--heldout", "300",
             "--max-passes", "1", "--eps", "8/255", *common]
    by_flags = runner.invoke(app, [*craft, *FLAGS, "--out", str(folder / "flags")])
    assert by_flags.exit_code == 0, by_flags.output
    craft[2] = f"{FACTORY}?{QUERY}"
    by_query = runner.invoke(app, [*craft, "--out", str(folder / "query")])
    assert by_query.exit_code == 0, by_query.output
    crafted = [json.loads((folder / run / "summary.json").read_text())["clean_heldout_accuracy"]
               for run in ("flags", "query")]
    assert crafted[0] == crafted[1] > 0.2  # well above chance (10 %): the model got its normalisation

    def evaluate(run: str, spec: str, out: str) -> tuple[float, str]:
        result = runner.invoke(app, ["evaluate", str(folder / run), "--models", f"{spec}={weights}", "--n-images",
                                     "300", "--baselines", "none", "--out", str(folder / out), *common])
        assert result.exit_code == 0, result.output
        return _clean_accuracy(json.loads((folder / out / "results.json").read_text())), result.output

    for run in ("flags", "query"):  # the bare spec: the run's recorded normalisation is reused, and said so
        accuracy, output = evaluate(run, FACTORY, f"eval-{run}")
        assert accuracy == crafted[0] and "using the normalisation it was crafted with" in " ".join(output.split())
    accuracy, output = evaluate("flags", f"{FACTORY}?{QUERY}", "eval-query")
    assert accuracy == crafted[0] and "crafted with" not in output
    overridden, _ = evaluate("flags", f"{FACTORY}?mean=0/0/0&std=1/1/1", "eval-raw")  # the spec's own wins
    assert overridden != crafted[0]

    transfer = runner.invoke(app, ["transfer", "--models", f"{FACTORY}?{QUERY}={weights}", "--n-craft", "10",
                                   "--n-images", "300", "--max-passes", "1", "--baselines", "none",
                                   "--out", str(folder / "transfer"), *common])
    assert transfer.exit_code == 0, transfer.output
    assert _clean_accuracy(json.loads((folder / "transfer" / "results.json").read_text())) == crafted[0]


def test_sweep_takes_the_normalisation_flags():
    result = runner.invoke(app, ["sweep", "--model", FACTORY, "--mean", "0.5,0.5", "--std", "0.2,0.2,0.2",
                                 "--out", "never-written"])
    assert "--mean and --std: mean has 2 values but std has 3" in one_line_error(result)
    help_text = runner.invoke(app, ["sweep", "--help"]).output
    assert "--mean" in help_text and "--std" in help_text
