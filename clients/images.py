"""Load images from files and convert them to a model's input spec (torch-free).

Sources: PNG/JPEG (any format pillow reads), ``.npy``, ``.npz`` (array ``x``, ``images`` or the
only array; labels from ``y`` or ``labels``), or a directory of those (sorted, not recursive).

Conversion to the model's ``[C, H, W]`` float32 in [0, 1] (``to_model_input``):

* layout: ``[H, W]``, ``[H, W, C]``, ``[C, H, W]``, ``[N, H, W]``, ``[N, C, H, W]`` and
  ``[N, H, W, C]`` arrays are recognised (channels are 1, 3 or 4); anything else is an error.
* channels: gray -> RGB repeats the plane; RGB -> gray uses ITU-R 601 luma; an alpha channel is
  dropped.
* size: resized (bilinear) with a logged note when the aspect ratio matches the model's within
  ``ASPECT_TOLERANCE``; otherwise an error, unless ``stretch=True``.
* range: uint8 (and integer arrays within 0..255) are scaled by 1/255; floats must lie in
  [0, 1] (floats within [0, 255] that exceed 1 are taken as 0..255 with a note); NaN/Inf and
  negative values are errors.

Every problem raises ``ImageError`` whose message names the file and what was expected.
"""
from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("dcs.clients.images")

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                  ".pgm")
ARRAY_SUFFIXES = (".npy", ".npz")
ASPECT_TOLERANCE = 0.05  # relative difference of width/height ratios still resized silently
_CHANNELS = (1, 3, 4)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImageError(ValueError):
    """An input that cannot be read or converted to the model's input spec."""


@dataclass(frozen=True)
class Source:
    """One loaded file: ``array`` as read (pillow: [H, W] or [H, W, C] uint8; numpy: as stored).

    ``labels`` are an ``.npz``'s labels, if any; ``from_image_file`` marks pillow-decoded files
    (always one image, channels last).
    """

    name: str
    array: np.ndarray
    labels: np.ndarray | None = None
    from_image_file: bool = False


@dataclass(frozen=True)
class Batch:
    """Converted images ``x`` [N, C, H, W] float32 in [0, 1]; ``names[i]`` says where image i came
    from (``file`` or ``file[j]``); ``labels`` when every source carried them; ``notes`` list each
    conversion made (also logged)."""

    x: np.ndarray
    names: tuple[str, ...]
    labels: np.ndarray | None
    notes: tuple[str, ...]


def expand_inputs(inputs: Iterable[str | Path]) -> list[Path]:
    """Files named, with directories replaced by their image/array files (sorted)."""
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file()
                           and f.suffix.lower() in IMAGE_SUFFIXES + ARRAY_SUFFIXES)
            if not files:
                raise ImageError(f"{p}: directory holds no image (.png, .jpg, ...) or array "
                                 f"(.npy, .npz) files")
            out.extend(files)
        elif p.is_file():
            out.append(p)
        elif p.exists():
            raise ImageError(f"{p}: not a regular file or directory")
        else:
            raise ImageError(f"{p}: no such file or directory")
    if not out:
        raise ImageError("no input files given")
    return out


def load_file(path: str | Path) -> Source:
    """Read one PNG/JPEG/.npy/.npz file."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(p, allow_pickle=False)
        except (ValueError, OSError, EOFError) as exc:
            raise ImageError(f"{p}: not a readable .npy array ({_short(exc)})") from None
        return Source(str(p), np.asarray(arr))
    if suffix == ".npz":
        return _load_npz(p)
    return _load_image(p)


def _load_npz(p: Path) -> Source:
    try:
        with np.load(p, allow_pickle=False) as z:
            keys = list(z.files)
            xkey = next((k for k in ("x", "images", "X") if k in keys), None)
            if xkey is None:
                if len(keys) != 1:
                    raise ImageError(f"{p}: .npz holds arrays {keys}; expected one named 'x' or "
                                     f"'images' (labels as 'y')")
                xkey = keys[0]
            ykey = next((k for k in ("y", "labels", "Y") if k in keys and k != xkey), None)
            x = np.asarray(z[xkey])
            y = np.asarray(z[ykey]) if ykey else None
    except ImageError:
        raise
    except Exception as exc:  # noqa: BLE001 - ValueError, OSError, zipfile.BadZipFile, ...
        raise ImageError(f"{p}: not a readable .npz archive ({_short(exc)})") from None
    return Source(str(p), x, labels=y)


def _load_image(p: Path) -> Source:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(p) as im:
            im.load()
            if im.mode in ("1", "L", "LA", "I;16", "I"):  # gray (alpha dropped)
                im = im.convert("L")
            elif im.mode != "F":                         # palette, RGBA, CMYK, ... -> RGB
                im = im.convert("RGB")
            arr = np.asarray(im)
    except UnidentifiedImageError:
        raise ImageError(f"{p}: not an image pillow can read; expected PNG/JPEG, .npy or "
                         f".npz") from None
    except (OSError, ValueError) as exc:
        raise ImageError(f"{p}: cannot read image ({_short(exc)})") from None
    return Source(str(p), arr, from_image_file=True)


def load_inputs(inputs: Iterable[str | Path]) -> list[Source]:
    """Expand directories and read every file."""
    return [load_file(p) for p in expand_inputs(inputs)]


# ---------------------------------------------------------------------------------------------
# Conversion


def _as_nchw(src: Source) -> np.ndarray:
    """The source as [N, C, H, W] (any dtype); raises for layouts that cannot be recognised."""
    a = src.array
    if a.size == 0:
        raise ImageError(f"{src.name}: empty array of shape {list(a.shape)}")
    if src.from_image_file:
        return (a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None])
    if a.ndim == 2:
        return a[None, None]
    if a.ndim == 3:
        first, last = a.shape[0] in _CHANNELS, a.shape[-1] in _CHANNELS
        if first:                      # [C, H, W] (also preferred when ambiguous)
            return a[None]
        if last:                       # [H, W, C]
            return a.transpose(2, 0, 1)[None]
        return a[:, None]              # [N, H, W] gray batch
    if a.ndim == 4:
        if a.shape[1] in _CHANNELS:
            return a
        if a.shape[-1] in _CHANNELS:
            return a.transpose(0, 3, 1, 2)
        raise ImageError(f"{src.name}: array of shape {list(a.shape)} has no channel axis of "
                         f"size 1, 3 or 4; expected [N, C, H, W] or [N, H, W, C]")
    raise ImageError(f"{src.name}: array of shape {list(a.shape)} (rank {a.ndim}) cannot be an "
                     f"image; expected [H, W], [C, H, W], [H, W, C] or a batch [N, C, H, W]")


def _to_unit_float(a: np.ndarray, name: str, notes: list[str]) -> np.ndarray:
    if a.dtype == np.bool_:
        return a.astype(np.float32)
    if a.dtype == np.uint8:
        return a.astype(np.float32) / 255.0
    if np.issubdtype(a.dtype, np.integer):
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ImageError(f"{name}: integer values span [{lo}, {hi}]; expected 0..255")
        return a.astype(np.float32) / 255.0
    if not np.issubdtype(a.dtype, np.floating):
        raise ImageError(f"{name}: dtype {a.dtype} is not numeric; expected uint8 or float")
    a = a.astype(np.float32)
    finite = np.isfinite(a)
    if not finite.all():
        raise ImageError(f"{name}: {int((~finite).sum())} NaN/Inf value(s); expected finite "
                         f"values in [0, 1]")
    lo, hi = float(a.min()), float(a.max())
    if lo < 0.0:
        raise ImageError(f"{name}: values span [{lo:.4g}, {hi:.4g}]; expected [0, 1] "
                         f"(or 0..255)")
    if hi > 1.0:
        if hi <= 255.0:
            _note(notes, f"{name}: float values span [{lo:.4g}, {hi:.4g}]; scaled by 1/255 to "
                         f"[0, 1]")
            return a / 255.0
        raise ImageError(f"{name}: values span [{lo:.4g}, {hi:.4g}]; expected [0, 1] "
                         f"(or 0..255)")
    return a


def _convert_channels(x: np.ndarray, want: int, name: str, notes: list[str]) -> np.ndarray:
    have = x.shape[1]
    if have == want:
        return x
    if have == 4:
        _note(notes, f"{name}: dropped the alpha channel")
        x, have = x[:, :3], 3
        if want == 3:
            return x
    if have == 1 and want == 3:
        _note(notes, f"{name}: converted gray to RGB (3 channels)")
        return np.repeat(x, 3, axis=1)
    if have == 3 and want == 1:
        _note(notes, f"{name}: converted RGB to gray (1 channel, ITU-R 601 luma)")
        return np.tensordot(x, _LUMA, axes=([1], [0]))[:, None].astype(np.float32)
    raise ImageError(f"{name}: has {have} channel(s); the model expects {want} and "
                     f"{have} -> {want} is not a known conversion")


def _resize(x: np.ndarray, h: int, w: int, name: str, notes: list[str],
            stretch: bool) -> np.ndarray:
    n, c, ih, iw = x.shape
    if (ih, iw) == (h, w):
        return x
    ratio_in, ratio_out = iw / ih, w / h
    if abs(ratio_in - ratio_out) / ratio_out > ASPECT_TOLERANCE and not stretch:
        raise ImageError(f"{name}: size {ih}x{iw} (HxW) cannot be converted to the model's "
                         f"{h}x{w} without distorting it (aspect {ratio_in:.3g} vs "
                         f"{ratio_out:.3g}); crop it to that aspect first")
    from PIL import Image

    _note(notes, f"{name}: resized from {ih}x{iw} to {h}x{w} (HxW, bilinear)")
    out = np.empty((n, c, h, w), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            plane = Image.fromarray(np.ascontiguousarray(x[i, j], dtype=np.float32), mode="F")
            out[i, j] = np.asarray(plane.resize((w, h), Image.BILINEAR), dtype=np.float32)
    return np.clip(out, 0.0, 1.0)


def convert_source(src: Source, input_shape: Sequence[int], *, stretch: bool = False,
                   notes: list[str] | None = None) -> np.ndarray:
    """One source as [N, C, H, W] float32 in [0, 1] matching ``input_shape`` ([C, H, W])."""
    notes = [] if notes is None else notes
    if len(input_shape) != 3:
        raise ImageError(f"model input shape {list(input_shape)} is not [C, H, W]")
    c, h, w = (int(v) for v in input_shape)
    x = _as_nchw(src)
    x = _to_unit_float(x, src.name, notes)
    x = _convert_channels(x, c, src.name, notes)
    x = _resize(x, h, w, src.name, notes, stretch)
    return np.ascontiguousarray(x, dtype=np.float32)


def to_model_input(sources: Sequence[Source], input_shape: Sequence[int], *,
                   stretch: bool = False) -> Batch:
    """Convert and stack every source for a model whose input is ``input_shape`` ([C, H, W])."""
    if not sources:
        raise ImageError("no images to convert")
    notes: list[str] = []
    xs, names, labels = [], [], []
    for src in sources:
        x = convert_source(src, input_shape, stretch=stretch, notes=notes)
        xs.append(x)
        if len(x) == 1 and src.array.ndim < 4:
            names.append(src.name)
        else:
            names.extend(f"{src.name}[{j}]" for j in range(len(x)))
        if src.labels is not None:
            y = np.asarray(src.labels).reshape(-1)
            if len(y) != len(x):
                raise ImageError(f"{src.name}: {len(y)} labels for {len(x)} images")
            labels.append(y.astype(np.int64))
    x = np.concatenate(xs, axis=0)
    y = np.concatenate(labels) if labels and len(labels) == len(sources) else None
    return Batch(x=x, names=tuple(names), labels=y, notes=tuple(notes))


def load_for_model(inputs: Iterable[str | Path], input_shape: Sequence[int], *,
                   stretch: bool = False) -> Batch:
    """``load_inputs`` + ``to_model_input``."""
    return to_model_input(load_inputs(inputs), input_shape, stretch=stretch)


def _note(notes: list[str], text: str) -> None:
    notes.append(text)
    log.info("%s", text)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
