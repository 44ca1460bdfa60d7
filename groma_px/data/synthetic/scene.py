"""Synthetic scenes: sampling coloured shapes on muted textures, and rendering images + exact masks.

A scene is a pure description (sizes, background kind, texture seed, objects in z-order with their
geometry); :func:`render_scene` turns it into pixels. Every object is rasterised once, without
anti-aliasing, by :func:`rasterize`, and the same boolean mask both paints the image and defines
the annotation, so a visible mask is exactly the pixels the object painted that no later object
covered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "hexagon", "cross", "diamond")
#: Saturated object colours, far from the muted backgrounds and from each other (RGB).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 55, 195),
    "orange": (250, 135, 25),
}
#: Nominal size classes: the object's radius (half its extent) as a fraction of min(H, W). The
#: ranges do not overlap, so "small" and "large" are well defined whatever the occlusion.
SIZES: dict[str, tuple[float, float]] = {
    "small": (0.06, 0.09),
    "medium": (0.12, 0.16),
    "large": (0.20, 0.25),
}
BACKGROUNDS = ("noise", "gradient", "stripes", "checker", "blobs")
IMAGE_SIZE_RANGE = (128, 320)
NUM_OBJECTS_RANGE = (1, 8)
#: Placements that leave any object less visible than this are rejected.
MIN_VISIBLE_FRACTION = 0.6
#: Uniform integer noise in [-PIXEL_NOISE, PIXEL_NOISE] added to every channel of the final image.
PIXEL_NOISE = 4
#: A new object copies the shape (colour) of an earlier one with this probability, so scenes have
#: same-kind distractors that referring expressions must tell apart.
DISTRACTOR_PROB = 0.3
MAX_PLACEMENT_TRIES = 20


@dataclass(frozen=True)
class ObjectSpec:
    """What the sampler decides about one object: attributes and geometry (pixels, floats)."""

    shape: str
    color: str
    size: str
    center_x: float
    center_y: float
    radius: float  # the shape lies inside the disc of this radius around the centre


@dataclass(frozen=True)
class SceneObject:
    """One object of a composed scene, with what rendering determines about it."""

    spec: ObjectSpec
    box: tuple[int, int, int, int]  # visible mask's tight box, absolute xyxy, pixel edges
    visible_fraction: float  # visible pixels / pixels of the unoccluded shape

    @property
    def shape(self) -> str:
        return self.spec.shape

    @property
    def color(self) -> str:
        return self.spec.color

    @property
    def size(self) -> str:
        return self.spec.size


@dataclass(frozen=True)
class Scene:
    """A full scene: objects in z-order (index 0 is painted first, i.e. lies at the bottom)."""

    height: int
    width: int
    background: str
    texture_seed: int
    objects: tuple[SceneObject, ...]


def _shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a polygonal shape centred on (cx, cy) inside the disc of radius ``r``."""
    if shape == "square":
        h = 0.8 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.65 * r, cy), (cx, cy + r), (cx - 0.65 * r, cy)]
    if shape == "cross":
        a, w = r * 0.95, r * 0.33
        return [
            (cx - w, cy - a),
            (cx + w, cy - a),
            (cx + w, cy - w),
            (cx + a, cy - w),
            (cx + a, cy + w),
            (cx + w, cy + w),
            (cx + w, cy + a),
            (cx - w, cy + a),
            (cx - w, cy + w),
            (cx - a, cy + w),
            (cx - a, cy - w),
            (cx - w, cy - w),
        ]
    if shape == "triangle":
        angles, radii = np.deg2rad([-90.0, 30.0, 150.0]), np.full(3, r)
        cy = cy + 0.2 * r  # the centroid sits low in the disc; centre the triangle's height
    elif shape == "hexagon":
        angles, radii = np.deg2rad(np.arange(6) * 60.0), np.full(6, r)
    elif shape == "star":
        angles = np.deg2rad(np.arange(10) * 36.0 - 90.0)
        radii = np.where(np.arange(10) % 2 == 0, r, 0.45 * r)
    else:
        raise ValueError(f"unknown polygon shape {shape!r}; known: {SHAPES}")
    return [
        (cx + float(d * np.cos(a)), cy + float(d * np.sin(a)))
        for a, d in zip(angles, radii, strict=True)
    ]


def rasterize(spec: ObjectSpec, height: int, width: int) -> np.ndarray:
    """Rasterises one object without anti-aliasing.

    Args:
        spec: The object.
        height: Image height in pixels.
        width: Image width in pixels.

    Returns:
        (H, W) bool mask of the pixels the unoccluded object covers.
    """
    # Draw into a local window (integer offset, so the rasterisation is translation-exact).
    x0 = max(0, int(np.floor(spec.center_x - spec.radius)) - 1)
    y0 = max(0, int(np.floor(spec.center_y - spec.radius)) - 1)
    x1 = min(width, int(np.ceil(spec.center_x + spec.radius)) + 2)
    y1 = min(height, int(np.ceil(spec.center_y + spec.radius)) + 2)
    canvas = Image.new("L", (x1 - x0, y1 - y0), 0)
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = spec.center_x - x0, spec.center_y - y0, spec.radius
    if spec.shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=1)
    else:
        draw.polygon(_shape_polygon(spec.shape, cx, cy, r), fill=1)
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = np.asarray(canvas, dtype=np.uint8) > 0
    return mask


def _label_map(masks: Sequence[np.ndarray], height: int, width: int) -> np.ndarray:
    """(H, W) int map of the top-most object index at each pixel, -1 for background."""
    labels = np.full((height, width), -1, dtype=np.int16)
    for i, mask in enumerate(masks):
        labels[mask] = i
    return labels


def _visible_counts(labels: np.ndarray, num_objects: int) -> np.ndarray:
    """(N,) number of visible pixels of each object in a label map."""
    return np.bincount(labels[labels >= 0].ravel(), minlength=num_objects)[:num_objects]


def tight_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight box of a non-empty (H, W) bool mask: absolute xyxy, pixel edges (x_max + 1 etc.)."""
    cols, rows = np.flatnonzero(mask.any(axis=0)), np.flatnonzero(mask.any(axis=1))
    if cols.size == 0:
        raise ValueError("tight_box of an empty mask")
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


def compose_scene(
    height: int,
    width: int,
    specs: Sequence[ObjectSpec],
    *,
    background: str = "gradient",
    texture_seed: int = 0,
) -> Scene:
    """Builds a scene from objects in z-order, computing visible boxes and fractions.

    Args:
        height: Image height in pixels.
        width: Image width in pixels.
        specs: Objects, bottom first. Each must be at least partly visible.
        background: One of ``BACKGROUNDS``. Defaults to "gradient".
        texture_seed: Seed of the background texture and pixel noise. Defaults to 0.

    Returns:
        The scene.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; known: {BACKGROUNDS}")
    full = [rasterize(s, height, width) for s in specs]
    labels = _label_map(full, height, width)
    objects = []
    for i, (spec, mask) in enumerate(zip(specs, full, strict=True)):
        visible = labels == i
        if not visible.any():
            raise ValueError(f"object {i} ({spec}) is fully covered or outside the image")
        objects.append(SceneObject(spec, tight_box(visible), float(visible.sum() / mask.sum())))
    return Scene(height, width, background, texture_seed, tuple(objects))


def _sample_spec(
    rng: np.random.Generator, height: int, width: int, placed: Sequence[ObjectSpec]
) -> ObjectSpec:
    """Samples attributes (with same-kind distractors) and a position fully inside the image."""
    shape = str(rng.choice(SHAPES))
    color = str(rng.choice(list(COLORS)))
    if placed and rng.random() < DISTRACTOR_PROB:
        shape = placed[int(rng.integers(len(placed)))].shape
    if placed and rng.random() < DISTRACTOR_PROB:
        color = placed[int(rng.integers(len(placed)))].color
    size = str(rng.choice(list(SIZES)))
    low, high = SIZES[size]
    radius = float(rng.uniform(low, high)) * min(height, width)
    # One pixel of margin on each side keeps even the rounded rasterisation inside the image.
    cx = float(rng.uniform(radius + 1.0, width - radius - 2.0))
    cy = float(rng.uniform(radius + 1.0, height - radius - 2.0))
    return ObjectSpec(shape, color, size, round(cx, 2), round(cy, 2), round(radius, 2))


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation of a (H, W) bool mask."""
    rows = mask.copy()
    rows[1:] |= mask[:-1]
    rows[:-1] |= mask[1:]
    out = rows.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _touches_same_color(
    mask: np.ndarray, labels: np.ndarray, specs: Sequence[ObjectSpec], color: str
) -> bool:
    """Whether ``mask`` overlaps or 8-touches a visible object of the same colour.

    Two such objects would merge into one blob whose split no pixel shows, so masks and boxes
    could not be inferred from the image.
    """
    same = np.array([s.color == color for s in specs] + [False])  # index -1: background
    return bool(same[labels[_dilate(mask)]].any())


def sample_scene(rng: np.random.Generator) -> Scene:
    """Samples a random scene: size, background, and 1-8 objects with bounded occlusion.

    Objects are placed one by one on top of the previous ones; a placement is rejected when it
    leaves any object (itself included) less than ``MIN_VISIBLE_FRACTION`` visible, or when it
    overlaps or touches a visible object of the same colour. After
    ``MAX_PLACEMENT_TRIES`` rejections for one object the scene keeps the objects placed so far.

    Args:
        rng: The image's random stream; the scene depends on nothing else.

    Returns:
        The scene, with ``H, W`` drawn independently from ``IMAGE_SIZE_RANGE``.
    """
    height = int(rng.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1))
    width = int(rng.integers(IMAGE_SIZE_RANGE[0], IMAGE_SIZE_RANGE[1] + 1))
    background = str(rng.choice(BACKGROUNDS))
    texture_seed = int(rng.integers(2**63 - 1))
    num_objects = int(rng.integers(NUM_OBJECTS_RANGE[0], NUM_OBJECTS_RANGE[1] + 1))
    specs: list[ObjectSpec] = []
    labels = np.full((height, width), -1, dtype=np.int16)
    areas: list[int] = []
    for _ in range(num_objects):
        for _ in range(MAX_PLACEMENT_TRIES):
            spec = _sample_spec(rng, height, width, specs)
            mask = rasterize(spec, height, width)
            if _touches_same_color(mask, labels, specs, spec.color):
                continue
            candidate = labels.copy()
            candidate[mask] = len(specs)
            visible = _visible_counts(candidate, len(specs) + 1)
            full_areas = np.array([*areas, int(mask.sum())])
            if np.all(visible >= MIN_VISIBLE_FRACTION * full_areas):
                specs.append(spec)
                areas.append(int(full_areas[-1]))
                labels = candidate
                break
        else:
            break
    return compose_scene(height, width, specs, background=background, texture_seed=texture_seed)


def _muted_color(rng: np.random.Generator) -> np.ndarray:
    """A low-saturation RGB colour: a grey level plus a small tint, float (3,)."""
    return rng.uniform(70.0, 190.0) + rng.uniform(-15.0, 15.0, size=3)


def _render_background(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Muted background texture of one kind, float (H, W, 3) in roughly [40, 230]."""
    base = _muted_color(rng)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == "noise":
        return base + rng.normal(0.0, 14.0, size=(height, width, 1))
    if kind == "gradient":
        other = _muted_color(rng)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        t = xs * np.cos(angle) + ys * np.sin(angle)
        t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
        return base + t[..., None] * (other - base)
    if kind in ("stripes", "checker"):
        other = base + rng.choice([-1.0, 1.0]) * rng.uniform(20.0, 40.0)
        period = float(rng.integers(6, 21))
        if kind == "stripes":
            angle = np.deg2rad(rng.choice([0.0, 45.0, 90.0, 135.0]))
            parity = np.floor((xs * np.cos(angle) + ys * np.sin(angle)) / period) % 2
        else:
            parity = (np.floor(xs / period) + np.floor(ys / period)) % 2
        return np.where(parity[..., None] > 0, other, base)
    if kind == "blobs":
        grid_h, grid_w = int(rng.integers(3, 7)), int(rng.integers(3, 7))
        grid = base + rng.normal(0.0, 25.0, size=(grid_h, grid_w, 1))
        grid = grid + rng.uniform(-8.0, 8.0, size=(grid_h, grid_w, 3))
        small = Image.fromarray(np.clip(grid, 0, 255).astype(np.uint8))
        return np.asarray(small.resize((width, height), Image.Resampling.BICUBIC), np.float32)
    raise ValueError(f"unknown background {kind!r}; known: {BACKGROUNDS}")


def render_scene(scene: Scene) -> tuple[np.ndarray, list[np.ndarray]]:
    """Renders a scene deterministically (texture and noise come from ``scene.texture_seed``).

    Args:
        scene: The scene.

    Returns:
        ``(image, masks)``: uint8 image (H, W, 3) and, per object in scene order, its exact
        visible mask, bool (H, W). Visible masks are pairwise disjoint; every pixel of object
        ``i``'s mask has colour ``COLORS[color]`` up to ``PIXEL_NOISE`` per channel.
    """
    rng = np.random.default_rng(scene.texture_seed)
    h, w = scene.height, scene.width
    canvas = np.clip(_render_background(scene.background, h, w, rng), 0.0, 255.0)
    canvas = canvas.astype(np.int16)
    full = [rasterize(obj.spec, h, w) for obj in scene.objects]
    for obj, mask in zip(scene.objects, full, strict=True):
        canvas[mask] = COLORS[obj.color]
    canvas += rng.integers(-PIXEL_NOISE, PIXEL_NOISE + 1, size=canvas.shape, dtype=np.int16)
    image = np.clip(canvas, 0, 255).astype(np.uint8)
    labels = _label_map(full, h, w)
    return image, [labels == i for i in range(len(full))]
