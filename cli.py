"""The ``uap`` command line: a thin Typer layer over the library.

Every command calls into ``uap`` or ``models``; anything a command does, the library does.
Bad input (a ``ValueError`` or a missing file raised by the library) becomes one red line on
stderr and exit code 2 — never a traceback.
"""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import unicodedata
import warnings
from pathlib import Path
from typing import Callable, List, Optional

import typer
import typer.core
from rich.console import Console
from rich.markup import escape

import uap
from uap.atomic import check_output_folder


def literal(text: object) -> str:
    """``text`` made safe to print through rich: markup escaped (``[/]`` prints as itself) and
    control characters, newlines included, written as escapes (``\\x1b``), so a user's value
    can neither style the terminal, move its cursor, nor break a one-line message in two."""
    out = []
    for ch in str(text):
        if unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp"):  # controls, bidi/format marks, line breaks
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return escape("".join(out))


def print_error(message: object) -> None:
    """The one line every input error becomes: ``error: MESSAGE`` on stderr, printed literally."""
    text = str(message).strip() or "invalid input"
    err_console.print(f"[bold red]error:[/] {literal(text)}", highlight=False, soft_wrap=True)


# Click's exception classes, whichever Click typer runs on (its own vendored copy in recent
# versions, the click package before): found through typer's public BadParameter.
_CLICK_ERROR, _CLICK_USAGE_ERROR = (next(c for c in typer.BadParameter.__mro__ if c.__name__ == name)
                                    for name in ("ClickException", "UsageError"))


class _OneLineErrors(typer.core.TyperGroup):
    """Click's own usage errors (an unknown option or command, a value of the wrong type or out of
    its range, a missing value) as the same one line as every other input error, exit code 2,
    instead of Click's usage block."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _CLICK_ERROR as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # bare `uap`: the help is already printed
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see `{ctx.command_path} --help`)" if isinstance(e, _CLICK_USAGE_ERROR) and ctx else ""
            print_error(e.format_message() + hint)
            sys.exit(e.exit_code)
        except typer.Abort:
            print_error("aborted")
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    name="uap",
    help="Universal adversarial perturbations: craft them, evaluate them across models, "
    "and train the target models they are measured on.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineErrors,
)
console = Console()
err_console = Console(stderr=True)


class _UsageError(Exception):
    """Raised by the CLI's own argument parsing helpers; shown as one line, exit 2."""


def friendly_errors(fn: Callable) -> Callable:
    """Turn the library's input errors into one clear line on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            with warnings.catch_warnings():
                warnings.showwarning = _warning_line
                return fn(*args, **kwargs)
        except (ValueError, FileNotFoundError, KeyError, _UsageError) as e:
            print_error(e.args[0] if isinstance(e, KeyError) and e.args else e)
            raise typer.Exit(2)

    return wrapper


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A library warning (e.g. bf16 falling back to fp32) as one yellow line on stderr."""
    err_console.print(f"[bold yellow]warning:[/] {escape(str(message))}", highlight=False, soft_wrap=True)


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
        raise _UsageError(f"--eps must be a number or a fraction like 8/255, got {text!r}") from None
    try:
        return check_eps(value)
    except ValueError as e:
        raise _UsageError(f"--eps {text!r}: {e}") from None


def _check_budget(eps: float, p: float) -> None:
    """The library's budget check, before anything is loaded."""
    from uap.projection import check_eps

    try:
        check_eps(eps, p)
    except ValueError as e:
        raise _UsageError(f"--eps: {e}") from None


def parse_norm(text: str) -> float:
    """Parse ``inf``/``linf``, ``2``/``l2`` or ``1``/``l1`` into p."""
    t = text.lower().lstrip("l")
    if t in ("inf", "infinity", "∞"):
        return float("inf")
    if t in ("2", "1"):
        return float(t)
    raise _UsageError(f"--norm must be inf, 2 or 1, got {text!r}")


def _version(value: bool) -> None:
    if value:
        console.print(f"uap {uap.__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                 help="Print the version and exit."),
) -> None:
    """Universal adversarial perturbations toolkit."""


# ----------------------------------------------------------------------------- craft

def _float_list(text: Optional[str], option: str) -> Optional[List[float]]:
    """``"0.49,0.48,0.45"`` → floats (None stays None)."""
    if text is None:
        return None
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise _UsageError(f"{option} must be comma-separated numbers, got {text!r}") from None


def _check_normalisation(mean: Optional[List[float]], std: Optional[List[float]]) -> None:
    """``--mean``/``--std`` checked before anything loads, against the images every ``--data``
    gives (RGB: 3 channels); one of them alone is refused by :func:`uap.targets.resolve_model`."""
    from uap.targets import ModelSpecError, Normalized

    if mean is None or std is None:
        return
    try:
        Normalized.check(mean, std, channels=3)
    except ModelSpecError as e:
        raise _UsageError(f"{' and '.join('--' + a for a in e.arguments)}: {e}") from None


def _threads_option(default: Optional[int] = None):
    """The one ``--threads`` option of every command that runs models."""
    shown = default if default is not None else "torch's, one per core"
    return typer.Option(default, "--threads", help=f"torch CPU threads (default: {shown}). On cores shared with other "
                        "work, fewer threads than cores avoid oversubscription (1 can be many times faster); "
                        "results do not depend on it.")


def _use_threads(threads: Optional[int]) -> None:
    """Apply ``--threads`` (None: leave torch's default)."""
    if threads is None:
        return
    if threads < 1:
        raise _UsageError(f"--threads must be ≥ 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def _torch_device(text: str):
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise _UsageError(f"--device must be cpu, cuda or cuda:N, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise _UsageError(f"--device {text}: CUDA is not available on this machine")
    return device


def _craft_table(summary: dict):
    from rich.table import Table

    def pct(v) -> str:
        return "–" if v is None else f"{100 * v:.1f} %"

    table = Table(title=f"uap craft · {literal(summary['model'])} · ℓ{summary['norm']} ε={summary['eps']:.4g} · "
                  f"{literal(summary['method'])}",
                  title_style="bold")
    table.add_column("", style="bold")
    table.add_column("value", justify="right")
    table.add_row("fooling rate (crafting set)", pct(summary["fooling_rate"]))
    table.add_row("fooling rate (held-out)", pct(summary["heldout_fooling_rate"]))
    baseline = summary.get("baseline")
    if baseline:
        table.add_row("strongest baseline (held-out)", f"{pct(baseline['heldout_fooling_rate'])} ({baseline['name']})")
    if summary.get("heldout_accuracy") is not None:
        table.add_row("held-out accuracy clean → under v",
                      f"{pct(summary['clean_heldout_accuracy'])} → {pct(summary['heldout_accuracy'])}")
    table.add_row("‖v‖₂ / ‖v‖∞", f"{summary['norm_2']:.4f} / {summary['norm_inf']:.4f}")
    kept = summary.get("best_pass")
    table.add_row("passes", str(summary["passes"]) + ("" if kept is None else f" (v from pass {kept}, --keep-best)"))
    for name, count in summary["counters"].items():
        table.add_row(name.replace("_", " "), str(count))
    table.add_row("time", f"{summary['seconds']:.1f} s")
    return table


_FACTORY_HELP = ("A package.module:factory spec imports that module and calls factory() with no arguments: "
                 "it runs that code, so name only code you trust (not callable, or needing arguments: refused).")
_IMAGE_SIZE_HELP = ("imagefolder:PATH: centre-crop images of any size to N×N (default: the model's own preprocessing, "
                    "if it has one, else the images as they are).")
_RESIZE_HELP = "imagefolder:PATH: resize the shorter side to N before the crop (default ⌊image size / 0.875⌋)."
_PROBE_DATA_HELP = ("Labelled images the probe of a hub:DIR:ENTRY model is fitted on: their train split (the crafting "
                    "side of the split rule), never held-out images. Default: --data.")
_PROBE_IMAGES_HELP = "Images (class-balanced, train split of --probe-data) a hub model's probe is fitted on."


def _preprocessing(data: str, image_size: Optional[int], resize: Optional[int], models: list):
    """The resize + crop for ``--data``: ``--image-size``/``--resize`` when given, else, for an
    imagefolder, the preprocessing of the first model that declares one (an adapter's weights
    transforms), else None (the images as they are; cifar10 is always 32×32)."""
    from uap.data import Preprocessing

    explicit = Preprocessing.from_sizes(image_size, resize)
    if explicit is not None or not data.startswith("imagefolder:"):
        return explicit
    declared = [p for m in models if (p := Preprocessing.of(m)) is not None]
    if len(set(declared)) > 1:
        console.print(f"[dim]the models preprocess differently; images are resized to {declared[0].resize} and "
                      f"centre-cropped to {declared[0].crop} (the first model's; --image-size/--resize choose)[/]")
    return declared[0] if declared else None


def _preprocessing_settings(prep) -> Optional[dict]:
    return None if prep is None else {"resize": prep.resize, "crop": prep.crop, "interpolation": prep.interpolation}


@app.command("craft")
@friendly_errors
def craft_cmd(
    model: str = typer.Option("supervised", "--model", help="Zoo name, checkpoint path, package.module:factory, "
                              "torchvision:NAME[:WEIGHTS], timm:NAME, open_clip:ARCH[:TAG] or hub:DIR:ENTRY (see "
                              "`uap models --external`). " + _FACTORY_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights for a module:factory, torchvision:NAME, "
                                           "timm:NAME, open_clip:ARCH or hub:DIR:ENTRY model (safetensors, or a state dict read with weights_only=True)."),
    mean: Optional[str] = typer.Option(None, "--mean", help="Per-channel mean if the model expects normalised input, e.g. 0.49,0.48,0.45."),
    std: Optional[str] = typer.Option(None, "--std", help="Per-channel std (with --mean)."),
    data: str = typer.Option("cifar10", "--data", help="Dataset: cifar10 or imagefolder:PATH."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder that contains the dataset (default: $UAP_DATA_DIR)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help=_IMAGE_SIZE_HELP),
    resize: Optional[int] = typer.Option(None, "--resize", min=1, help=_RESIZE_HELP),
    n_images: int = typer.Option(1000, "--n-images", help="Crafting images X (class-balanced, from the train split)."),
    heldout: int = typer.Option(2000, "--heldout", help="Held-out test images to measure after each pass (0: none)."),
    eps: str = typer.Option("8/255", "--eps", help="Radius ε of the ℓp ball; fractions like 8/255 are fine."),
    norm: str = typer.Option("inf", "--norm", help="p of the ball: inf, 2 or 1."),
    delta: float = typer.Option(0.2, "--delta", help="Stop once the fooling rate on X exceeds 1 − δ (0: run all --max-passes)."),
    max_passes: int = typer.Option(10, "--max-passes", help="At most this many passes over X."),
    method: str = typer.Option("deepfool", "--method", help="deepfool (Algorithm 1), deepfool-batched, sgd, feature, "
                               "deepfool-targeted or foolbox:<AttackName> (e.g. foolbox:L2CarliniWagnerAttack)."),
    target_class: Optional[int] = typer.Option(None, "--target", min=0, help="Targeted UAP: send images to this class "
                                               "(deepfool, sgd, foolbox:…); the stop rule uses the targeted success rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per step: DeepFool call (deepfool-batched), "
                                             "gradient step (sgd, feature: default 32) or Foolbox call (default 1)."),
    method_option: List[str] = typer.Option([], "--method-option", help="KEY=VALUE knob of the method (JSON value), "
                                            "repeatable, e.g. --method-option step_size=0.2 --method-option decay=0.8."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the image subsets and the visiting order."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/MODEL-lNORM-METHOD/)."),
    precision: str = typer.Option("fp32", "--precision", help="Arithmetic of DeepFool's gradients (deepfool, "
                                  "deepfool-batched): fp32, or bf16 (faster on CPUs with AVX512-BF16 or AMX and on recent "
                                  "GPUs; elsewhere it falls back to fp32 with a warning; the fooled/not-fooled "
                                  "decisions stay fp32)."),
    keep_best: bool = typer.Option(False, "--keep-best", help="Keep the v of the pass with the highest fooling rate "
                                   "on the crafting images (Algorithm 1 can lose ground in a pass), not the last."),
    fold_batchnorm: bool = typer.Option(True, "--fold-batchnorm/--no-fold-batchnorm",
                                        help="Attack a copy of the model with batch norm folded into the layers "
                                        "before it (the same function, faster to differentiate)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    probe_data: Optional[str] = typer.Option(None, "--probe-data", help=_PROBE_DATA_HELP),
    probe_images: int = typer.Option(1000, "--probe-images", help=_PROBE_IMAGES_HELP),
    threads: Optional[int] = _threads_option(),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out (same settings)."),
    force: bool = typer.Option(False, "--force", help="Start over: discard the finished run or the checkpoint in --out."),
) -> None:
    """Craft a universal perturbation (Algorithm 1 of Moosavi-Dezfooli et al., CVPR 2017).

    Example: uap craft --model supervised --n-images 1000 --eps 8/255 --norm inf --method deepfool --out runs/sup-linf8
    """
    import json
    import re

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from uap.projection import norm_name
    from uap.deepfool import DeepFoolOptions
    from uap.methods import make_method
    from uap.runs import RunFolder, craft_run

    eps_value, p = parse_eps(eps), parse_norm(norm)
    _check_budget(eps_value, p)
    if n_images <= 0:
        raise _UsageError(f"--n-images must be > 0, got {n_images}")
    if heldout < 0:
        raise _UsageError(f"--heldout must be ≥ 0, got {heldout}")
    if not 0 <= delta < 1:
        raise _UsageError(f"--delta must be in [0, 1) (0: every pass, a fixed budget), got {delta}")
    if max_passes < 1:
        raise _UsageError(f"--max-passes must be ≥ 1, got {max_passes}")
    method_options: dict = {} if batch_size is None else {"batch_size": batch_size}
    for item in method_option:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise _UsageError(f"--method-option must look like KEY=VALUE, got {item!r}")
        try:
            method_options[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            method_options[key.strip()] = raw  # a bare string, e.g. distance=l2
    crafting = make_method(method, method_options)  # unknown method or options: fail before loading anything
    DeepFoolOptions.parse({"precision": precision}, owner="--precision")
    if precision != "fp32" and "precision" not in crafting.options.to_dict():
        raise _UsageError(f"--precision {precision} sets the arithmetic of DeepFool's gradients; --method {method} "
                          "does not use DeepFool")
    mean_v, std_v = _float_list(mean, "--mean"), _float_list(std, "--std")
    _check_normalisation(mean_v, std_v)
    torch_device = _torch_device(device)
    _use_threads(threads)  # not part of the run's settings: v does not depend on it
    if out is None:
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model.rsplit(":", 1)[-1]).strip("-") or "model"
        out = Path("runs") / f"{slug}-l{norm_name(p)}-{method.replace(':', '-')}"
    check_output_folder(out, "--out")
    settings = {  # what the command line said; the run's record adds every uap.craft argument and fingerprints
        "model": model, "weights": str(weights) if weights else None, "mean": mean_v, "std": std_v,
        "data": data, "n_images": n_images, "heldout": heldout, "eps": eps_value, "norm": norm_name(p),
        "delta": delta, "max_passes": max_passes, "method": method, "batch_size": batch_size, "seed": seed,
        "target": target_class, "method_options": method_options, "keep_best": keep_best, "precision": precision,
        "image_size": image_size, "resize": resize, "probe_data": probe_data, "probe_images": probe_images,
    }
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("fooled {task.fields[fooled]}"), TimeElapsedColumn())
    progress = Progress(*columns, console=console, transient=False)  # shown once crafting starts
    task = progress.add_task("pass 1", total=n_images, fooled="–")

    def on_event(event: dict) -> None:
        kind = event["event"]
        if kind == "reused":
            console.print(f"[green]{literal(out)} already holds a finished run with these settings[/] (--force recrafts it)")
        elif kind == "start":
            if event["resumed_passes"]:
                console.print(f"resuming after pass {event['resumed_passes']} from {literal(event['checkpoint'])}")
            progress.start()
        elif kind == "progress":
            seen = event["visited"]
            rate = f"{100 * event['fooled_seen'] / seen:.1f} %" if seen else "–"
            progress.update(task, description=f"pass {event['pass']}/{max_passes}", completed=seen,
                            total=event["total"], fooled=rate)
        elif kind == "pass":
            held_text = "" if event["heldout_fooling_rate"] is None else f", held-out {100 * event['heldout_fooling_rate']:.1f} %"
            progress.console.print(f"pass {event['pass']}: fooling rate {100 * event['fooling_rate']:.1f} %{held_text}, "
                                   f"‖v‖∞ {event['norm_inf']:.4f}, {event['seconds']:.1f} s")

    run = RunFolder(out)
    from uap.distributed import is_main

    # A bad --out, or a run another process is writing: one line, before loading anything (rank 0 writes).
    with run.lock() if is_main() else contextlib.nullcontext():
        target, model_id = _resolve_target(model, "--model", weights, mean_v, std_v)
        target = target.to(torch_device)
        prep = _preprocessing(data, image_size, resize, [target])
        settings["preprocessing"] = _preprocessing_settings(prep)
        x, _, classes = uap.data.load(data, "train", n=n_images, seed=seed, root=data_root, preprocessing=prep)
        _attach_heads([target], classes, data=data, probe_data=probe_data, probe_images=probe_images, seed=seed,
                      root=data_root, prep=prep)
        held = (uap.data.load(data, "test", n=heldout, seed=seed, root=data_root, preprocessing=prep)[:2]
                if heldout else None)
        try:
            result = craft_run(run, target, x, settings=settings, heldout=held, resume=resume, force=force,
                               callback=on_event, eps=eps_value, norm=p, delta=delta, max_passes=max_passes,
                               method=method, seed=seed, model_id=model_id,
                               data=f"{data}:train:n={n_images}:seed={seed}",
                               method_options={**method_options, **({"precision": precision} if precision != "fp32" else {})},
                               target=target_class, keep_best=keep_best, fold_batchnorm=fold_batchnorm)
        finally:
            progress.stop()
    console.print(_craft_table(result.summary))
    if not result.reused:
        console.print(f"wrote {literal(out)}/perturbation.safetensors, perturbation.json, perturbation.png, summary.json")


# ----------------------------------------------------------------------------- evaluate / transfer

def _model_specs(text: str) -> list[str]:
    """``--models``: comma-separated zoo names / paths / ``module:factory`` / ``SOURCE:NAME``, each
    optionally ``SPEC=WEIGHTS_FILE`` (e.g. ``torchvision:resnet18=r18.pth``); ``all`` = the zoo."""
    specs = [s.strip() for s in text.split(",") if s.strip()]
    if specs == ["all"]:
        import models

        specs = list(models.available())
        if not specs:
            raise _UsageError("--models all: the model zoo has no models yet (see `uap models`)")
    if not specs:
        raise _UsageError("--models is empty: give zoo names separated by commas, or 'all'")
    if len(set(specs)) != len(specs):
        raise _UsageError(f"--models names a model twice: {text}")
    return specs


def _split_weights(item: str) -> tuple[str, Optional[Path]]:
    """``SPEC=WEIGHTS_FILE`` → ``(SPEC, Path)``; a plain spec → ``(spec, None)``."""
    spec, sep, weights = item.rpartition("=")
    if not sep:
        return item, None
    if not spec.strip() or not weights.strip():
        raise _UsageError(f"--models: {item!r} is not SPEC=WEIGHTS_FILE")
    return spec.strip(), Path(weights.strip())


def _resolve_target(spec: str, option: str, weights: Optional[Path] = None, mean: Optional[List[float]] = None,
                    std: Optional[List[float]] = None):
    """:func:`uap.targets.resolve_model`, its errors told in terms of this command's options."""
    from uap.adapters import register_adapters
    from uap.targets import ModelSpecError, resolve_model

    register_adapters()  # torchvision:/timm: even when the installed metadata predates their entry points
    flags = {"spec": option, "weights": "--weights" if option == "--model" else f"{option} SPEC=WEIGHTS",
             "mean": "--mean", "std": "--std"}
    try:
        return resolve_model(spec, weights, mean, std)
    except ModelSpecError as e:
        named = " and ".join(flags.get(a, a) for a in e.arguments)
        raise _UsageError(f"{named}: {e}") from None


def _load_models(specs: list[str], device: str = "cpu") -> dict:
    """``{column name: model on device}`` for the ``--models`` specs."""
    dev = _torch_device(device)
    loaded = {}
    for item in specs:
        spec, weights = _split_weights(item)
        model, _ = _resolve_target(spec, "--models", weights)
        model_id = item  # the weights file is part of the model's identity (a transfer run reuses by it)
        model = model.to(dev)
        name = _short_name(model_id)
        loaded[name if name not in loaded else model_id] = model
    return loaded


def _attach_heads(models: list, classes, *, data: str, probe_data: Optional[str], probe_images: int, seed: int,
                  root: Optional[Path], prep, heldout_split: str = "test") -> None:
    """Heads that depend on the data: a zero-shot model (open_clip) gets the data's class names
    (``use_classes``), a hub backbone its probe (``fit_probe``), fitted on the train split of
    ``--probe-data`` (default ``--data``) — the split rule's crafting side, never held-out images."""
    import torch

    from uap.data import balanced_subset, load_split

    for m in models:
        if callable(getattr(m, "use_classes", None)):
            m.use_classes(list(classes))
    needing = [m for m in models if callable(getattr(m, "fit_probe", None))]
    if not needing:
        return
    source = probe_data or data
    if source == data and heldout_split == "train":
        raise _UsageError("--split train: hub models fit their probe on the train split; evaluate on --split test, "
                          "or fit it elsewhere with --probe-data")
    if probe_images <= 0:
        raise _UsageError(f"--probe-images must be > 0, got {probe_images}")
    split = load_split(source, "train", root=root, preprocessing=prep, stream=True)
    if tuple(split.classes) != tuple(classes):
        raise _UsageError(f"--probe-data {source} has other classes than --data {data}; the probe must predict "
                          "the classes it is measured on")
    picked = balanced_subset(split.y.numpy(), min(probe_images, len(split.y)), seed)
    console.print(f"[dim]fitting the probe of {len(needing)} hub model(s) on {len(picked)} {source} train images[/]")
    for m in needing:
        m.fit_probe(split.x.select(picked), split.y[torch.as_tensor(picked, dtype=torch.long)], split.classes, seed=seed)


def _short_name(model_id: str) -> str:
    """Column name for a model: ``supervised``; ``pkg.mod:factory`` → ``factory``; ``dir/x.safetensors`` → ``x``;
    ``torchvision:resnet18=r18.pth`` → ``resnet18``; ``torchvision:resnet50:IMAGENET1K_V2`` → ``resnet50:IMAGENET1K_V2``."""
    model_id = _split_weights(model_id)[0] if "=" in model_id else model_id
    head = model_id.partition(":")[0]
    if head in ("torchvision", "timm", "open_clip"):
        return model_id.partition(":")[2]
    if head == "hub":  # hub:DIR:ENTRY?options → ENTRY
        return model_id.partition("?")[0].rpartition(":")[2]
    if ":" in model_id and not Path(model_id).exists():
        return model_id.rsplit(":", 1)[-1]
    return Path(model_id).name.split(".")[0] if ("/" in model_id or "." in Path(model_id).name) else model_id


def _print_report(report, title: str, caption: str = "") -> None:
    from rich.table import Table

    def pct(v: float) -> str:
        return "–" if v != v else f"{100 * v:.1f}"

    table = Table(title=title, title_style="bold", caption=caption or None)
    table.add_column("perturbation \\ model", style="bold")
    for m in report.models:
        table.add_column(literal(m), justify="right")
    for i, pert in enumerate(report.perturbations):
        if report.is_baseline(pert) and (i == 0 or not report.is_baseline(report.perturbations[i - 1])):
            table.add_section()
        cells = []
        for j, m in enumerate(report.models):
            text = pct(report.fooling_rate[i, j])
            text = f"[bold]{text}[/]" if pert == m else text
            label = report.dominant_label[i, j]
            if report.classes and 0 <= label < len(report.classes):
                label = report.classes[label]
            detail = f"acc {pct(report.accuracy[i, j])} · {pct(report.dominant_share[i, j])} % → {literal(label)}"
            cells.append(f"{text}\n[dim]{detail}[/]")
        table.add_row(f"[italic]{literal(pert)}[/]\n[dim]baseline[/]" if report.is_baseline(pert) else literal(pert), *cells)
    table.add_section()
    table.add_row("[dim]clean acc.[/]", *[f"[dim]{pct(a)}[/]" for a in report.clean_accuracy])
    console.print(table)


def _baseline_names(text: str):
    from uap.baselines import parse_baselines

    try:
        return parse_baselines(text)
    except ValueError as e:
        raise _UsageError(f"--baselines: {e}") from None


_BASELINES_HELP = ("Baseline rows at the perturbations' norm, comma-separated: random, gaussian, chessboard "
                   "(cells of 1, 2, 4, 8 px; or chessboard1 …), fourier (the best single Fourier basis image, "
                   "found by a black-box search per model: data-light but thousands of forward passes), all, none. "
                   "Default: the data-free ones.")
_DEFAULT_BASELINES = ",".join(uap.baselines.DATA_FREE)


def _write_bundle(out: Path, report, perturbations: dict, loaded: dict, x, y) -> None:
    from uap import distributed
    from uap.plots import write_figures

    if not distributed.is_main():
        return  # rank 0 writes the results, by itself
    with distributed.alone():
        report.save_json(out / "results.json")
        report.save_csv(out / "results.csv")
        figures = write_figures(out, report, perturbations, loaded, x, y=y)
    names = ", ".join(p.name for p in figures.values())
    console.print(f"wrote {literal(out)}/results.json, results.csv, {literal(names)}")


@app.command("evaluate")
@friendly_errors
def evaluate_cmd(
    perturbations: List[Path] = typer.Argument(..., help="Saved perturbations (the .safetensors/.json pair, or its stem)."),
    models: str = typer.Option("all", "--models", help="Comma-separated zoo names, package.module:factory or SOURCE:NAME, "
                               "each optionally SPEC=WEIGHTS_FILE (torchvision:resnet18=r18.pth); 'all' = every zoo model. "
                               + _FACTORY_HELP),
    data: str = typer.Option("cifar10", "--data", help="Dataset: cifar10 or imagefolder:PATH."),
    split: str = typer.Option("test", "--split", help="Split the held-out images come from."),
    n_images: int = typer.Option(2000, "--n-images", min=1, help="Held-out images (class-balanced subset)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the image subset."),
    batch_size: int = typer.Option(uap.forward.DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="Images per forward pass."),
    out: Path = typer.Option(Path("runs/eval"), "--out", help="Folder for results.json, results.csv and figures."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder that contains the dataset (default: $UAP_DATA_DIR)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help=_IMAGE_SIZE_HELP),
    resize: Optional[int] = typer.Option(None, "--resize", min=1, help=_RESIZE_HELP),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    baselines: str = typer.Option(_DEFAULT_BASELINES, "--baselines", help=_BASELINES_HELP + " Their norm: the largest of the "
                                  "perturbations' (in the norm they were crafted in)."),
    n_craft: int = typer.Option(1000, "--n-craft", help="Images of the train split of --data the fourier baseline "
                                "is searched on (never the held-out --split images)."),
    probe_data: Optional[str] = typer.Option(None, "--probe-data", help=_PROBE_DATA_HELP),
    probe_images: int = typer.Option(1000, "--probe-images", help=_PROBE_IMAGES_HELP),
    threads: Optional[int] = _threads_option(),
) -> None:
    """Evaluate perturbations on several models: fooling rate, accuracies, dominant label, embedding cosine.

    Example: uap evaluate runs/sup-linf8/perturbation.safetensors --models supervised,supervised@knn --n-images 2000 --out runs/eval
    """
    from rich.progress import Progress

    from uap.baselines import build_baselines
    from uap.evaluate import evaluate
    from uap.perturbation import Perturbation
    from uap.projection import lp_norm, norm_name

    _use_threads(threads)
    check_output_folder(out, "--out")
    chosen = _baseline_names(baselines)
    loaded_perts: dict = {}
    norms: set = set()
    for path in perturbations:
        pert = Perturbation.load(path)
        norms.add(pert.p)
        name = path.name.split(".")[0] or str(path)
        if name == "perturbation" and path.parent.name:  # `uap craft` output: name it by its run folder
            name = path.parent.name
        key, k = name, 2
        while key in loaded_perts:
            key, k = f"{name}#{k}", k + 1
        loaded_perts[key] = pert.v
    loaded = _load_models(_model_specs(models), device)
    if chosen and len(norms) > 1:
        raise _UsageError("--baselines: the perturbations were crafted in different norms "
                          f"({', '.join(sorted(norm_name(p) for p in norms))}); evaluate them "
                          "separately or pass --baselines none")
    prep = _preprocessing(data, image_size, resize, list(loaded.values()))
    x, y, classes = uap.data.load(data, split=split, n=n_images, seed=seed, root=data_root, preprocessing=prep,
                                  stream=data.startswith("imagefolder:"))  # uint8, floats per batch
    _attach_heads(list(loaded.values()), classes, data=data, probe_data=probe_data, probe_images=probe_images,
                  seed=seed, root=data_root, prep=prep, heldout_split=split)
    meta = {"command": "evaluate", "data": data, "split": split, "n_images": n_images, "seed": seed,
            "files": [str(p) for p in perturbations], "preprocessing": _preprocessing_settings(prep)}
    with Progress(console=console, transient=True) as bar:
        task = bar.add_task("evaluating", total=None)

        def progress(done: int, total: int, desc: str) -> None:
            bar.update(task, completed=done, total=total, description=literal(desc))

        rows: dict = {}
        if chosen:
            p = next(iter(norms))
            norm = max(float(lp_norm(v, p)) for v in loaded_perts.values())
            if norm > 0:
                x_craft = None
                if "fourier" in chosen:
                    if n_craft <= 0:
                        raise _UsageError(f"--n-craft must be > 0 for the fourier baseline, got {n_craft}")
                    x_craft, _, _ = uap.data.load(data, split="train", n=n_craft, seed=seed, root=data_root,
                                                  preprocessing=prep)
                built = build_baselines(chosen, x.shape[1:], norm, p, seed=seed, models=loaded, x_craft=x_craft,
                                        batch_size=batch_size,
                                        callback=lambda _e, info: bar.update(task, description=f"fourier search on {literal(info['model'])}"))
                rows = built.perturbations
                meta.update(baseline_norm=norm, baseline_p=norm_name(p), baselines=built.info,
                            n_craft=n_craft if x_craft is not None else 0)
        report = evaluate(loaded_perts, loaded, x, y, batch_size=batch_size, classes=classes, progress=progress,
                          meta=meta, baselines=rows)
    _print_report(report, "fooling rate (%)", f"{report.n_images} {literal(data)} {literal(split)} images; "
                  "fooling = prediction differs from the model's clean prediction; below: accuracy under v, "
                  "share of the most common perturbed label")
    _write_bundle(out, report, {**loaded_perts, **rows}, loaded, x, y)


@app.command("transfer")
@friendly_errors
def transfer_cmd(
    models: str = typer.Option("all", "--models", help="Comma-separated zoo names, package.module:factory or SOURCE:NAME, "
                               "each optionally SPEC=WEIGHTS_FILE (torchvision:resnet18=r18.pth); 'all' = every zoo model. "
                               + _FACTORY_HELP),
    eps: str = typer.Option("8/255", "--eps", help="Budget ε, e.g. 8/255 or 10."),
    norm: str = typer.Option("inf", "--norm", help="inf, 2 or 1."),
    delta: float = typer.Option(0.2, "--delta", help="Stop when the crafting-set fooling rate reaches 1 − δ."),
    max_passes: int = typer.Option(10, "--max-passes", help="Maximum passes over the crafting images."),
    method: str = typer.Option("deepfool", "--method", help="UAP crafting method (see `uap craft --help`)."),
    data: str = typer.Option("cifar10", "--data", help="Dataset: cifar10 or imagefolder:PATH."),
    n_craft: int = typer.Option(1000, "--n-craft", min=1, help="Crafting images (train split), shared by all source models."),
    n_images: int = typer.Option(1000, "--n-images", min=1, help="Held-out evaluation images (test split)."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the image subsets, the crafting and the random baseline."),
    batch_size: int = typer.Option(uap.forward.DEFAULT_BATCH_SIZE, "--batch-size", min=1, help="Images per forward pass when evaluating."),
    out: Path = typer.Option(Path("runs/transfer"), "--out", help="Folder for results, figures and crafted perturbations (reused on re-run)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder that contains the dataset (default: $UAP_DATA_DIR)."),
    image_size: Optional[int] = typer.Option(None, "--image-size", min=1, help=_IMAGE_SIZE_HELP),
    resize: Optional[int] = typer.Option(None, "--resize", min=1, help=_RESIZE_HELP),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    baselines: str = typer.Option(_DEFAULT_BASELINES, "--baselines", help=_BASELINES_HELP + " Their norm: the largest of the "
                                  "crafted UAPs'; fourier is searched on the crafting images."),
    probe_data: Optional[str] = typer.Option(None, "--probe-data", help=_PROBE_DATA_HELP),
    probe_images: int = typer.Option(1000, "--probe-images", help=_PROBE_IMAGES_HELP),
    threads: Optional[int] = _threads_option(),
) -> None:
    """Cross-model transfer matrix: one UAP per model, each applied to every model, plus baseline rows.

    Example: uap transfer --models all --eps 8/255 --norm inf --n-craft 1000 --n-images 1000 --out runs/transfer
    """
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from uap.methods import make_method
    from uap.transfer import transfer_matrix
    from uap.universal import check_stop_rule

    eps_value, p = parse_eps(eps), parse_norm(norm)
    _check_budget(eps_value, p)
    check_stop_rule(delta, max_passes)
    make_method(method)
    _use_threads(threads)
    check_output_folder(out, "--out")
    chosen = _baseline_names(baselines)
    specs = _model_specs(models)
    loaded = _load_models(specs, device)
    prep = _preprocessing(data, image_size, resize, list(loaded.values()))
    x_craft, _, _ = uap.data.load(data, split="train", n=n_craft, seed=seed, root=data_root, preprocessing=prep)
    x_eval, y_eval, classes = uap.data.load(data, split="test", n=n_images, seed=seed, root=data_root,
                                            preprocessing=prep, stream=data.startswith("imagefolder:"))
    _attach_heads(list(loaded.values()), classes, data=data, probe_data=probe_data, probe_images=probe_images,
                  seed=seed, root=data_root, prep=prep)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console) as bar:
        sources = bar.add_task("source models", total=len(loaded), info="")
        passes = bar.add_task("  crafting", total=max_passes, info="", visible=False)
        evals = bar.add_task("evaluating", total=None, info="", visible=False)

        def on_event(event: str, info: dict) -> None:
            if event == "craft":
                resumed = info.get("resumed_passes", 0)
                bar.update(passes, description=f"  crafting on {literal(info['model'])}", completed=resumed, visible=True,
                           info=f"resumed after pass {resumed}" if resumed else "")
            elif event == "craft_step" and info.get("event") == "progress":  # during a pass
                done = info["pass"] - 1 + info["visited"] / max(1, info["total"])
                bar.update(passes, completed=done)
            elif event == "craft_step" and info.get("event") == "pass":  # after each pass
                held = info.get("heldout_fooling_rate")
                bar.update(passes, completed=info["pass"], info=f"fooling rate {100 * info['fooling_rate']:.1f}%"
                           + (f", held-out {100 * held:.1f}%" if held is not None else ""))
            elif event in ("saved", "reused"):
                bar.update(passes, visible=False)
                bar.advance(sources)
                if event == "reused":
                    console.print(f"reusing the perturbation crafted on {literal(info['model'])} ({literal(info['path'])})")
            elif event == "fourier":
                bar.update(evals, description=f"fourier search on {literal(info['model'])}", visible=True)
            elif event == "evaluate":
                bar.update(evals, completed=info["done"], total=info["total"], visible=True, info=info["desc"])

        result = transfer_matrix(loaded, x_craft, x_eval, y_eval, eps=eps_value, norm=p, delta=delta,
                                 max_passes=max_passes, method=method, seed=seed, out_dir=out,
                                 model_ids=dict(zip(loaded, specs)), batch_size=batch_size, classes=classes,
                                 baselines=chosen, callback=on_event)
    result.report.meta.update(command="transfer", data=data, n_images=n_images, n_craft=n_craft,
                              preprocessing=_preprocessing_settings(prep))
    caption = (f"rows: crafted on ({n_craft} {literal(data)} train images), columns: applied to "
               f"({result.report.n_images} held-out test images); ε={literal(eps)}, ℓ{'∞' if p == float('inf') else int(p)}; "
               "baselines: same norm, no crafting (fourier:M searched on M's crafting-set fooling rate)")
    _print_report(result.report, "transfer: fooling rate (%)", caption)
    _write_bundle(out, result.report, result.perturbations, loaded, x_eval, y_eval)


# ----------------------------------------------------------------------------- sweep

def _int_list(text: str, option: str) -> List[int]:
    """``"100,300,1000"`` → positive integers."""
    try:
        values = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise _UsageError(f"{option} must be comma-separated whole numbers, got {text!r}") from None
    if not values or min(values) < 1:
        raise _UsageError(f"{option} must be comma-separated numbers ≥ 1, got {text!r}")
    return values


@app.command("sweep")
@friendly_errors
def sweep_cmd(
    model: str = typer.Option("supervised", "--model", help="The target, as for `uap craft --model`. " + _FACTORY_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights for the model, as for `uap craft`."),
    data: str = typer.Option("cifar10", "--data", help="Dataset: cifar10 or imagefolder:PATH."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", help="Folder that contains the dataset (default: $UAP_DATA_DIR)."),
    methods: str = typer.Option("deepfool,deepfool-batched,sgd,feature", "--methods", help="Crafting methods, comma-separated."),
    n_images: str = typer.Option("100,300,1000,3000,10000", "--n-images", help="The |X| axis (nested random subsets)."),
    eps: str = typer.Option("2/255,4/255,6/255,8/255,10/255,12/255", "--eps", help="The ε axis."),
    n_limit: List[str] = typer.Option([], "--n-limit", help="METHOD=N: the largest |X| for a slow method "
                                      "(its |X| curve stops there), repeatable, e.g. --n-limit deepfool=1000."),
    n_base: int = typer.Option(1000, "--n-base", min=1, help="|X| of the ε and passes axes."),
    eps_base: str = typer.Option("10/255", "--eps-base", help="ε of the |X| and passes axes."),
    norm: str = typer.Option("inf", "--norm", help="p of the ball: inf, 2 or 1."),
    passes: int = typer.Option(5, "--passes", min=1, help="Passes per run (the passes axis is the base run's history)."),
    delta: float = typer.Option(0.2, "--delta", help="Stop a run once its fooling rate on X exceeds 1 − δ."),
    heldout: int = typer.Option(2000, "--heldout", min=1, help="Held-out test images every point is measured on."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the image subsets and the visiting orders."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    threads: Optional[int] = _threads_option(),
    out: Path = typer.Option(Path("runs/sweep"), "--out", help="Sweep folder: points/ (one resumable run each), "
                             "sweep.json, sweep.csv, sweep.png."),
) -> None:
    """Budget curves: held-out fooling rate vs |X|, ε and passes, per method, with the strongest baseline.

    Example: uap sweep --model supervised --methods sgd,deepfool-batched --n-images 100,1000 --eps 4/255,10/255 --out runs/sweep
    """
    from uap.methods import make_method
    from uap.sweep import sweep

    p = parse_norm(norm)
    eps_values = [parse_eps(e) for e in eps.split(",") if e.strip()]
    eps_base_value = parse_eps(eps_base)
    for e in eps_values + [eps_base_value]:
        _check_budget(e, p)
    counts = _int_list(n_images, "--n-images")
    limits = {}
    for item in n_limit:
        name, sep, value = item.partition("=")
        if not sep or not name.strip():
            raise _UsageError(f"--n-limit must look like METHOD=N, got {item!r}")
        limits[name.strip()] = _int_list(value, "--n-limit")[0]
    method_names = [m.strip() for m in methods.split(",") if m.strip()]
    if not method_names:
        raise _UsageError("--methods is empty")
    for m in method_names:
        make_method(m)
    for m, limit in limits.items():
        if m not in method_names or limit < n_base:
            raise _UsageError(f"--n-limit {m}={limit}: name one of --methods, with a limit ≥ --n-base ({n_base})")
    if not 0 <= delta < 1:
        raise _UsageError(f"--delta must be in [0, 1) (0: every pass, a fixed budget), got {delta}")
    torch_device = _torch_device(device)
    _use_threads(threads)
    check_output_folder(out, "--out")
    target, model_id = _resolve_target(model, "--model", weights)
    target = target.to(torch_device)
    prep = _preprocessing(data, None, None, [target])
    pool = max(counts + [n_base])
    x, _, _ = uap.data.load(data, "train", n=pool, seed=seed, root=data_root, preprocessing=prep)
    held = uap.data.load(data, "test", n=heldout, seed=seed, root=data_root, preprocessing=prep)[:2]

    def on_point(event: dict) -> None:
        s, point = event["summary"], event["point"]
        console.print(f"[{event['index']}/{event['total']}] {literal(point.method)} |X|={point.n_images} "
                      f"ε={point.eps:.4g}: held-out fooling {100 * s['heldout_fooling_rate']:.1f} % "
                      f"(baseline {literal(s['baseline']['name'])} {100 * s['baseline']['heldout_fooling_rate']:.1f} %), "
                      f"{s['seconds']:.1f} s")

    result = sweep(target, x, held, out, methods=method_names, n_images=counts, eps=eps_values, n_base=n_base,
                   eps_base=eps_base_value, norm=p, passes=passes, delta=delta, seed=seed, model_id=model_id,
                   data=f"{data}:train:seed={seed}", settings={"command": "sweep"}, n_limits=limits,
                   callback=on_point)
    written = result.save(out)
    for method, axes in result.crossings.items():
        text = ", ".join(f"{axis} ≥ {value:.4g}" if value is not None else f"{axis}: never" for axis, value in axes.items())
        console.print(f"{literal(method)} reaches the strongest baseline at: {text}")
    console.print(f"wrote {literal(written['json'])}, {written['csv'].name}, {written['png'].name}")


# ----------------------------------------------------------------------------- train / models


@app.command("train")
@friendly_errors
def train_cmd(
    method: str = typer.Argument(..., help="supervised | airbench | simclr | moco | byol | dino | dino-distill "
                                 "(a smaller backbone against a finished dino run's frozen teacher: -H teacher=RUN) | clip"),
    epochs: int = typer.Option(30, help="Training epochs over CIFAR-10 train."),
    batch_size: int = typer.Option(256, "--batch-size", help="Images per step (lr scales linearly from 256)."),
    backbone: str = typer.Option("resnet18", help="resnet18 (CIFAR stem), vit_small or vit_tiny (patch 4; vit_tiny "
                                 "has a quarter of vit_small's parameters) or airbench."),
    width: int = typer.Option(16, help="Channels of the first stage (resnet18, airbench)."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate for batch 256 (default: the method's)."),
    weight_decay: Optional[float] = typer.Option(None, "--weight-decay", help="Default: the method's."),
    optimizer: Optional[str] = typer.Option(None, help="sgd | lars | adamw (default: the method's)."),
    warmup_epochs: Optional[float] = typer.Option(None, "--warmup-epochs", help="Linear lr warm-up."),
    seed: int = typer.Option(0, help="Seed for initialisation, data order and augmentations."),
    knn_every: int = typer.Option(5, "--knn-every", help="kNN monitor every N epochs (0: off)."),
    n_train: Optional[int] = typer.Option(None, "--n-train", help="Use a class-balanced subset of the training set "
                                          "(images a method holds out, e.g. clip's val_size, included)."),
    threads: int = _threads_option(2),
    precision: str = typer.Option("fp32", help="fp32 | bf16 (bfloat16 autocast for the networks, float32 losses; "
                                                "faster on CPUs with native bfloat16)."),
    out: Path = typer.Option(Path("runs/train"), "--out", "-o", help="Run folder: per-epoch checkpoint + state JSON."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out (same settings; --epochs may "
                                "change during warm-up)."),
    zoo: Optional[str] = typer.Option(None, "--zoo", help="When done, measure and write models/zoo/NAME.{safetensors,json}."),
    hparam: List[str] = typer.Option([], "--hparam", "-H", help="Method hyper-parameter KEY=VALUE (repeatable), "
                                     "e.g. clip: embed_dim, text_width, text_layers, text_heads, word_dropout, val_size; "
                                     "dino-distill: teacher=RUN_FOLDER."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N (networks, data and augmentations)."),
    strategy: str = typer.Option("ddp", "--strategy", help="Under torchrun: ddp (gradients all-reduced) or fsdp "
                                 "(parameters, gradients and optimiser state sharded per block). --batch-size is the "
                                 "global batch, split over the ranks."),
) -> None:
    """Train a target model on CIFAR-10 (checkpoint every epoch; --resume continues).

    Example: uap train supervised --epochs 22 --batch-size 256 --width 16 --out runs/supervised --zoo supervised
    """
    import json as _json
    import shlex

    from models.train import TrainConfig, train

    hparams = {}
    for item in hparam:
        key, sep, value = item.partition("=")
        if not sep:
            raise _UsageError(f"--hparam must be KEY=VALUE, got {item!r}")
        try:
            hparams[key] = _json.loads(value)
        except _json.JSONDecodeError:
            hparams[key] = value
    argv = [a for a in sys.argv[1:] if a != "--resume"]
    command = "uap " + " ".join(shlex.quote(a) for a in argv)
    torch_device = _torch_device(device)
    _use_threads(threads)
    check_output_folder(out, "--out")
    config = TrainConfig(method=method, backbone=backbone, width=width, epochs=epochs, batch_size=batch_size, lr=lr,
                         weight_decay=weight_decay, optimizer=optimizer, warmup_epochs=warmup_epochs, seed=seed,
                         knn_every=knn_every, n_train=n_train, threads=threads, precision=precision,
                         hparams=hparams)
    from models.parallel import STRATEGIES
    from uap import distributed

    if strategy not in STRATEGIES:
        raise _UsageError(f"--strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    train(config, out, resume=resume, console=console, command=command, device=torch_device, strategy=strategy)
    console.print(f"checkpoint: {literal(out)}")
    if zoo and distributed.is_main():
        with distributed.alone():  # rank 0 measures and writes the zoo entry by itself
            _zoo_entry(out, zoo)


def _zoo_entry(out: Path, zoo: str) -> None:
    """Measure the finished run in ``out`` and write it as zoo entry ``zoo``."""
    from models.zoo_build import build_zoo_entry

    card = build_zoo_entry(out, zoo, console=console)
    if card["builder"] == "clip":
        console.print(f"zoo entry {literal(zoo)}: zero-shot accuracy {card['zero_shot_acc']:.4f}")
    else:
        console.print(f"zoo entry {literal(zoo)}: linear probe {card['linear_probe_acc']:.4f}, kNN {card['knn_acc']:.4f}")


@app.command("models")
@friendly_errors
def models_cmd(
    external: bool = typer.Option(False, "--external", help="List the external model sources (torchvision, timm …): "
                                  "the spellings they take and whether their library is installed."),
) -> None:
    """List the model zoo (name, method, backbone, accuracies, size), or the external model sources.

    Example: uap models   (NAME@knn is any entry's encoder with a kNN head, e.g. --models supervised@knn);
    uap models --external
    """
    from rich.table import Table

    if external:
        _external_sources_table()
        return

    import models as zoo_models

    table = Table(title="uap model zoo")
    for col in ("name", "builder", "method", "backbone", "epochs", "linear probe", "kNN", "zero-shot", "random init", "MB"):
        table.add_column(col)
    for name, card in zoo_models.cards().items():
        def pct(key: str) -> str:
            v = card.get(key)
            return f"{100 * v:.1f} %" if isinstance(v, (int, float)) else "-"

        table.add_row(*map(literal, (name, card.get("builder", "-"), card.get("method", "-"), card.get("backbone", "-"),
                                     card.get("epochs", "-"))), pct("linear_probe_acc"), pct("knn_acc"), pct("zero_shot_acc"),
                      pct("random_init_linear_probe_acc"), f"{card.get('size_bytes', 0) / 1e6:.1f}")
    console.print(table)


def _argv_device() -> str:
    """The ``--device`` the command line names (for the process group's backend), else ``cpu``."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--device" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--device="):
            return arg.partition("=")[2]
    return "cpu"


def _external_sources_table() -> None:
    import importlib.util

    from rich.table import Table

    from uap.adapters import register_adapters
    from uap.targets import model_sources

    register_adapters()
    table = Table(title="external model sources")
    for col in ("source", "spellings", "weights file", "library"):
        table.add_column(col)
    for name, source in model_sources().items():
        if source.bare:  # the zoo (and any source answering bare names) is what plain `uap models` lists
            continue
        lib = source.library
        status = "-" if not lib else (f"{lib}: installed" if importlib.util.find_spec(lib) is not None
                                      else f"{lib}: [red]not installed[/] (pip install 'uap[hub]')")
        table.add_row(name, source.help or f"{name}:NAME", "yes" if source.weights else "no", status)
    console.print(table)


def main() -> None:
    """Console-script entry point. Under ``torchrun`` (``WORLD_SIZE`` > 1) every command runs in
    the process group torchrun describes (gloo on CPU, NCCL with ``--device cuda``): the ranks
    share the work, and only rank 0 prints and writes. A rank whose peer failed stops with one
    line instead of a traceback."""
    import torch

    from uap import distributed

    device = torch.device("cuda" if _argv_device().startswith("cuda") else "cpu")
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched:  # torchrun stops the other ranks with SIGTERM when one fails: unwind, release locks
        signal.signal(signal.SIGTERM, _terminated)
    try:
        with distributed.process_group(device):
            if not distributed.is_main():
                console.quiet = True
            app()
    except (RuntimeError, _Terminated) as e:  # a peer is gone (and printed its own error)
        if not launched:
            raise
        reason = "stopped by the launcher" if isinstance(e, _Terminated) else (
            str(e).strip().splitlines() or ["a collective operation failed"])[0]
        err_console.print(f"[bold red]error:[/] rank {os.environ.get('RANK', '?')} stopped: another rank failed "
                          f"({escape(reason)})", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


class _Terminated(Exception):
    """SIGTERM arrived (torchrun ends the remaining ranks this way when one fails)."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated()


if __name__ == "__main__":
    main()
