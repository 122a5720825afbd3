"""Option parsing shared by the commands, and the option declarations they share.

Parsers turn text into library values and raise :class:`UsageError` naming the option; the
declarations (``*_option()``) keep one help text per option for every command that takes it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer

__all__ = ["UsageError", "parse_eps", "parse_norm", "check_budget", "float_list", "int_list", "key_values",
           "use_threads", "torch_device", "resolve_target", "model_spec", "normalisation", "load_models",
           "flagged"]


class UsageError(Exception):
    """Raised by the command line's own parsing; shown as one line, exit code 2."""


def flagged(option: str, call: Callable, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, its ``ValueError`` told as an error of ``option``."""
    try:
        return call(*args, **kwargs)
    except ValueError as e:
        raise UsageError(f"{option}: {e}") from None


def parse_eps(text: str) -> float:
    """Parse ``8/255``, ``0.03`` or ``10`` into a finite float > 0 (the library's check)."""
    from uap.projection import check_eps

    try:
        if "/" in text:
            num, den = text.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(text)
    except (ValueError, ZeroDivisionError):
        raise UsageError(f"--eps must be a number or a fraction like 8/255, got {text!r}") from None
    return flagged(f"--eps {text!r}", check_eps, value)


def check_budget(eps: float, p: float) -> None:
    """The library's budget check (ε within what norm ``p`` allows), before anything is loaded."""
    from uap.projection import check_eps

    flagged("--eps", check_eps, eps, p)


def parse_norm(text: str) -> float:
    """Parse ``inf``/``linf``, ``2``/``l2`` or ``1``/``l1`` into p."""
    t = text.lower().lstrip("l")
    if t in ("inf", "infinity", "∞"):
        return float("inf")
    if t in ("2", "1"):
        return float(t)
    raise UsageError(f"--norm must be inf, 2 or 1, got {text!r}")


def float_list(text: Optional[str], option: str) -> Optional[List[float]]:
    """``"0.49,0.48,0.45"`` → floats (None stays None)."""
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated numbers, got {text!r}") from None


def int_list(text: str, option: str) -> List[int]:
    """``"100,300,1000"`` → positive integers."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise UsageError(f"{option} must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise UsageError(f"{option} must be comma-separated numbers ≥ 1, got {text!r}")
    return values


def key_values(items: List[str], option: str, shape: str = "KEY=VALUE",
               value: Callable[[str], Any] | None = None) -> dict:
    """Repeated ``KEY=VALUE`` options → a dict; a value is read as JSON (``0.2``, ``true``,
    ``[1, 2]``) or, if it is not JSON, kept as the text (``distance=l2``), unless ``value``
    parses it."""
    out: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{option} must look like {shape}, got {item!r}")
        if value is not None:
            out[key.strip()] = value(raw)
            continue
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def use_threads(threads: Optional[int]) -> None:
    """Apply ``--threads`` (None: leave torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise UsageError(f"--threads must be ≥ 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def torch_device(text: str):
    """``--device`` as a torch device: cpu, cuda or cuda:N, and CUDA only where there is one."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {text}: CUDA is not available on this machine")
    return device


def model_spec(option: str, call: Callable, *args: Any, **kwargs: Any) -> Any:
    """``call(*args, **kwargs)``, its :class:`uap.targets.ModelSpecError` told in terms of the
    options of a command whose model spec is ``option`` (``--model`` or ``--models``)."""
    from uap.targets import ModelSpecError

    flags = {"spec": option, "weights": "--weights" if option == "--model" else f"{option} SPEC=WEIGHTS",
             "mean": "--mean", "std": "--std"}
    try:
        return call(*args, **kwargs)
    except ModelSpecError as e:
        raise UsageError(f"{' and '.join(flags.get(a, a) for a in e.arguments)}: {e}") from None


def resolve_target(spec: str, option: str, weights: Optional[Path] = None, mean: Optional[List[float]] = None,
                   std: Optional[List[float]] = None):
    """:func:`uap.targets.resolve_model` with errors named by this command's options."""
    from uap.targets import resolve_model

    return model_spec(option, resolve_model, spec, weights, mean, std)


def normalisation(mean: Optional[str], std: Optional[str]) -> tuple[Optional[List[float]], Optional[List[float]]]:
    """``--mean``/``--std`` parsed and checked before anything loads, against the images every
    ``--data`` gives (RGB: 3 channels); one of them alone is refused by :func:`uap.targets.resolve_model`."""
    from uap.targets import Normalized

    mean_v, std_v = float_list(mean, "--mean"), float_list(std, "--std")
    if mean_v is not None and std_v is not None:
        model_spec("--model", Normalized.check, mean_v, std_v, channels=3)
    return mean_v, std_v


def load_models(text: str, device: str = "cpu", crafted: Optional[dict] = None,
                log: Optional[Callable[[str], None]] = None) -> tuple[dict, list[str]]:
    """``--models`` → ``({column name: model on the device}, [model ids])`` through
    :func:`uap.targets.load_models`, its errors told in terms of ``--models``; a spec that
    ``crafted`` perturbations were made on takes their normalisation
    (:func:`uap.saved.reuse_normalisation`, each note given to ``log``)."""
    from uap.saved import reuse_normalisation
    from uap.targets import load_models as load, parse_model_list

    dev = torch_device(device)
    specs = model_spec("--models", parse_model_list, text)
    if crafted:
        specs, notes = model_spec("--models", reuse_normalisation, specs, crafted)
        for note in notes if log is not None else ():
            log(note)
    return model_spec("--models", load, specs, dev), specs


# --------------------------------------------------------------------------- shared declarations

FACTORY_HELP = ("A package.module:factory spec imports that module and calls factory() with no arguments: "
                "it runs that code, so name only code you trust (not callable, or needing arguments: refused).")
MODELS_HELP = ("Comma-separated zoo names, package.module:factory or SOURCE:NAME, each optionally with its "
               "normalisation SPEC?mean=a/b/c&std=a/b/c and weights SPEC=WEIGHTS_FILE (torchvision:resnet18=r18.pth); "
               "'all' = every zoo model. " + FACTORY_HELP)
BASELINES_HELP = ("Baseline rows, comma-separated: random, gaussian, chessboard (cells of 1, 2, 4, 8 px; or "
                  "chessboard1 …), fourier (the best single Fourier basis image, found by a black-box search per "
                  "model: data-light but thousands of forward passes), data-free, all, none.")


def data_option():
    return typer.Option("cifar10", "--data", help="Dataset: cifar10 or imagefolder:PATH.")


def data_root_option():
    return typer.Option(None, "--data-root", help="Folder that contains the dataset (default: $UAP_DATA_DIR).")


def image_size_option():
    return typer.Option(None, "--image-size", min=1, help="imagefolder:PATH: centre-crop images of any size to N×N "
                        "(default: the model's own preprocessing, if it has one, else the images as they are).")


def resize_option():
    return typer.Option(None, "--resize", min=1, help="imagefolder:PATH: resize the shorter side to N before the crop "
                        "(default ⌊image size / 0.875⌋).")


def probe_data_option():
    return typer.Option(None, "--probe-data", help="Labelled images the probe of a hub:DIR:ENTRY model is fitted on: "
                        "their train split (the crafting side of the split rule), never held-out images. Default: --data.")


def probe_images_option():
    return typer.Option(1000, "--probe-images", help="Images (class-balanced, train split of --probe-data) a hub "
                        "model's probe is fitted on.")


def device_option():
    return typer.Option("cpu", "--device", help="cpu, cuda or cuda:N.")


def threads_option(default: Optional[int] = None):
    """The one ``--threads`` option of every command that runs models."""
    shown = default if default is not None else "torch's, one per core"
    return typer.Option(default, "--threads", help=f"torch CPU threads (default: {shown}). On cores shared with other "
                        "work, fewer threads than cores avoid oversubscription (1 can be many times faster); "
                        "results do not depend on it.")


def mean_option():
    return typer.Option(None, "--mean", help="Per-channel mean if the model expects normalised input, on the [0, 1] "
                        "scale, e.g. 0.485,0.456,0.406 (the same as SPEC?mean=0.485/0.456/0.406&std=…).")


def std_option():
    return typer.Option(None, "--std", help="Per-channel std (with --mean), e.g. 0.229,0.224,0.225.")


def models_option():
    return typer.Option("all", "--models", help=MODELS_HELP)


def baselines_option(default: str, norm_help: str):
    return typer.Option(default, "--baselines", help=f"{BASELINES_HELP} {norm_help}")
