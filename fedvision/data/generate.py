"""The built-in dataset: procedural, ImageNet-style images with real visual structure.

Each class is a combination of three attributes -- a shape, a fill texture and a colour -- drawn
with random pose (rotation, scale, position) over a varied background, among distractor shapes
that carry other classes' attributes, then blurred by noise and JPEG compression. Source classes
(for pretraining) and target classes (for federated fine-tuning) are disjoint combinations of the
same attribute families, so low-level features learnt on the source transfer to the target.

We draw our own images because no offline, licence-free ImageNet-like set ships with the project.
"""

from __future__ import annotations

import colorsys
import hashlib
import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from fedvision.constants import DATASET_JSON, SOURCE_CLASSES, SYNSET_MAPPING, TARGET_CLASSES
from fedvision.data.images import as_path, default_workers, map_chunks
from fedvision.errors import FedvisionError
from fedvision.paths import builtin_dataset_dir

GENERATOR_VERSION = 2

SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "ring", "diamond")
TEXTURES = ("plain", "striped", "checked", "dotted", "speckled")
# Hues 1/8 apart; the per-image hue jitter below makes neighbouring colours overlap.
COLOURS = ("red", "orange", "yellow", "green", "cyan", "blue", "purple", "pink")
_HUES = (0.0, 0.07, 0.15, 0.33, 0.5, 0.62, 0.76, 0.9)
# Fixed so that class definitions do not change with the image seed.
_CLASS_SEED = 20240611
_JPEG_QUALITY = 90
_IMAGES_PER_TASK = 50

# Difficulty knobs, tuned with scripts/central_baseline.py: a small CNN trained for 2 minutes on
# 2 CPU cores reaches about 68% on the 10 default target classes (see that script's docstring).
_HUE_JITTER = 0.05
_MAIN_SCALE = (0.26, 0.42)  # object radius as a fraction of the image side
_DISTRACTOR_SCALE = (0.14, 0.3)
_NUM_DISTRACTORS = (1, 4)
_NOISE_SIGMA = (2.0, 14.0)


@dataclass(frozen=True)
class ClassSpec:
    """One generated class: its fake WordNet id and its attribute combination."""

    wnid: str
    shape: str
    texture: str
    colour: str

    @property
    def name(self) -> str:
        """Human name, e.g. ``striped red triangle``."""
        return f"{self.texture} {self.colour} {self.shape}"


def class_specs(num_classes: int, num_source: int = 0) -> list[ClassSpec]:
    """Return the class definitions: ``num_source`` source classes, then the target classes.

    Fixed (independent of the image seed). Target classes are combinations not used by the
    source, built only from shapes, textures and colours that the source classes also use, so
    that features learnt on the source transfer.
    """
    combos = [(s, t, c) for s in SHAPES for t in TEXTURES for c in COLOURS]
    if not 2 <= num_classes <= len(combos):
        raise FedvisionError(f"num_classes must be between 2 and {len(combos)}, got {num_classes}")
    order = [combos[j] for j in np.random.default_rng(_CLASS_SEED).permutation(len(combos))]
    chosen = order[:num_source]
    seen = [{c[k] for c in chosen} for k in range(3)]
    rest = order[num_source:]
    familiar = [c for c in rest if all(c[k] in seen[k] for k in range(3))]
    # Familiar combinations first; unfamiliar ones only when too few exist (tiny source sets).
    chosen += (familiar + [c for c in rest if c not in familiar])[: num_classes - num_source]
    return [ClassSpec(f"n{90000000 + k:08d}", *combo) for k, combo in enumerate(chosen)]


def _fingerprint(params: dict) -> str:
    blob = json.dumps({"generator": GENERATOR_VERSION, **params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


# --- drawing --------------------------------------------------------------------------------------


def _polygon(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        ang, rad = np.arange(4) * np.pi / 2 + np.pi / 4, np.full(4, r)
    elif shape == "triangle":
        ang, rad = np.arange(3) * 2 * np.pi / 3, np.full(3, r * 1.1)
    elif shape == "hexagon":
        ang, rad = np.arange(6) * np.pi / 3, np.full(6, r)
    elif shape == "star":
        ang, rad = np.arange(10) * np.pi / 5, np.where(np.arange(10) % 2 == 0, r * 1.15, r * 0.5)
    elif shape == "diamond":
        ang = np.arange(4) * np.pi / 2
        rad = np.array([r * 1.2, r * 0.6, r * 1.2, r * 0.6])
    elif shape == "cross":
        a, b = r, r * 0.36  # arm half-length and half-width
        pts = np.array(
            [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]
            + [(-x, -y) for x, y in [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a)]]
        )
        ang, rad = np.arctan2(pts[:, 1], pts[:, 0]), np.hypot(pts[:, 0], pts[:, 1])
    else:
        raise ValueError(shape)
    ang = ang + rot
    return list(
        zip((cx + rad * np.cos(ang)).tolist(), (cy + rad * np.sin(ang)).tolist(), strict=True)
    )


def _shape_mask(shape: str, side: int, cx: float, cy: float, r: float, rot: float) -> np.ndarray:
    # Drawn at twice the size and reduced: antialiased edges for the price of a 2x mask.
    side, cx, cy, r = 2 * side, 2 * cx, 2 * cy, 2 * r
    mask = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(mask)
    if shape in ("circle", "ring"):
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        if shape == "ring":
            ri = r * 0.55
            draw.ellipse((cx - ri, cy - ri, cx + ri, cy + ri), fill=0)
    else:
        draw.polygon(_polygon(shape, cx, cy, r, rot), fill=255)
    return np.asarray(mask.reduce(2), dtype=np.float32) / 255.0


def _pattern(
    texture: str, rng: np.random.Generator, yy: np.ndarray, xx: np.ndarray, rot: float
) -> np.ndarray:
    """Binary fill pattern (1 = main colour) in the object's rotated frame."""
    side = yy.shape[0]
    if texture == "plain":
        return np.ones_like(yy)
    period = rng.uniform(0.09, 0.16) * side
    u = xx * np.cos(rot) + yy * np.sin(rot)
    v = -xx * np.sin(rot) + yy * np.cos(rot)
    if texture == "striped":
        return (np.floor(u / (period / 2)) % 2).astype(np.float32)
    if texture == "checked":
        return ((np.floor(u / (period / 2)) + np.floor(v / (period / 2))) % 2).astype(np.float32)
    if texture == "dotted":
        du = (u / period) - np.round(u / period)
        dv = (v / period) - np.round(v / period)
        return (np.hypot(du, dv) > 0.28).astype(np.float32)
    if texture == "speckled":
        cells = max(4, int(side / period * 1.6))
        grid = (rng.random((cells, cells)) > 0.5).astype(np.uint8) * 255
        img = Image.fromarray(grid, "L").resize((side, side), Image.Resampling.NEAREST)
        return np.asarray(img, dtype=np.float32) / 255.0
    raise ValueError(texture)


def _colour(rng: np.random.Generator, colour: str) -> np.ndarray:
    hue = (_HUES[COLOURS.index(colour)] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
    return np.array(rgb, dtype=np.float32) * 255.0


def _background(rng: np.random.Generator, side: int, yy: np.ndarray, xx: np.ndarray) -> np.ndarray:
    def random_rgb(sat_max: float) -> np.ndarray:
        rgb = colorsys.hsv_to_rgb(rng.random(), rng.uniform(0, sat_max), rng.uniform(0.2, 0.95))
        return np.array(rgb, dtype=np.float32) * 255.0

    kind = rng.integers(3)
    if kind == 0:  # linear gradient between two colours
        a, b = random_rgb(0.8), random_rgb(0.8)
        ang = rng.uniform(0, 2 * np.pi)
        t = (xx * np.cos(ang) + yy * np.sin(ang)) / side + 0.5
        t = np.clip(t, 0, 1)[..., None]
        return a * (1 - t) + b * t
    if kind == 1:  # smooth colour blobs
        low = (rng.random((4, 4, 3)) * 255).astype(np.uint8)
        img = Image.fromarray(low, "RGB").resize((side, side), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.float32) * 0.8 + 25
    # low-contrast texture from the same families as the objects
    texture = ("striped", "checked", "dotted", "speckled")[rng.integers(4)]
    pat = _pattern(texture, rng, yy, xx, rng.uniform(0, np.pi))[..., None]
    a = random_rgb(0.6)
    b = np.clip(a + rng.uniform(-60, 60, size=3), 0, 255)
    return a * pat + b * (1 - pat)


def _draw_object(
    canvas: np.ndarray,
    rng: np.random.Generator,
    spec: tuple[str, str, str],
    scale: tuple[float, float],
    yy: np.ndarray,
    xx: np.ndarray,
) -> None:
    side = canvas.shape[0]
    shape, texture, colour = spec
    r = rng.uniform(*scale) * side
    cx, cy = rng.uniform(r * 0.6, side - r * 0.6, size=2)
    rot = rng.uniform(0, 2 * np.pi)
    mask = _shape_mask(shape, side, cx, cy, r, rot)[..., None]
    main = _colour(rng, colour)
    second = main * rng.uniform(0.25, 0.5) + rng.uniform(0, 60)
    pat = _pattern(texture, rng, yy - cy, xx - cx, rot)[..., None]
    fill = main * pat + second * (1 - pat)
    # Soft directional shading so that a flat colour is not a single pixel value.
    ang = rng.uniform(0, 2 * np.pi)
    shade = 1.0 + 0.25 * ((xx - cx) * np.cos(ang) + (yy - cy) * np.sin(ang))[..., None] / max(r, 1)
    canvas *= 1 - mask
    canvas += mask * fill * np.clip(shade, 0.6, 1.3)


def render_image(
    spec: ClassSpec, others: list[ClassSpec], size: int, rng: np.random.Generator
) -> Image.Image:
    """Draw one image of class ``spec``; distractors take their attributes from ``others``."""
    side = size
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    canvas = _background(rng, side, yy, xx)
    n_dis = int(rng.integers(_NUM_DISTRACTORS[0], _NUM_DISTRACTORS[1] + 1))
    main_at = int(rng.integers(n_dis + 1))  # the class object is sometimes partly occluded
    for k in range(n_dis + 1):
        if k == main_at:
            _draw_object(canvas, rng, (spec.shape, spec.texture, spec.colour), _MAIN_SCALE, yy, xx)
        else:
            other = others[int(rng.integers(len(others)))]
            # Distractors mix attributes of other classes: no single attribute gives the class.
            mix = (
                other.shape if rng.random() < 0.7 else SHAPES[rng.integers(len(SHAPES))],
                other.texture if rng.random() < 0.7 else TEXTURES[rng.integers(len(TEXTURES))],
                other.colour if rng.random() < 0.7 else COLOURS[rng.integers(len(COLOURS))],
            )
            _draw_object(canvas, rng, mix, _DISTRACTOR_SCALE, yy, xx)
    arr = canvas + rng.normal(0.0, rng.uniform(*_NOISE_SIGMA), size=canvas.shape)
    return Image.fromarray(np.clip(arr + 0.5, 0, 255).astype(np.uint8), "RGB")


def _render_task(
    tmp_root: str, split: str, class_idx: int, start: int, stop: int, params: dict
) -> int:
    specs = class_specs(params["num_classes"], params["num_source"])
    spec = specs[class_idx]
    # Distractors come from classes of the same group (source or target), never the class itself.
    group = range(params["num_source"]) if class_idx < params["num_source"] else None
    group = group or range(params["num_source"], params["num_classes"])
    others = [specs[j] for j in group if j != class_idx] or [s for s in specs if s != spec]
    folder = Path(tmp_root) / split / spec.wnid
    split_id = 0 if split == "train" else 1
    for i in range(start, stop):
        rng = np.random.default_rng([params["seed"], split_id, class_idx, i])
        img = render_image(spec, others, params["size"], rng)
        img.save(folder / f"{spec.wnid}_{i}.JPEG", "JPEG", quality=_JPEG_QUALITY)
    return stop - start


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def generate_dataset(
    out: Path | None = None,
    *,
    num_classes: int = 30,
    num_source: int = 20,
    train_per_class: int = 300,
    val_per_class: int = 50,
    size: int = 64,
    seed: int = 0,
    workers: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Write the built-in dataset as an ImageNet-style tree and return its folder.

    Layout: ``train/<wnid>/<wnid>_<i>.JPEG``, ``val/<wnid>/<wnid>_<i>.JPEG``,
    ``LOC_synset_mapping.txt``, ``source_classes.txt`` (the first ``num_source`` classes, for
    pretraining), ``target_classes.txt`` (the rest, for federated fine-tuning) and
    ``fedvision_dataset.json`` (parameters + fingerprint, written last).

    Parameters
    ----------
    out
        Destination folder; default ``fedvision.paths.builtin_dataset_dir()``.
    num_classes, num_source, train_per_class, val_per_class, size, seed
        What to generate; the same values always give byte-identical files.
    workers
        Worker processes (default: one per CPU core; 0 or 1: in this process).
    progress
        Show a progress bar and status lines on stderr.
    overwrite
        Replace a dataset generated here with other parameters instead of refusing (a folder
        that holds no generated dataset is never deleted).

    Returns
    -------
    Path
        ``out``. An existing complete tree with the same fingerprint is reused as is.
    """
    if not 0 <= num_source < num_classes:
        raise FedvisionError(
            f"num_source must be in [0, num_classes) = [0, {num_classes}), got {num_source}"
        )
    if train_per_class < 1 or val_per_class < 1:
        raise FedvisionError("train_per_class and val_per_class must be at least 1")
    if size < 16:
        raise FedvisionError(f"size must be at least 16 pixels, got {size}")
    specs = class_specs(num_classes, num_source)
    params = {
        "num_classes": num_classes,
        "num_source": num_source,
        "train_per_class": train_per_class,
        "val_per_class": val_per_class,
        "size": size,
        "seed": seed,
    }
    fingerprint = _fingerprint(params)
    out = as_path(out) if out is not None else builtin_dataset_dir()

    existing = _read_json(out / DATASET_JSON)
    if existing is not None and existing.get("fingerprint") == fingerprint:
        if progress:
            print(f"reusing the generated dataset in {out} (same parameters)", file=sys.stderr)
        return out
    if out.exists() and any(out.iterdir()):
        if existing is None:
            # Never deleted, even with overwrite: it may be anything of the user's.
            raise FedvisionError(
                f"{out} is not empty and holds no generated dataset; choose another folder "
                "or empty it"
            )
        if not overwrite:
            raise FedvisionError(
                f"{out} was generated with other parameters ({existing.get('params')}); choose "
                "another folder, delete it, or pass overwrite=True (--overwrite)"
            )

    # Build next to the destination and rename at the end: an interrupted run leaves only
    # the temporary folder, which the next run deletes.
    tmp = out.parent / f".{out.name}.partial"
    if tmp.exists():
        shutil.rmtree(tmp)
    for split in ("train", "val"):
        for spec in specs:
            (tmp / split / spec.wnid).mkdir(parents=True, exist_ok=True)
    (tmp / SYNSET_MAPPING).write_text("".join(f"{s.wnid} {s.name}\n" for s in specs))
    (tmp / SOURCE_CLASSES).write_text("".join(f"{s.wnid}\n" for s in specs[:num_source]))
    (tmp / TARGET_CLASSES).write_text("".join(f"{s.wnid}\n" for s in specs[num_source:]))

    tasks = [
        (str(tmp), split, c, start, min(start + _IMAGES_PER_TASK, n), params)
        for split, n in (("train", train_per_class), ("val", val_per_class))
        for c in range(num_classes)
        for start in range(0, n, _IMAGES_PER_TASK)
    ]
    total = num_classes * (train_per_class + val_per_class)
    t0 = time.perf_counter()
    with tqdm(
        total=total, desc="generate", unit="img", disable=not progress, file=sys.stderr
    ) as bar:
        for _, done in map_chunks(_render_task, tasks, default_workers(workers)):
            bar.update(done)
    info = {
        "generator_version": GENERATOR_VERSION,
        "params": params,
        "fingerprint": fingerprint,
        "classes": [
            {"wnid": s.wnid, "name": s.name, "role": "source" if k < num_source else "target"}
            for k, s in enumerate(specs)
        ],
        "images": {"train": num_classes * train_per_class, "val": num_classes * val_per_class},
        "seconds": round(time.perf_counter() - t0, 2),
    }
    (tmp / DATASET_JSON).write_text(json.dumps(info, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    if progress:
        print(f"generated {total} images in {info['seconds']} s into {out}", file=sys.stderr)
    return out


def read_source_target(root: Path) -> tuple[list[str], list[str]]:
    """Return the (source, target) wnid lists of a generated dataset folder."""
    root = as_path(root)
    try:
        src = (root / SOURCE_CLASSES).read_text().split()
        tgt = (root / TARGET_CLASSES).read_text().split()
    except OSError as exc:
        raise FedvisionError(
            f"{root} has no {SOURCE_CLASSES}/{TARGET_CLASSES}; run `fedvision data generate`"
        ) from exc
    return src, tgt
