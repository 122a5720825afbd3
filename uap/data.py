"""Datasets as tensors: ``load(name, split, n, seed, root) -> (x, y, classes)``.

Why this module exists: every part of the toolkit (crafting, evaluation, training the zoo)
needs the same thing — images in ``[0, 1]`` as an ``N×3×H×W`` float tensor, integer labels
and class names — with no download at run time and no unpickling of untrusted files.

Names understood by :func:`load`:

- ``cifar10`` — looked for, in order, under an explicit ``root``, ``$UAP_DATA_DIR`` and the
  user cache dir (``$UAP_CACHE_DIR`` or ``~/.cache/uap``). Two layouts are accepted:
  the ImageFolder JPEG layout ``cifar10/{train,test}/{class}/*.jpg`` and torchvision's
  ``cifar-10-batches-py`` (read with a restricted unpickler that only rebuilds numpy arrays).
  If neither is found, torchvision's download is tried into the cache dir; when that fails
  (offline) a :class:`DataNotFoundError` names every path tried and how to set ``UAP_DATA_DIR``.
- ``imagefolder:PATH`` — any folder of class sub-folders. If ``PATH/train`` and ``PATH/test``
  exist they are the splits. Otherwise (a single-split folder such as ImageNet's ``val/``)
  the images are divided into disjoint parts by a stable hash of their path relative to
  ``PATH``: an image is in ``test`` when ``crc32(relative path) % 5 == 0`` (about 20 %) and
  in ``train`` otherwise, so the crafting and the held-out images never overlap, whatever
  ``n`` and ``seed``. Labels are the sorted sub-folder names (torchvision's ImageFolder rule,
  which for WordNet-id folders is ImageNet's class order); class *names* are read from a
  ``classes.tsv`` (``wnid<TAB>name`` per line) in ``PATH`` or one level above it, when there
  is one, else they are the folder names. Images of one size load as they are; images of
  any size need a :class:`Preprocessing` (shorter side resized, then a centre crop — the
  computation of torchvision's ``weights.transforms()``).

Decoded images are cached as ``uint8`` ``.npy`` files under the cache dir (written image by
image, read back as a memory map), so a folder of images is decoded once, not on every load;
the cache is keyed on the folder, each file's name, label, size, inode, modification and
status-change times, and the preprocessing. Subsets (``n``) are class-balanced and
deterministic for a seed; splits never share an image.
"""
from __future__ import annotations

import hashlib
import operator
import os
import pickle
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from uap.atomic import atomic_write
from uap.images import Images
from uap.preprocessing import Preprocessing

__all__ = ["DataNotFoundError", "Split", "Preprocessing", "Images", "load", "load_split", "cache_dir", "CIFAR10_CLASSES",
           "CLASS_NAMES_FILE", "in_test_split"]

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)
_IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
#: PIL modes of one-channel images with more than 8 bits, and the value that is white in each
#: (``F``: float images, taken to be on the [0, 1] scale).
_WIDE_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0, "I": 65535.0, "F": 1.0}
_SPLITS = ("train", "test")
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
#: file (``wnid<TAB>name`` lines) that names an imagefolder's classes, in the folder or one above
CLASS_NAMES_FILE = "classes.tsv"


class DataNotFoundError(FileNotFoundError):
    """A dataset could not be found locally nor downloaded; the message says where we looked."""


@dataclass(frozen=True)
class Split:
    """A loaded split: images ``x`` in [0, 1] (N×3×H×W float32, or an :class:`~uap.images.Images`
    set of them when loaded with ``stream``), labels ``y`` (int64),
    class names in label order, and ``ids`` — a stable identifier per image (its source
    path relative to the dataset root, or ``batch:index``) so callers can prove disjointness."""

    x: torch.Tensor | Images
    y: torch.Tensor
    classes: tuple[str, ...]
    ids: tuple[str, ...]


def cache_dir() -> Path:
    """The user cache dir: ``$UAP_CACHE_DIR`` or ``$XDG_CACHE_HOME/uap`` or ``~/.cache/uap``."""
    if os.environ.get("UAP_CACHE_DIR"):
        return Path(os.environ["UAP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "uap"


def load(
    name: str = "cifar10",
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    preprocessing: Preprocessing | None = None,
    stream: bool = False,
) -> tuple[torch.Tensor | Images, torch.Tensor, tuple[str, ...]]:
    """Load ``split`` of dataset ``name`` as ``(x, y, classes)``.

    ``x`` is float32 in [0, 1] with shape N×3×H×W, ``y`` int64 labels, ``classes`` the class
    names in label order. ``n`` selects a deterministic class-balanced subset for ``seed``
    (``None`` = the whole split; more than the split has: all of it, as for ``n`` = its size,
    with a warning). ``preprocessing`` resizes and centre-crops the images of an
    ``imagefolder`` (any sizes); CIFAR-10 is always 32×32 and takes none. With ``stream``,
    ``x`` is a :class:`uap.images.Images` set instead: the same images kept as uint8 (a memory
    map of the decoded-image cache) and turned into floats one batch at a time, which every
    measurement (``uap.evaluate``, ``uap.fooling_rate``, ``uap.transfer_matrix``) accepts.
    """
    s = load_split(name, split, n=n, seed=seed, root=root, preprocessing=preprocessing, stream=stream)
    return s.x, s.y, s.classes


def load_split(
    name: str = "cifar10",
    split: str = "train",
    n: int | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    preprocessing: Preprocessing | None = None,
    stream: bool = False,
) -> Split:
    """Like :func:`load` but returns a :class:`Split` that also carries per-image ids."""
    if split not in _SPLITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n is not None:
        n = _whole(n, "n must be a positive number of images", 1)
    seed = _whole(seed, "seed must be an integer ≥ 0", 0)
    if preprocessing is not None and not isinstance(preprocessing, Preprocessing):
        raise TypeError(f"preprocessing must be a uap.data.Preprocessing, got {type(preprocessing).__name__}")
    if name == "cifar10":
        if preprocessing is not None:
            raise ValueError("cifar10 images are 32×32 and take no resize or crop (--image-size/--resize are for "
                             "imagefolder:PATH)")
        images, labels, classes, ids = _load_cifar10(split, root)
        rows = np.arange(len(labels))
    elif name.startswith("imagefolder:"):
        images, rows, labels, classes, ids = _load_imagefolder(Path(name.split(":", 1)[1]).expanduser(), split,
                                                               preprocessing)
    else:
        raise ValueError(f"unknown dataset {name!r}: use 'cifar10' or 'imagefolder:PATH'")
    if n is not None and n > len(labels):
        warnings.warn(f"asked for {n} images of {name}'s {split} split, which has {len(labels)}: taking all {len(labels)}",
                      stacklevel=2)
        n = len(labels)
    index = np.arange(len(labels)) if n is None else balanced_subset(labels, n, seed)
    chosen = Images(images, rows[index])  # (a memory map of) the decoded pixels, nothing copied yet
    y = torch.from_numpy(labels[index].astype(np.int64))
    return Split(x=chosen if stream else chosen.tensor(), y=y, classes=tuple(classes),
                 ids=tuple(ids[i] for i in index))


def _whole(value: object, message: str, minimum: int) -> int:
    """``value`` as an int ≥ ``minimum`` (numpy integers too), else ``ValueError(message, got …)``."""
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < minimum:
        raise ValueError(f"{message}, got {value!r}")
    return number


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of a class-balanced subset of size ``n`` (deterministic for ``seed``).

    Each class gets ``n // C`` images, the first ``n % C`` classes (in a seeded order) one more;
    a class with too few images gives all it has and the rest is filled from other classes.
    The result is sorted by class, then by the seeded order within the class.
    """
    labels = np.asarray(labels)
    if n > len(labels):
        raise ValueError(f"asked for {n} images but the split has only {len(labels)}")
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per_class = {c: rng.permutation(np.flatnonzero(labels == c)) for c in classes}
    quota = {c: n // len(classes) for c in classes}
    for c in rng.permutation(classes)[: n % len(classes)]:
        quota[c] += 1
    chosen = [per_class[c][: quota[c]] for c in classes]
    short = n - sum(len(c) for c in chosen)
    if short:  # some class ran out: top up from the leftovers, still deterministic
        leftovers = np.concatenate([per_class[c][quota[c]:] for c in classes])
        chosen.append(rng.permutation(leftovers)[:short])
    return np.concatenate(chosen)


# --------------------------------------------------------------------------- CIFAR-10

def _candidate_roots(root: str | os.PathLike | None) -> list[Path]:
    roots = []
    if root is not None:
        roots.append(Path(root).expanduser())
    if os.environ.get("UAP_DATA_DIR"):
        roots.append(Path(os.environ["UAP_DATA_DIR"]).expanduser())
    roots.append(cache_dir())
    return roots


def _cifar10_layouts(base: Path) -> list[tuple[str, Path]]:
    """The places under ``base`` where CIFAR-10 may live, as (layout, path)."""
    return [
        ("imagefolder", base / "cifar10"),
        ("batches", base / "cifar-10-batches-py"),
        ("batches", base / "cifar10" / "cifar-10-batches-py"),
        ("imagefolder", base),  # base is itself the cifar10 folder
    ]


def _load_cifar10(split: str, root):
    tried = []
    for base in _candidate_roots(root):
        for layout, path in _cifar10_layouts(base):
            tried.append(path)
            if layout == "imagefolder" and (path / split).is_dir() and _has_class_dirs(path / split):
                images, labels, classes, ids = _read_imagefolder_cached(path / split, prefix=split)
                if tuple(classes) != CIFAR10_CLASSES:
                    continue
                return images, labels, classes, ids
            if layout == "batches" and (path / "batches.meta").is_file():
                return _read_cifar_batches(path, split)
    downloaded = _try_download_cifar10(cache_dir())
    if downloaded is not None:
        return _read_cifar_batches(downloaded, split)
    listing = ", ".join(str(p) for p in dict.fromkeys(tried))
    raise DataNotFoundError(  # one line: every front end shows it as one
        "CIFAR-10 not found and could not be downloaded (offline?). Looked for "
        f"'cifar10/{{train,test}}/<class>/*.jpg' or 'cifar-10-batches-py/' in: {listing}. "
        "Set UAP_DATA_DIR to the folder that contains 'cifar10/' (e.g. UAP_DATA_DIR=../shared/data) "
        "or pass --data-root."
    )


def _try_download_cifar10(target: Path) -> Path | None:
    """Try torchvision's download into ``target``; return the batches folder or None."""
    if os.environ.get("UAP_NO_DOWNLOAD"):
        return None
    try:
        from torchvision.datasets.utils import download_and_extract_archive

        target.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(CIFAR10_URL, str(target), md5="c58f30108f718f92721af3b95e74349a")
    except Exception:  # offline, DNS failure, disk error: all mean "not available"
        return None
    path = target / "cifar-10-batches-py"
    return path if (path / "batches.meta").is_file() else None


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild numpy arrays and builtin containers.

    torchvision's CIFAR-10 batches are pickles; a general ``pickle.load`` would run any code
    the file names. This one refuses every global except numpy's array reconstruction.
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles from Python 3 store bytes
    }

    def find_class(self, module, name):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data file")


def _read_batch(path: Path) -> dict:
    with open(path, "rb") as f:
        raw = _ArrayUnpickler(f, encoding="bytes").load()
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in raw.items()}


def _read_cifar_batches(path: Path, split: str):
    files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys, ids = [], [], []
    for fname in files:
        batch = _read_batch(path / fname)
        data = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
        xs.append(data)
        ys.append(np.asarray(batch["labels"], dtype=np.int64))
        ids.extend(f"{fname}:{i}" for i in range(len(data)))
    meta = _read_batch(path / "batches.meta")
    classes = [c.decode() if isinstance(c, bytes) else c for c in meta["label_names"]]
    return np.concatenate(xs), np.concatenate(ys), classes, ids


# --------------------------------------------------------------------------- ImageFolder

def _has_class_dirs(path: Path) -> bool:
    return any(p.is_dir() for p in path.iterdir())


def _list_imagefolder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataNotFoundError(f"{folder} has no class sub-folders (expected <class>/<image> files)")
    if len(classes) == 1:
        raise ValueError(f"{folder} has a single class sub-folder ({classes[0]!r}): labels and accuracies need at "
                         "least two classes (expected <class>/<image> files, one sub-folder per class)")
    items, skipped = [], {}
    for label, cls in enumerate(classes):
        for f in sorted((folder / cls).iterdir()):
            if f.suffix.lower() in _IMAGE_SUFFIXES:
                items.append((f"{cls}/{f.name}", label))
            elif not f.name.startswith("."):  # hidden files (.DS_Store …) are no one's images
                kind = f.suffix.lower() or ("folders" if f.is_dir() else "no extension")
                skipped[kind] = skipped.get(kind, 0) + 1
    kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0])))
    known = ", ".join(sorted(_IMAGE_SUFFIXES))
    if not items:
        raise DataNotFoundError(f"{folder} has class folders but no images in them"
                                + (f" (only {kinds}; images are {known})" if skipped else ""))
    if skipped:
        warnings.warn(f"{folder}: skipped {sum(skipped.values())} entries that are not images ({kinds}); images are "
                      f"{known}", UserWarning, stacklevel=2)
    return classes, items


def _read_imagefolder_cached(folder: Path, prefix: str = "", preprocessing: Preprocessing | None = None):
    """Decode every image under ``folder`` once; later calls read a uint8 ``.npz`` cache.

    The cache's key covers the folder, every file's name, label, size, inode, modification
    and status-change times, and the preprocessing, so an edited, added or removed image, or
    other settings, decode anew. The status-change time (``st_ctime_ns``) is what catches an
    edit that keeps the size and puts the old modification time back (``touch -r``, ``rsync
    -t``, a copy that preserves times): no program can set it, every write and every ``utime``
    moves it; the inode catches a file replaced by another (a rename over it).
    """
    classes, items = _list_imagefolder(folder)
    lines = []
    for rel, label in items:
        st = (folder / rel).stat()
        lines.append(f"{rel}:{label}:{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}")
    listing = "\n".join(lines)
    settings = preprocessing.key() if preprocessing is not None else "as-is"
    stamp = hashlib.sha256(f"{folder.resolve()}\n{settings}\n{listing}".encode()).hexdigest()[:16]
    cache = cache_dir() / "arrays" / f"{folder.name}-{stamp}.npy"
    ids = [f"{prefix}/{rel}" if prefix else rel for rel, _ in items]
    labels = np.array([label for _, label in items], dtype=np.int64)
    images = _open_cache(cache, len(items))
    if images is None:
        paths = [folder / rel for rel, _ in items]
        try:  # decode straight into the cache file: the images are never all in memory at once
            atomic_write(cache, lambda tmp: _decode_all(paths, preprocessing, into=tmp))
            images = _open_cache(cache, len(items))
        except OSError:  # a read-only cache dir only costs speed
            images = None
        if images is None:
            images = _decode_all(paths, preprocessing)
    return images, labels, classes, ids


def _open_cache(cache: Path, count: int) -> np.ndarray | None:
    """The cached N×H×W×3 uint8 images, memory-mapped read-only (pages are read when used), or
    None when there is no usable cache (missing, damaged, or another number of images)."""
    if not cache.is_file():
        return None
    try:
        images = np.load(cache, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):  # empty, truncated or not an array
        return None  # a damaged cache is rebuilt
    ok = images.dtype == np.uint8 and images.ndim == 4 and len(images) == count
    return images if ok else None


def _decode(path: Path, preprocessing: Preprocessing | None) -> np.ndarray:
    """One image file as an H×W×3 uint8 array; a file that is not a readable image (a text
    file named ``.jpg``, a truncated download, no read permission) is a ``ValueError`` naming it.
    A 16-bit or float image (a PNG in mode ``I;16``, a float TIFF) is scaled from its own range
    (0–65535, or [0, 1]) to 0–255, not clipped at 255 as a plain conversion would."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            image = _to_rgb(im)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's ways of saying "not an image"
        reason = " ".join(str(e).split()) or type(e).__name__
        raise ValueError(f"{path} is not a readable image ({reason}); remove it from the folder or replace it") from None
    if preprocessing is not None:
        image = preprocessing.apply(image)
    return np.asarray(image)


def _to_rgb(im):
    """``im`` as an 8-bit RGB PIL image, 16-bit and float images scaled from their range."""
    from PIL import Image

    white = _WIDE_MODES.get(im.mode)
    if white is None:
        return im.convert("RGB")
    values = np.asarray(im, dtype=np.float64) / white
    gray = np.rint(np.clip(np.nan_to_num(values), 0.0, 1.0) * 255).astype(np.uint8)
    return Image.fromarray(np.repeat(gray[..., None], 3, axis=2))


def _decode_all(paths: list[Path], preprocessing: Preprocessing | None = None,
                into: Path | None = None) -> np.ndarray:
    """Every image, decoded (and preprocessed) into one N×H×W×3 uint8 array — in memory, or
    ``into`` a ``.npy`` file written image by image."""
    first = _decode(paths[0], preprocessing)
    shape = (len(paths), *first.shape)
    out = (np.empty(shape, dtype=np.uint8) if into is None
           else np.lib.format.open_memmap(into, mode="w+", dtype=np.uint8, shape=shape))
    for i, p in enumerate(paths):
        arr = first if i == 0 else _decode(p, preprocessing)
        if arr.shape != first.shape:
            raise ValueError(f"{p} is {arr.shape[1]}×{arr.shape[0]}, others are {first.shape[1]}×{first.shape[0]}; "
                             "images of different sizes need a resize and crop (--image-size N, or a model "
                             "that declares its preprocessing)")
        out[i] = arr
    if into is not None:
        out.flush()
    return out


def _class_names(path: Path, folders: list[str]) -> list[str]:
    """Folder names mapped through ``classes.tsv`` in ``path`` or its parent (unlisted ones kept)."""
    for candidate in (path / CLASS_NAMES_FILE, path.parent / CLASS_NAMES_FILE):
        if candidate.is_file():
            names = {}
            for number, line in enumerate(candidate.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                key, sep, name = line.partition("\t")
                if not sep or not name.strip():
                    raise ValueError(f"{candidate}:{number} is not 'folder<TAB>name': {line!r}")
                names[key.strip()] = name.strip()
            return [names.get(f, f) for f in folders]
    return folders


def in_test_split(relative_path: str) -> bool:
    """Whether a single-split folder's image (path relative to the folder) is held out:
    ``crc32(path) % 5 == 0``, about one image in five, fixed for the file's name."""
    return zlib.crc32(relative_path.encode()) % 5 == 0


def _load_imagefolder(path: Path, split: str, preprocessing: Preprocessing | None = None):
    if not path.is_dir():
        raise DataNotFoundError(f"imagefolder path {path} does not exist")
    if (path / split).is_dir():
        images, labels, classes, ids = _read_imagefolder_cached(path / split, prefix=split, preprocessing=preprocessing)
        return images, np.arange(len(labels)), labels, _class_names(path, classes), ids
    images, labels, classes, ids = _read_imagefolder_cached(path, preprocessing=preprocessing)
    in_test = np.array([in_test_split(i) for i in ids])
    keep = ~in_test if split == "train" else in_test
    idx = np.flatnonzero(keep)
    if not len(idx):
        raise DataNotFoundError(f"{path} has no split folders and none of its {len(ids)} images falls in the {split} "
                                "part (an image is held out when crc32 of its relative path is divisible by 5)")
    return images, idx, labels[idx], _class_names(path, classes), [ids[i] for i in idx]

