"""torchvision's classification architectures as the model source ``torchvision``.

Spellings:

- ``torchvision:NAME`` with a weights file (``resolve_model(spec, weights=FILE)``,
  ``uap craft --weights FILE``, ``--models torchvision:NAME=FILE``): a state dict, read
  without unpickling code (:func:`uap.targets.load_state_dict_file`). Its preprocessing is
  that of the architecture's default ImageNet weights (torchvision keeps their transforms and
  class names in its code, so nothing is downloaded);
- ``torchvision:NAME:WEIGHTS`` — a member of the architecture's weights enum (e.g.
  ``resnet50:IMAGENET1K_V2``, or ``DEFAULT``), read from torchvision's local cache
  ``$TORCH_HOME/hub/checkpoints/<file of the weights' URL>``. Nothing is ever downloaded:
  when the file is not there the error says which file to put where.

A weights file for another number of classes (a ResNet-18 trained on CIFAR-10's ten, e.g. by
``examples/train_torchvision.py``) builds the architecture with that many outputs (read from
the size of its last linear layer in the file; the ImageNet class names then do not apply).

Either way the target is an :class:`~uap.adapters.base.AdaptedClassifier` with the weights'
own mean/std inside, their resize/crop/interpolation as ``model.preprocessing`` and their
class names as ``model.classes``. Vision transformers take only their native size; other
sizes are resized inside.
"""
from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from torch import nn

from uap.adapters.base import AdaptedClassifier
from uap.targets import ModelSource, ModelSpecError, load_weights

__all__ = ["SOURCE", "names", "load", "cache_path"]

# When an architecture has no ImageNet weights in torchvision: the usual ImageNet evaluation.
_IMAGENET = {"resize": 256, "crop": 224, "interpolation": "bilinear",
             "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}


def names() -> list[str]:
    """torchvision's image-classification architectures (``torchvision.models.list_models``)."""
    import torchvision.models

    return sorted(torchvision.models.list_models(module=torchvision.models))


def cache_path(weights) -> Path:
    """Where torchvision keeps a weights enum member's file: ``$TORCH_HOME/hub/checkpoints/<file>``."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name


def load(name: str, weights: Path | None = None) -> nn.Module | None:
    """The classifier for ``NAME`` or ``NAME:WEIGHTS`` (see the module docstring); ``None``
    when torchvision has no architecture ``NAME``."""
    import torchvision.models

    arch, _, enum_name = name.partition(":")
    if arch not in names():
        return None
    spec = f"torchvision:{name}"
    members = _weights_enum(arch)
    if enum_name:
        if weights is not None:
            raise ModelSpecError(f"{spec} names torchvision weights; give either a weights enum or a weights file, "
                                 "not both", "spec", "weights")
        if members is None:
            raise ModelSpecError(f"torchvision has no pretrained weights for {arch}; give a weights file instead")
        try:
            chosen = members[enum_name]
        except KeyError:
            known = ", ".join(dict.fromkeys(["DEFAULT", *members.__members__]))
            raise ModelSpecError(f"{arch} has no weights {enum_name!r} in torchvision: use one of {known}") from None
        file = cache_path(chosen)
        if not file.is_file():
            raise ModelSpecError(f"{spec}: the weights are not in torchvision's local cache and nothing is downloaded; "
                                 f"put {file.name} (from {chosen.url}) at {file}, or give a weights file")
        weights = file
    elif weights is None:
        example = f"{arch}:{next(iter(members.__members__))}" if members is not None else None
        raise ModelSpecError(f"{spec} needs weights: a weights file"
                             + (f", or a weights enum from torchvision's local cache (e.g. torchvision:{example})"
                                if example else ""), "spec", "weights")
    else:
        chosen = members.DEFAULT if members is not None else None
    prep = _preprocessing(chosen)
    kwargs = {"image_size": prep["crop"]} if arch.startswith("vit_") else {}
    net = torchvision.models.get_model(arch, weights=None, **kwargs)
    categories = chosen.meta.get("categories") if chosen is not None else None
    head = _head_size(net, weights) if not enum_name else None
    if head is not None:  # weights of a model trained for another number of classes (e.g. CIFAR-10's 10)
        net = torchvision.models.get_model(arch, weights=None, num_classes=head, **kwargs)
        categories = None
    load_weights(net, weights, spec)
    return AdaptedClassifier(net, mean=prep["mean"], std=prep["std"], resize=prep["resize"], crop=prep["crop"],
                             interpolation=prep["interpolation"], fixed_size=hasattr(net, "image_size"),
                             classes=categories, source={"spec": spec, "weights": str(weights)})


def _head_size(net: nn.Module, weights: Path) -> int | None:
    """The number of classes of the weights in ``weights`` when it differs from ``net``'s: the
    output size the file gives the architecture's last linear layer; None when it is the same
    (or the file cannot tell, and strict loading will say what does not fit)."""
    from uap.checkpoints import fit_state_dict
    from uap.targets import load_state_dict_file

    last = next((name for name, m in reversed(list(net.named_modules())) if isinstance(m, nn.Linear)), None)
    if last is None:
        return None
    try:
        state = fit_state_dict(load_state_dict_file(weights), net.state_dict())  # a DDP checkpoint's names too
    except (OSError, ValueError):
        return None  # load_weights reports it
    bias = state.get(f"{last}.bias")
    out = int(bias.shape[0]) if bias is not None and bias.dim() == 1 else None
    return out if out is not None and out != net.get_submodule(last).out_features else None


def _weights_enum(arch: str):
    import torchvision.models

    try:
        return torchvision.models.get_model_weights(arch)
    except (ValueError, KeyError):
        return None


def _preprocessing(weights) -> dict:
    """Resize, crop, interpolation, mean and std of a weights member's ``transforms()``."""
    if weights is None:
        return dict(_IMAGENET)
    t = weights.transforms()
    if not all(hasattr(t, a) for a in ("resize_size", "crop_size", "mean", "std", "interpolation")):
        raise ModelSpecError(f"{weights} has no image-classification transforms torchvision's adapter understands")
    return {"resize": int(t.resize_size[0]), "crop": int(t.crop_size[0]), "interpolation": t.interpolation.value,
            "mean": tuple(t.mean), "std": tuple(t.std)}


#: The adapter as a model source (entry point ``torchvision`` of the ``uap.models`` group); its label
#: is the whole name, a weights tag included (``resnet50:IMAGENET1K_V2``).
SOURCE = ModelSource(load=load, names=names, weights=True, library="torchvision",
                     label=lambda name: name,
                     help="torchvision:NAME with a weights file, or torchvision:NAME:WEIGHTS "
                          "(e.g. resnet50:IMAGENET1K_V2) from torchvision's local cache")
