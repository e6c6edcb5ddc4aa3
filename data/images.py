"""Image-file datasets: a folder of class folders, and the LISA traffic-sign annotation layout."""
from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np

from dcs.data.base import DataError, stratified_split

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".gif"}
TEST_FRACTION = 0.2


def _load_image(path: Path, size: tuple[int, int], mode: str, box: tuple[int, int, int, int] | None = None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert(mode)
            if box is not None:
                img = img.crop(box)
            img = img.resize((size[1], size[0]), Image.BILINEAR)
            arr = np.asarray(img, np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"{path}: cannot read image ({exc})") from exc
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def _class_images(root: Path) -> dict[str, list[Path]]:
    classes = {}
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
        if files:
            classes[d.name] = files
    return classes


def _image_mode(files: list[Path]) -> str:
    """'L' when every image is single-channel, else 'RGB'."""
    from PIL import Image

    for f in files:
        try:
            with Image.open(f) as img:
                if img.mode not in ("L", "1", "I", "I;16", "F"):
                    return "RGB"
        except OSError as exc:
            raise DataError(f"{f}: cannot read image ({exc})") from exc
    return "L"


def load_folder(root: str | Path, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """``root/<class>/*.png``: classes in sorted folder order. If ``root/train`` and ``root/test``
    exist they are the split; otherwise a deterministic stratified 80/20 split (seed 0).
    Grayscale if every image is, else RGB; resized to image_size x image_size."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: folder dataset not found")
    size = (image_size, image_size)
    if (root / "train").is_dir() and (root / "test").is_dir():
        tr, te = _class_images(root / "train"), _class_images(root / "test")
        names = tuple(sorted(set(tr) | set(te)))
        if not tr:
            raise DataError(f"{root / 'train'}: no class folders with images")
        mode = _image_mode([f for fs in (*tr.values(), *te.values()) for f in fs])

        def read(split: dict[str, list[Path]]) -> tuple[np.ndarray, np.ndarray]:
            items = [(f, names.index(c)) for c, fs in split.items() for f in fs]
            c_in = 1 if mode == "L" else 3
            x = np.stack([_load_image(f, size, mode) for f, _ in items]) if items else np.zeros((0, c_in, *size), np.float32)
            return x, np.array([k for _, k in items], np.int64)

        return (*read(tr), *read(te), names)
    classes = _class_images(root)
    if not classes:
        raise DataError(f"{root}: no class folders with images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    names = tuple(classes)
    files = [f for fs in classes.values() for f in fs]
    mode = _image_mode(files)
    x = np.stack([_load_image(f, size, mode) for f in files])
    y = np.array([k for k, fs in enumerate(classes.values()) for _ in fs], np.int64)
    tr, te = stratified_split(y, TEST_FRACTION)
    return x[tr], y[tr], x[te], y[te], names


LISA_COLUMNS = ("Filename", "Annotation tag", "Upper left corner X", "Upper left corner Y",
                "Lower right corner X", "Lower right corner Y")


def _find_csv(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise DataError(f"{path}: LISA annotation CSV or folder not found")
    default = path / "allAnnotations.csv"
    if default.is_file():
        return default
    csvs = sorted(path.glob("*.csv"))
    if len(csvs) != 1:
        raise DataError(f"{path}: expected allAnnotations.csv or exactly one *.csv, found {len(csvs)}")
    return csvs[0]


def load_lisa(path: str | Path, top_n: int, image_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, tuple[str, ...]]:
    """LISA layout: a ';'-separated annotation CSV (columns ``LISA_COLUMNS``; file names relative
    to the CSV's folder). Each box is cropped, resized to image_size² RGB; the top_n tags by count
    are kept (ties broken by name), class order = descending count. Deterministic stratified 80/20 split."""
    csv_path = _find_csv(Path(path))
    try:
        with open(csv_path, newline="") as fh:
            sample = fh.read(4096)
            fh.seek(0)
            delim = ";" if sample.count(";") >= sample.count(",") else ","
            reader = csv.DictReader(fh, delimiter=delim)
            missing = [c for c in LISA_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DataError(f"{csv_path}: missing columns {missing}")
            rows = list(reader)
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read ({exc})") from exc
    if not rows:
        raise DataError(f"{csv_path}: no annotations")
    counts = Counter(r["Annotation tag"] for r in rows)
    names = tuple(t for t, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_n])
    xs, ys = [], []
    for r in rows:
        tag = r["Annotation tag"]
        if tag not in names:
            continue
        try:
            box = tuple(int(float(r[c])) for c in LISA_COLUMNS[2:])
        except ValueError as exc:
            raise DataError(f"{csv_path}: bad box in row for {r['Filename']} ({exc})") from exc
        x0, y0, x1, y1 = box
        if x1 <= x0 or y1 <= y0:
            raise DataError(f"{csv_path}: empty box {box} for {r['Filename']}")
        xs.append(_load_image(csv_path.parent / r["Filename"], (image_size, image_size), "RGB",
                              (x0, y0, x1 + 1, y1 + 1)))
        ys.append(names.index(tag))
    x, y = np.stack(xs), np.array(ys, np.int64)
    tr, te = stratified_split(y, TEST_FRACTION)
    return x[tr], y[tr], x[te], y[te], names
