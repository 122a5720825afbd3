"""``uap craft``: one universal perturbation into a resumable run folder (:func:`uap.runs.craft_run`)."""
from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import List, Optional

import typer

from cli import command, invoked_args
from cli import options as o
from cli.console import console, err_console, literal
from cli.show import craft_progress, craft_table

__all__ = ["craft_cmd", "check_stop_rule", "default_out", "resume_hint"]


def check_stop_rule(delta: float, max_passes: int) -> None:
    """:func:`uap.universal.check_stop_rule`, each error named by its option."""
    from uap.universal import check_stop_rule as check

    o.flagged("--delta", check, delta, 1)
    o.flagged("--max-passes", check, 0.0, max_passes)


def default_out(model: str, p: float, method: str) -> Path:
    """``runs/MODEL-lNORM-METHOD``: the folder a run goes to when ``--out`` is not given."""
    from uap.projection import norm_name

    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", model.rsplit(":", 1)[-1]).strip("-") or "model"
    return Path("runs") / f"{slug}-l{norm_name(p)}-{method.replace(':', '-')}"


def resume_hint(run) -> str:
    """What an interrupted ``uap craft`` says: the passes its folder kept, and the command that
    continues it (this one, ``--force`` dropped, ``--resume`` added)."""
    import shlex

    args = [a for a in invoked_args() if a != "--force"]
    command_line = shlex.join(["uap", *args, *([] if "--resume" in args else ["--resume"])])
    if not run.checkpoint_path.is_file():
        return f"no pass finished, nothing was kept; run `{command_line}` to start over"
    return f"the passes finished so far are kept in {run.checkpoint_path}; continue with `{command_line}`"


def _method_options(method: str, batch_size: Optional[int], items: List[str], precision: str) -> tuple[dict, bool]:
    """The method's options from ``--batch-size``, ``--method-option`` and ``--precision``, checked
    by building the method (an unknown method or option fails before anything loads), and
    whether the method with them reads crafting images."""
    from uap.methods import make_method

    chosen = {} if batch_size is None else {"batch_size": batch_size}
    chosen.update(o.key_values(items, "--method-option"))
    built = make_method(method, chosen)
    if precision != "fp32":  # DeepFool's gradient arithmetic: an option of the methods that run DeepFool
        chosen["precision"] = precision
        o.flagged("--precision", make_method, method, chosen)
    return chosen, bool(built.needs_data)


def _check_init(init: Optional[str]) -> None:
    """``--init`` read before anything loads: a baseline's name, or a perturbation file or run folder."""
    from uap.initial import describe_init

    try:
        describe_init(init)
    except (ValueError, FileNotFoundError) as e:
        raise o.UsageError(f"--init: {e}") from None


def _targets(model: str, weights: Optional[Path], mean: Optional[list], std: Optional[list], device) -> dict:
    """``--model``: one spec, or a comma-separated list (an ensemble), as ``{model id: target on device}``."""
    from uap.targets import parse_model_list

    specs = o.model_spec("--model", parse_model_list, model) if "," in model else [model]
    if len(specs) > 1 and weights is not None:
        raise o.UsageError("--weights: give each model of a list its weights as SPEC=WEIGHTS_FILE")
    targets: dict = {}
    for spec in specs:
        target, model_id = o.resolve_target(spec, "--model", weights, mean, std)
        if model_id in targets:
            raise o.UsageError(f"--model names {model_id} twice")
        targets[model_id] = target.to(device)
    return targets


@command("craft")
def craft_cmd(
    model: str = typer.Option("supervised", "--model", help="Zoo name, checkpoint path, package.module:factory, "
                              "torchvision:NAME[:WEIGHTS], timm:NAME, open_clip:ARCH[:TAG] or hub:DIR:ENTRY (see "
                              "`uap models --external`); a comma-separated list crafts one v against all of them "
                              "(the mean of their losses; ascent methods and gd-uap). " + o.FACTORY_HELP),
    weights: Optional[Path] = typer.Option(None, "--weights", help="Weights for a module:factory or SOURCE:NAME model "
                                           "(safetensors, or a state dict read with weights_only=True)."),
    mean: Optional[str] = o.mean_option(),
    std: Optional[str] = o.std_option(),
    data: str = o.data_option(),
    data_root: Optional[Path] = o.data_root_option(),
    image_size: Optional[int] = o.image_size_option(),
    resize: Optional[int] = o.resize_option(),
    n_images: Optional[int] = typer.Option(None, "--n-images", min=0, help="Crafting images X (class-balanced, from the "
                                           "train split); default 1000, or 0 for a method that needs none (gd-uap "
                                           "with prior none or range: then no stop rule, all --max-passes run)."),
    heldout: int = typer.Option(2000, "--heldout", min=0, help="Held-out test images to measure after each pass (0: none)."),
    eps: str = typer.Option("8/255", "--eps", help="Radius ε of the ℓp ball; fractions like 8/255 are fine."),
    norm: str = typer.Option("inf", "--norm", help="p of the ball: inf, 2 or 1."),
    delta: float = typer.Option(0.2, "--delta", help="Stop once the fooling rate on X exceeds 1 − δ (0: run all --max-passes)."),
    max_passes: int = typer.Option(10, "--max-passes", help="At most this many passes over X."),
    method: str = typer.Option("deepfool", "--method", help="deepfool (Algorithm 1), deepfool-batched, sgd, sga, cos-uap, "
                               "feature, deepfool-targeted or foolbox:<AttackName> (e.g. foolbox:L2CarliniWagnerAttack)."),
    target_class: Optional[int] = typer.Option(None, "--target", min=0, help="Targeted UAP: send images to this class "
                                               "(deepfool, sgd, sga, foolbox:…); the stop rule uses the targeted success rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Images per step: DeepFool call "
                                             "(deepfool-batched), gradient step (sgd, cos-uap, feature: default 32; sga: "
                                             "250) or Foolbox call (default 1)."),
    method_option: List[str] = typer.Option([], "--method-option", help="KEY=VALUE option of the method (JSON value), "
                                            "repeatable, e.g. --method-option step_size=0.2 --method-option decay=0.8."),
    seed: int = typer.Option(0, "--seed", min=0, help="Seed of the image subsets and the visiting order."),
    init: Optional[str] = typer.Option(None, "--init", help="Start from a baseline (a name of `uap evaluate "
                                       "--baselines`, e.g. chessboard2n or fourier) or an earlier perturbation "
                                       "(.safetensors or a run folder), projected into the ball; default v = 0."),
    out: Optional[Path] = typer.Option(None, "--out", help="Output folder (default runs/MODEL-lNORM-METHOD/)."),
    precision: str = typer.Option("fp32", "--precision", help="Arithmetic of DeepFool's gradients (deepfool, "
                                  "deepfool-batched): fp32, or bf16 (faster on CPUs with AVX512-BF16 or AMX and on recent "
                                  "GPUs; elsewhere it falls back to fp32 with a warning; the fooled/not-fooled "
                                  "decisions stay fp32). The same as --method-option precision=bf16."),
    keep_best: bool = typer.Option(False, "--keep-best", help="Keep the v of the pass with the highest fooling rate "
                                   "on the crafting images (Algorithm 1 can lose ground in a pass), not the last."),
    eval_every: int = typer.Option(1, "--eval-every", min=1, help="Measure the fooling rates (crafting set and "
                                   "held-out) after every K-th pass and the last one; the others record none "
                                   "(with --delta > 0 the crafting set is measured every pass). Not with --keep-best."),
    fold_batchnorm: bool = typer.Option(True, "--fold-batchnorm/--no-fold-batchnorm",
                                        help="Attack a copy of the model with batch norm folded into the layers "
                                        "before it (the same function, faster to differentiate)."),
    device: str = o.device_option(),
    probe_data: Optional[str] = o.probe_data_option(),
    probe_images: int = o.probe_images_option(),
    threads: Optional[int] = o.threads_option(),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out (same settings)."),
    force: bool = typer.Option(False, "--force", help="Start over: discard the finished run or the checkpoint in --out."),
) -> None:
    """Craft a universal perturbation (Algorithm 1 of Moosavi-Dezfooli et al., CVPR 2017).

    Example: uap craft --model supervised --n-images 1000 --eps 8/255 --norm inf --method deepfool --out runs/sup-linf8
    """
    from uap.atomic import check_output_folder
    from uap.distributed import is_main
    from uap.inputs import load_inputs
    from uap.projection import norm_name
    from uap.runs import RunFolder, craft_run

    eps_value, p = o.parse_eps(eps), o.parse_norm(norm)
    o.check_budget(eps_value, p)
    check_stop_rule(delta, max_passes)
    if keep_best and eval_every != 1:
        raise o.UsageError("--keep-best compares every pass's fooling rate; it needs --eval-every 1")
    method_options, needs_data = _method_options(method, batch_size, method_option, precision)
    n_images = (1000 if needs_data else 0) if n_images is None else n_images
    if needs_data and n_images == 0:
        raise o.UsageError(f"--n-images: method {method} with these options needs crafting images; give --n-images N")
    _check_init(init)
    mean_v, std_v = o.normalisation(mean, std)
    torch_device = o.torch_device(device)
    o.use_threads(threads)  # not part of the run's settings: v does not depend on it
    out = out if out is not None else default_out(model, p, method)
    check_output_folder(out, "--out")
    settings = {  # what the command line said; the run's record adds every uap.craft argument and fingerprints
        "model": model, "weights": str(weights) if weights else None, "mean": mean_v, "std": std_v,
        "data": data, "n_images": n_images, "heldout": heldout, "eps": eps_value, "norm": norm_name(p),
        "delta": delta, "max_passes": max_passes, "method": method, "batch_size": batch_size, "seed": seed,
        "target": target_class, "method_options": method_options, "keep_best": keep_best, "precision": precision,
        "image_size": image_size, "resize": resize, "probe_data": probe_data, "probe_images": probe_images,
    }
    if init is not None:  # only when given: the record of a run from v = 0 stays what it was
        settings["init"] = init
    progress, on_event = craft_progress(out, n_images, max_passes)
    run = RunFolder(out)
    # A bad --out, or a run another process is writing: one line, before loading anything (rank 0 writes).
    with run.lock() if is_main() else contextlib.nullcontext():
        targets = _targets(model, weights, mean_v, std_v, torch_device)
        inputs = load_inputs(targets, data, n_train=n_images, n_test=heldout, seed=seed, root=data_root,
                             image_size=image_size, resize=resize, stream_test=False, probe_data=probe_data,
                             probe_images=probe_images, log=lambda line: console.print(f"[dim]{literal(line)}[/]"))
        settings["preprocessing"] = inputs.settings()
        models, ids = list(targets.values()), list(targets)
        one = len(models) == 1
        try:
            result = craft_run(run, models[0] if one else models, inputs.x, settings=settings, heldout=inputs.heldout, resume=resume,
                               force=force, callback=on_event, eps=eps_value, norm=p, delta=delta,
                               max_passes=max_passes, method=method, seed=seed,
                               model_id=ids[0] if one else ids, init=init,
                               data=f"{data}:train:n={n_images}:seed={seed}" if n_images else f"{data}:no crafting images",
                               method_options=method_options,
                               target=target_class, keep_best=keep_best, fold_batchnorm=fold_batchnorm,
                               eval_every=eval_every)
        except KeyboardInterrupt:
            progress.stop()
            err_console.print(f"interrupted: {literal(resume_hint(run))}", highlight=False, soft_wrap=True)
            raise typer.Exit(130) from None
        finally:
            progress.stop()
    console.print(craft_table(result.summary))
    if not result.reused:
        console.print(f"wrote {literal(out)}/perturbation.safetensors, perturbation.json, perturbation.png, summary.json")
