"""``Perturbation``: a universal perturbation and the facts needed to reproduce it.

An artefact is two files side by side, and nothing in them is ever unpickled:

- ``NAME.safetensors`` — the tensor ``v`` (C×H×W, float32) under the key ``"v"``, and its
  metadata in the safetensors header (key ``"uap"``): one file, written by one atomic
  rename, so tensor and metadata can never be from different writes;
- ``NAME.json`` — a human-readable copy of the same metadata (model id, data, ε, p, δ,
  method, seed, per-pass history, time, package version), for people and tools; :meth:`load`
  trusts the header, so a reader that opens the pair while a writer replaces it (the sidecar
  is renamed a moment after the tensor file) still gets a matching tensor and metadata. A file
  from before the header copy existed is read with its sidecar.

``to_png`` renders ``v`` as in Fig. 4 of Moosavi-Dezfooli et al. (CVPR 2017): the
perturbation is scaled to the full [0, 255] range for visibility (its true magnitude is
tiny), optionally enlarged with nearest-neighbour upsampling.
"""
from __future__ import annotations

import copy
import io
import json
import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from uap.atomic import atomic_write
from uap.distributed import broadcast, broadcast_json, is_distributed, world
from uap.projection import check_norm, lp_norm, norm_name

__all__ = ["Perturbation", "share_perturbation"]

_TENSOR_KEY = "v"
_HEADER_KEY = "uap"


@dataclass
class Perturbation:
    """A universal perturbation ``v`` (C×H×W, in [0, 1] pixel units) with its metadata.

    ``norm`` is stored as text (``"inf"``, ``"2"``, ``"1"``; JSON has no ∞); ``p`` gives it
    as a float. ``history`` is the per-pass list of records written by :func:`uap.craft`
    (``fooling_rate``, ``heldout_fooling_rate``, ``norm_2``, ``norm_inf``, ``seconds`` …).
    ``extra`` holds anything else a method wants to keep (e.g. DeepFool options).
    """

    v: torch.Tensor
    model: str = "unknown"
    data: str = "unknown"
    eps: float = float("nan")
    norm: str = "inf"
    delta: float | None = None
    method: str = "unknown"
    seed: int | None = None
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    version: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not torch.is_tensor(self.v) or not self.v.is_floating_point() or self.v.dim() != 3:
            shape = tuple(self.v.shape) if torch.is_tensor(self.v) else type(self.v).__name__
            raise ValueError(f"a Perturbation holds a floating C×H×W tensor, got {shape}")
        self.norm = norm_name(self.norm)
        if not self.version:
            from uap import __version__

            self.version = __version__

    # ------------------------------------------------------------------ facts
    @property
    def p(self) -> float:
        """The norm as a float (1.0, 2.0 or inf)."""
        return check_norm(self.norm)

    @property
    def record(self) -> dict:
        """The history record measured on ``v``: the last pass's, or the pass chosen by
        ``craft(keep_best=True)`` (``extra["best_pass"]``). Empty without history."""
        if not self.history:
            return {}
        chosen = int(self.extra.get("best_pass", len(self.history)))
        return self.history[chosen - 1] if chosen >= 1 else {}

    @property
    def fooling_rate(self) -> float | None:
        """The fooling rate of ``v`` on the crafting set (None without history, or when its pass
        was not measured: ``craft(eval_every=…)`` always measures a run's last pass)."""
        return self.record.get("fooling_rate")

    @property
    def heldout_fooling_rate(self) -> float | None:
        """The held-out fooling rate of ``v`` (None if not measured)."""
        return self.record.get("heldout_fooling_rate")

    @property
    def passes(self) -> int:
        """Number of passes over the crafting set that produced ``v``."""
        return len(self.history)

    def norms(self) -> dict[str, float]:
        """‖v‖₁, ‖v‖₂ and ‖v‖∞."""
        return {f"norm_{name}": lp_norm(self.v, p).item() for name, p in (("1", 1), ("2", 2), ("inf", math.inf))}

    def metadata(self) -> dict[str, Any]:
        """Everything but the tensor, as JSON-ready values."""
        meta = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "v"}
        meta["shape"] = list(self.v.shape)
        return meta

    # ------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (``.safetensors`` is appended if missing) and its ``.json`` sidecar.

        Both files are written atomically. Returns the tensor file's path.
        """
        from safetensors.torch import save

        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_name(path.name + ".safetensors")
        meta_json = json.dumps(self.metadata(), indent=2, default=_json_default)
        tensor = self.v.detach().to("cpu", torch.float32).contiguous()
        atomic_write(path, save({_TENSOR_KEY: tensor}, metadata={_HEADER_KEY: meta_json}))
        atomic_write(path.with_suffix(".json"), (meta_json + "\n").encode())
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Perturbation":
        """Read a perturbation written by :meth:`save` (no pickle involved).

        The metadata comes from the tensor file's own header (written with the tensor, so it
        always matches it); the ``.json`` sidecar only for a file without one.
        """
        from safetensors.torch import load as load_tensors

        path = Path(path)
        if path.suffix != ".safetensors" and not path.exists():
            path = path.with_name(path.name + ".safetensors")
        if not path.is_file():
            raise FileNotFoundError(f"perturbation file {path} does not exist")
        # One read of the whole file, then parsing from memory: a file opened by name (or mapped)
        # can be read partly from the file a concurrent writer renamed over it, so header and
        # tensor bytes would come from different writes.
        blob = path.read_bytes()
        try:
            tensors = load_tensors(blob)
            size = int.from_bytes(blob[:8], "little")
            header = json.loads(blob[8:8 + size]).get("__metadata__") or {}
        except Exception as e:  # SafetensorError (not an OSError) for a damaged or foreign file
            raise ValueError(f"could not read {path} as safetensors: {e}") from None
        if _TENSOR_KEY not in tensors:
            raise ValueError(f"{path} has no tensor named {_TENSOR_KEY!r}")
        v = tensors[_TENSOR_KEY]
        sidecar = path.with_suffix(".json")
        text = header.get(_HEADER_KEY)
        source = f"the header of {path}"
        if text is None:  # a file from before metadata travelled in the header
            text, source = (sidecar.read_text(), str(sidecar)) if sidecar.is_file() else ("{}", source)
        try:
            meta = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"metadata of {path} is not valid JSON: {e}") from None
        if not isinstance(meta, dict):
            raise ValueError(f"metadata in {source} is a JSON {type(meta).__name__}, not an object")
        _check_agrees(v, meta, source)
        return cls.from_metadata(v, meta)

    @classmethod
    def from_metadata(cls, v: torch.Tensor, meta: dict[str, Any]) -> "Perturbation":
        """The perturbation with tensor ``v`` and the fields of :meth:`metadata` (unknown keys, e.g.
        from newer versions, are kept in ``extra``, not lost)."""
        meta = dict(meta)
        meta.pop("shape", None)
        known = {k: meta.pop(k) for k in list(meta) if k in cls.__dataclass_fields__ and k != "v"}
        perturbation = cls(v=v, **known)
        perturbation.extra.update(meta)
        return perturbation

    def to_png(self, path: str | os.PathLike, *, scale: int = 8) -> Path:
        """Save ``v`` as a PNG, min-max scaled to [0, 255] (paper Fig. 4), upsampled ×``scale``."""
        from PIL import Image

        if scale < 1:
            raise ValueError(f"scale must be ≥ 1, got {scale}")
        v = self.v.detach().to("cpu", torch.float32)
        lo, hi = v.min(), v.max()
        img = (v - lo) / (hi - lo) if hi > lo else torch.full_like(v, 0.5)
        img = (img * 255).round().to(torch.uint8)
        if scale > 1:
            img = img.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
        array = img.permute(1, 2, 0).numpy()
        pil = Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        path = Path(path)
        atomic_write(path, buf.getvalue())
        return path


def share_perturbation(pert: Perturbation | None, src: int = 0, **info: Any
                       ) -> tuple[Perturbation | None, dict[str, Any]]:
    """Rank ``src``'s ``pert`` (or None) and its JSON ``info`` on every rank under torch.distributed.

    The metadata and ``info`` travel as JSON, then ``v`` as a float32 tensor (only when rank
    ``src`` has a perturbation, which every rank learns from the metadata). Rank ``src`` gets
    its own objects back; the other ranks' ``pert`` and ``info`` are ignored. Without a process
    group: ``(pert, info)``.
    """
    if not is_distributed():
        return pert, info
    sender = world()[0] == src
    message = broadcast_json({"meta": pert.metadata() if pert is not None else None, "info": info} if sender else None,
                             src=src)
    if message["meta"] is None:
        return None, message["info"]
    v = broadcast(pert.v.detach().float().cpu() if sender else torch.zeros(message["meta"]["shape"]), src=src)
    return (pert, info) if sender else (Perturbation.from_metadata(v, message["meta"]), message["info"])


#: Slack of the "‖v‖_p ≤ ε" check of a loaded file: float32 rounding of a projected ``v``.
_EPS_SLACK = 1e-4


def _check_agrees(v: torch.Tensor, meta: dict[str, Any], source: object) -> None:
    """Refuse a file whose metadata contradicts its tensor: a tensor that is not a finite float
    C×H×W, another shape than ``meta["shape"]``, an unknown norm, or ``‖v‖_p`` above the ε it
    claims (a sidecar of another perturbation, a hand-edited file). Fields the metadata does
    not have (older files, a bare tensor) are not checked."""
    if not v.is_floating_point() or v.dim() != 3:
        raise ValueError(f"the tensor of {source} is {str(v.dtype).removeprefix('torch.')} {tuple(v.shape)}; "
                         "a perturbation is a floating C×H×W tensor")
    if not bool(torch.isfinite(v).all()):
        raise ValueError(f"the tensor of {source} has NaN or infinite values")
    shape = meta.get("shape")
    if shape is not None and list(shape) != list(v.shape):
        raise ValueError(f"{source} says shape {shape} but its tensor is {list(v.shape)}: the metadata does not "
                         "describe this tensor")
    try:
        p = check_norm(meta.get("norm", "inf"))
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None
    eps = meta.get("eps")
    if isinstance(eps, (int, float)) and not isinstance(eps, bool) and math.isfinite(eps):
        size = lp_norm(v.float(), p).item()
        if eps <= 0 or size > eps * (1 + _EPS_SLACK) + 1e-7:
            raise ValueError(f"{source} says eps={eps:.6g} (ℓ{norm_name(p)}) but its tensor has "
                             f"‖v‖_{norm_name(p)} = {size:.6g}: the metadata does not describe this tensor")


def _json_default(obj: Any) -> Any:
    if torch.is_tensor(obj):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")
