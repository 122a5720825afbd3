"""``Report``: the numbers of a perturbations × models evaluation, and their files.

A report is a set of aligned matrices — one row per perturbation, one column per model —
measured on one set of held-out images (Moosavi-Dezfooli et al., CVPR 2017, Table 2 lays out
its cross-model transfer the same way: rows = model the UAP was crafted on, columns = model
it is applied to). Keeping every metric as a P×M matrix keeps the rows and columns of all
of them in step, and makes the JSON readable by anything (``fooling_rate`` is a list of rows).

Files:

- ``results.json`` — ``perturbations`` (row names), ``models`` (column names), one P×M list
  of rows per metric, per-model ``clean_accuracy``, per-perturbation norms, ``meta``.
  Missing values (no labels, no encoder) are ``null``. ``baselines`` names the rows that are
  baselines (random noise, chessboards, a Fourier basis image: :mod:`uap.baselines`) rather
  than crafted perturbations.
- ``results.csv`` — the same numbers in long form, one line per (perturbation, model),
  so a spreadsheet or ``pandas.read_csv`` can filter and pivot it; its ``baseline`` column
  is 1 on the baseline rows.

Both round-trip exactly (floats are written with ``repr``).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from uap.atomic import atomic_write
from uap.intervals import wilson_interval

__all__ = ["Report", "METRICS"]

#: P×M float matrices held by a :class:`Report`, in the order they appear in tables and files.
METRICS = ("fooling_rate", "accuracy", "dominant_share", "embedding_cosine")


def _as_matrix(value: Any, shape: tuple[int, int], name: str, dtype=np.float64) -> np.ndarray:
    """``value`` (array or nested lists, ``None`` = missing) as a ``shape`` array of ``dtype``."""
    if not isinstance(value, np.ndarray):
        value = [[math.nan if v is None else v for v in row] for row in value]
    arr = np.array(value, dtype=dtype).reshape(-1) if np.size(value) == 0 else np.array(value, dtype=dtype)
    if arr.size == 0 and shape[0] * shape[1] == 0:
        return arr.reshape(shape)
    if arr.shape != shape:
        raise ValueError(f"{name} has shape {arr.shape}, expected {shape} (perturbations × models)")
    return arr


def _none_if_nan(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


@dataclass
class Report:
    """Evaluation of P perturbations on M models over the same ``n_images`` held-out images.

    Attributes (``[i, j]`` = perturbation ``i`` applied to model ``j``):

    - ``fooling_rate`` — share of images whose predicted label changes,
      ``mean(argmax f(clip(x + v)) != argmax f(x))``; measured against the model's clean
      *predictions*, not the true labels (the UAP paper's definition).
    - ``accuracy`` — accuracy under the perturbation (needs labels; NaN otherwise).
    - ``dominant_label`` / ``dominant_share`` — the most common label after the perturbation
      and the share of images that receive it (UAPs tend to send many inputs to a few
      dominant labels, paper §4).
    - ``embedding_cosine`` — mean cosine similarity between clean and perturbed embeddings of
      ``model.encoder`` (NaN for models without an encoder).
    - ``clean_accuracy`` — per model (length M), NaN without labels.
    - ``norm_linf`` / ``norm_l2`` — per perturbation (length P), so a reader can check the
      budgets the rows were crafted under.
    - ``baselines`` — the rows that are baselines (:mod:`uap.baselines`), in row order.

    :meth:`interval` gives each fooling rate's 95 % Wilson interval over the ``n_images``
    (stored beside the rates in the JSON and CSV), since a held-out set of a few hundred
    photographs leaves several points of uncertainty.
    """

    perturbations: list[str]
    models: list[str]
    fooling_rate: np.ndarray
    accuracy: np.ndarray
    dominant_label: np.ndarray
    dominant_share: np.ndarray
    embedding_cosine: np.ndarray
    clean_accuracy: np.ndarray
    norm_linf: np.ndarray
    norm_l2: np.ndarray
    n_images: int
    classes: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    baselines: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.perturbations = [str(p) for p in self.perturbations]
        self.models = [str(m) for m in self.models]
        for names, what in ((self.perturbations, "perturbation"), (self.models, "model")):
            if len(set(names)) != len(names):
                raise ValueError(f"{what} names must be unique, got {names}")
        shape = (len(self.perturbations), len(self.models))
        for name in METRICS:
            setattr(self, name, _as_matrix(getattr(self, name), shape, name))
        self.dominant_label = _as_matrix(self.dominant_label, shape, "dominant_label", dtype=np.int64)
        self.clean_accuracy = np.array(self.clean_accuracy, dtype=np.float64).reshape(len(self.models))
        self.norm_linf = np.array(self.norm_linf, dtype=np.float64).reshape(len(self.perturbations))
        self.norm_l2 = np.array(self.norm_l2, dtype=np.float64).reshape(len(self.perturbations))
        self.n_images = int(self.n_images)
        if self.classes is not None:
            self.classes = [str(c) for c in self.classes]
        unknown = [b for b in self.baselines if str(b) not in self.perturbations]
        if unknown:
            raise ValueError(f"baseline rows {unknown} are not among the perturbations {self.perturbations}")
        marked = {str(b) for b in self.baselines}
        self.baselines = [p for p in self.perturbations if p in marked]

    def is_baseline(self, perturbation: str) -> bool:
        """Whether the row ``perturbation`` is a baseline rather than a crafted perturbation."""
        return perturbation in self.baselines

    # ------------------------------------------------------------------ access

    def cell(self, perturbation: str, model: str) -> dict[str, Any]:
        """All metrics of one (perturbation, model) pair as a flat dict."""
        i, j = self._index(perturbation, model)
        label = int(self.dominant_label[i, j])
        return {
            "perturbation": perturbation,
            "baseline": int(perturbation in self.baselines),
            "model": model,
            "fooling_rate": float(self.fooling_rate[i, j]),
            "fooling_rate_low": self._interval(i, j)[0],
            "fooling_rate_high": self._interval(i, j)[1],
            "clean_accuracy": float(self.clean_accuracy[j]),
            "accuracy": float(self.accuracy[i, j]),
            "dominant_label": label,
            "dominant_class": self.classes[label] if self.classes and 0 <= label < len(self.classes) else "",
            "dominant_share": float(self.dominant_share[i, j]),
            "embedding_cosine": float(self.embedding_cosine[i, j]),
        }

    def interval(self, perturbation: str, model: str) -> tuple[float, float]:
        """The 95 % Wilson interval of the fooling rate of ``perturbation`` on ``model``
        (:func:`uap.intervals.wilson_interval` over ``n_images``; NaNs when it is NaN)."""
        i, j = self._index(perturbation, model)
        return self._interval(i, j)

    def _interval(self, i: int, j: int) -> tuple[float, float]:
        rate = float(self.fooling_rate[i, j])
        if rate != rate or self.n_images <= 0:
            return math.nan, math.nan
        return wilson_interval(int(round(rate * self.n_images)), int(self.n_images))

    def _index(self, perturbation: str, model: str) -> tuple[int, int]:
        try:
            return self.perturbations.index(perturbation), self.models.index(model)
        except ValueError:
            raise ValueError(
                f"no cell ({perturbation!r}, {model!r}); rows are {self.perturbations}, "
                f"columns are {self.models}"
            ) from None

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Report):
            return NotImplemented
        same_arrays = all(
            np.array_equal(getattr(self, k), getattr(other, k), equal_nan=k != "dominant_label")
            for k in (*METRICS, "dominant_label", "clean_accuracy", "norm_linf", "norm_l2")
        )
        return (
            same_arrays
            and self.perturbations == other.perturbations
            and self.models == other.models
            and self.n_images == other.n_images
            and self.classes == other.classes
            and self.baselines == other.baselines
        )

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; NaN becomes ``None`` (JSON ``null``)."""

        def rows(m: np.ndarray) -> list[list[float | None]]:
            return [[_none_if_nan(float(v)) for v in row] for row in m]

        out: dict[str, Any] = {
            "perturbations": list(self.perturbations),
            "baselines": list(self.baselines),
            "models": list(self.models),
            "n_images": self.n_images,
        }
        for name in METRICS:
            out[name] = rows(getattr(self, name))
        out["fooling_rate_interval"] = [[[_none_if_nan(v) for v in self._interval(i, j)] for j in range(len(self.models))]
                                        for i in range(len(self.perturbations))]
        out["dominant_label"] = [[int(v) for v in row] for row in self.dominant_label]
        out["clean_accuracy"] = [_none_if_nan(float(v)) for v in self.clean_accuracy]
        out["norm_linf"] = [float(v) for v in self.norm_linf]
        out["norm_l2"] = [float(v) for v in self.norm_l2]
        out["classes"] = self.classes
        out["meta"] = self.meta
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Report:
        """Inverse of :meth:`to_dict`."""
        missing = [k for k in ("perturbations", "models", "fooling_rate") if k not in d]
        if missing:
            raise ValueError(f"not a uap report: missing {missing}")
        p, m = len(d["perturbations"]), len(d["models"])
        nan_rows = [[None] * m for _ in range(p)]

        def vec(key: str, n: int) -> list:
            return [math.nan if v is None else v for v in d.get(key, [None] * n)]

        return cls(
            perturbations=d["perturbations"],
            models=d["models"],
            fooling_rate=d["fooling_rate"],
            accuracy=d.get("accuracy", nan_rows),
            dominant_label=d.get("dominant_label", [[-1] * m for _ in range(p)]),
            dominant_share=d.get("dominant_share", nan_rows),
            embedding_cosine=d.get("embedding_cosine", nan_rows),
            clean_accuracy=vec("clean_accuracy", m),
            norm_linf=vec("norm_linf", p),
            norm_l2=vec("norm_l2", p),
            n_images=d.get("n_images", 0),
            classes=d.get("classes"),
            meta=d.get("meta") or {},
            baselines=d.get("baselines") or [],
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    def save_json(self, path: str | os.PathLike) -> Path:
        """Write ``results.json``-style JSON atomically; returns the path."""
        atomic_write(path, self.to_json() + "\n")
        return Path(path)

    def save(self, out_dir: str | os.PathLike, perturbations: Any, models: Any, x: Any, y: Any = None) -> list[Path]:
        """Write the whole result into ``out_dir``: ``results.json``, ``results.csv`` and the
        figures of :func:`uap.plots.write_figures` (heat map, the perturbations, examples of
        ``x`` under them). Under ``torch.distributed`` rank 0 writes, by itself; the others
        write nothing and get ``[]``. Returns the paths written."""
        from uap import distributed
        from uap.plots import write_figures

        if not distributed.is_main():
            return []
        out = Path(out_dir)
        with distributed.alone():
            written = [self.save_json(out / "results.json"), self.save_csv(out / "results.csv")]
            written += list(write_figures(out, self, perturbations, models, x, y=y).values())
        return written

    @classmethod
    def load_json(cls, path: str | os.PathLike) -> Report:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"report {path} does not exist")
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None

    # ------------------------------------------------------------------ CSV

    CSV_COLUMNS = (
        "perturbation", "baseline", "model", "fooling_rate", "fooling_rate_low", "fooling_rate_high",
        "clean_accuracy", "accuracy",
        "dominant_label", "dominant_class", "dominant_share", "embedding_cosine",
        "norm_linf", "norm_l2", "n_images",
    )

    def to_csv(self) -> str:
        """Long form: one line per (perturbation, model); empty fields for missing values."""
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(self.CSV_COLUMNS)
        for i, pert in enumerate(self.perturbations):
            for model in self.models:
                c = self.cell(pert, model)
                c.update(norm_linf=float(self.norm_linf[i]), norm_l2=float(self.norm_l2[i]), n_images=self.n_images)
                w.writerow(["" if isinstance(c[k], float) and math.isnan(c[k]) else
                            repr(c[k]) if isinstance(c[k], float) else c[k] for k in self.CSV_COLUMNS])
        return buf.getvalue()

    def save_csv(self, path: str | os.PathLike) -> Path:
        atomic_write(path, self.to_csv())
        return Path(path)

    @classmethod
    def from_csv(cls, text: str, classes: Sequence[str] | None = None) -> Report:
        """Rebuild a report from :meth:`to_csv` output (``meta`` is not part of the CSV)."""
        rows = list(csv.DictReader(io.StringIO(text)))
        if not rows or "fooling_rate" not in rows[0]:
            raise ValueError("not a uap results CSV: no 'fooling_rate' column")
        perts = list(dict.fromkeys(r["perturbation"] for r in rows))
        models = list(dict.fromkeys(r["model"] for r in rows))
        p, m = len(perts), len(models)
        mats = {k: np.full((p, m), math.nan) for k in METRICS}
        labels = np.full((p, m), -1, dtype=np.int64)
        clean = np.full(m, math.nan)
        linf, l2 = np.full(p, math.nan), np.full(p, math.nan)
        n_images = 0
        baselines = list(dict.fromkeys(r["perturbation"] for r in rows if r.get("baseline") == "1"))

        def num(s: str) -> float:
            return math.nan if s == "" else float(s)

        for r in rows:
            i, j = perts.index(r["perturbation"]), models.index(r["model"])
            for k in METRICS:
                mats[k][i, j] = num(r[k])
            labels[i, j] = int(r["dominant_label"])
            clean[j], linf[i], l2[i] = num(r["clean_accuracy"]), num(r["norm_linf"]), num(r["norm_l2"])
            n_images = int(r["n_images"])
        return cls(perturbations=perts, models=models, dominant_label=labels, clean_accuracy=clean,
                   norm_linf=linf, norm_l2=l2, n_images=n_images, classes=classes, baselines=baselines, **mats)

    @classmethod
    def load_csv(cls, path: str | os.PathLike, classes: Sequence[str] | None = None) -> Report:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"results CSV {path} does not exist")
        return cls.from_csv(path.read_text(encoding="utf-8"), classes=classes)
