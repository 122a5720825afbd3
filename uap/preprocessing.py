"""How images of any size are made the size a model takes: :class:`Preprocessing`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["Preprocessing"]

_INTERPOLATIONS = ("nearest", "bilinear", "bicubic")


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize`` pixels, then take the ``crop``×``crop`` centre.

    This is the evaluation transform of torchvision's ImageNet weights (``weights.transforms()``
    minus the normalisation, which lives inside the model) and of timm's (``resize`` =
    ⌊crop / crop_pct⌋), computed the same way: torchvision's ``resize`` (antialiased) and
    ``center_crop`` on the decoded PIL image, so the pixels match to the last bit.
    """

    resize: int
    crop: int
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        for name in ("resize", "crop"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {', '.join(_INTERPOLATIONS)}, got {self.interpolation!r}")

    @classmethod
    def of(cls, model: object) -> Preprocessing | None:
        """The preprocessing a model declares as ``model.preprocessing`` (a dict with
        ``resize``, ``crop`` and ``interpolation``, as :mod:`uap.adapters` targets have), or None."""
        prep = getattr(model, "preprocessing", None)
        if not isinstance(prep, dict):
            return None
        return cls(int(prep["resize"]), int(prep["crop"]), str(prep.get("interpolation", "bilinear")))

    @classmethod
    def from_sizes(cls, image_size: int | None, resize: int | None) -> Preprocessing | None:
        """From ``--image-size`` (the crop) and ``--resize`` (the shorter side before it).

        Only an image size: resize by ImageNet's 0.875 crop ratio (⌊size / 0.875⌋, 256 for
        224). Only a resize: the crop is the whole shorter side. Neither: None.
        """
        if image_size is None and resize is None:
            return None
        if image_size is None:
            image_size = resize
        if resize is None:
            resize = int(image_size / 0.875)
        if resize < image_size:
            raise ValueError(f"resize ({resize}) must be at least the image size ({image_size}): the crop is taken "
                             "from the resized image")
        return cls(int(resize), int(image_size))

    @classmethod
    def choose(cls, data: str, models: Sequence[object] = (), image_size: int | None = None,
               resize: int | None = None) -> Preprocessing | None:
        """The resize + crop that images of dataset ``data`` get for ``models``.

        Explicit sizes (:meth:`from_sizes`) win; else, for an ``imagefolder:`` dataset, the
        preprocessing of the first model that declares one (an adapter's weights transforms,
        :meth:`of`); else None (the images as they are; cifar10 is always 32×32). Models that
        declare another input size resize the images to theirs inside
        (:func:`uap.adapters.base.fit_input_sizes`, which :func:`uap.inputs.load_inputs` applies).
        """
        explicit = cls.from_sizes(image_size, resize)
        if explicit is not None or not data.startswith("imagefolder:"):
            return explicit
        declared = [p for m in models if (p := cls.of(m)) is not None]
        return declared[0] if declared else None

    def settings(self) -> dict[str, object]:
        """The settings as a JSON-ready dict (as run records and reports store them)."""
        return {"resize": self.resize, "crop": self.crop, "interpolation": self.interpolation}

    def key(self) -> str:
        """A stable text of the settings (part of the decoded-image cache's key)."""
        return f"resize={self.resize},crop={self.crop},interpolation={self.interpolation}"

    def apply(self, image):
        """The resized, centre-cropped PIL image (torchvision's functional transforms)."""
        from torchvision.transforms import InterpolationMode
        from torchvision.transforms import functional as TF

        image = TF.resize(image, [self.resize], interpolation=InterpolationMode(self.interpolation), antialias=True)
        return TF.center_crop(image, [self.crop])
