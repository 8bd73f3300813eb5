"""A procedural "synthetic world": seeded multi-object scenes with exact masks, captions and references.

Used to train a tiny CLIP from scratch and to measure region-level semantics offline (no downloads). A scene
is a small RGB image (64 px by default) with 1-4 coloured shapes on a plain, gradient or noisy background; every
object comes with its exact visible mask, box, colour, shape and size name. On top of scenes the world produces
captions, referring expressions that are verified to pick out exactly one object, and composed-retrieval
triplets (a reference scene, a textual modification, the edited target scene).

Everything is a pure function of ``(seed, index)`` through ``numpy.random.default_rng([seed, index])``, so any
scene can be regenerated on demand, in any order and in any DataLoader worker.

Example::

    world = SyntheticWorld(WorldConfig(max_objects=3), seed=0)
    scene = world.scene(12)
    scene.image.shape, scene.masks().shape, scene.caption  # (64, 64, 3), (N, 64, 64), "a red circle and ..."
    world.referring_expressions(scene)  # [Referring(text="the leftmost square", target=1, kind="ordinal"), ...]
    train = SyntheticRegions(world, start=0, length=50_000)
    val = SyntheticRegions(world, start=50_000, length=1_000)  # disjoint index ranges
"""

from __future__ import annotations

import functools
import itertools
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

__all__ = [
    "BACKGROUND_KINDS",
    "COLOURS",
    "SHAPES",
    "TRIPLET_KINDS",
    "Referring",
    "Scene",
    "SceneObject",
    "SyntheticCaptions",
    "SyntheticReferring",
    "SyntheticRegions",
    "SyntheticTriplets",
    "SyntheticWorld",
    "Triplet",
    "WorldConfig",
]

#: Named colours usable for objects, distractors and backgrounds (RGB, 0-255).
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (145, 50, 190),
    "orange": (245, 130, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 110, 180),
    "brown": (130, 80, 40),
    "white": (250, 250, 250),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
    "light grey": (185, 185, 185),
    "dark grey": (70, 70, 70),
    "beige": (210, 195, 165),
    "taupe": (150, 140, 125),
    "slate": (95, 105, 120),
}

#: Shapes the world can draw (see ``_outline`` for their geometry).
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")

BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "noise")
TRIPLET_KINDS: tuple[str, ...] = ("colour", "shape", "remove", "add")

# Minimum RGB distance between two object colours, and between an object colour and any background colour
# (including blends of two palette colours, which gradients and noise produce).
MIN_COLOUR_SEPARATION = 70.0
MIN_BACKGROUND_CONTRAST = 80.0
# Per-pixel noise amplitude of "noise" backgrounds; small next to MIN_BACKGROUND_CONTRAST.
_FINE_NOISE = 6
_BACKGROUND_WORDS = {"plain": "plain", "gradient": "gradient", "noise": "noisy"}
_NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine"}
_PLACEMENT_ATTEMPTS = 40


@dataclass(frozen=True)
class WorldConfig:
    """The knobs of the synthetic world; every field has a default, so it maps 1:1 onto a YAML block.

    Args:
        image_size: side of the square images, in pixels.
        min_objects: fewest objects per scene (placement may only fail to reach it for infeasible configs).
        max_objects: most objects per scene; fewer are placed when no free spot is found.
        shapes: object shapes, a subset of ``SHAPES``.
        colours: object colours, names from ``COLOURS``; pairwise at least ``MIN_COLOUR_SEPARATION`` apart.
        size_range: ``(min, max)`` object size as a fraction of ``image_size`` (the extent of the shape before
            rotation). The size names small/medium/large are the tertiles of this range.
        occlusion: largest fraction of an object's silhouette that later (on top) objects may hide; 0 means
            objects never overlap.
        distractors: at most this many tiny unlabelled shapes per scene, painted on the background under the
            objects in ``distractor_colours``; they are not objects, not in captions and not in any mask.
        distractor_colours: colours of distractors, names from ``COLOURS``, distinct from the object colours.
        distractor_size_range: size range of distractors, fraction of ``image_size``.
        background: ``"plain"``, ``"gradient"``, ``"noise"``, or ``"mixed"`` (one of the three per scene).
        background_palette: background colours, names from ``COLOURS``; every blend of two of them stays at least
            ``MIN_BACKGROUND_CONTRAST`` from every object colour.
        colour_jitter: per-object uniform RGB jitter (+/- this many levels per channel) around the named colour.
        max_rotation: objects are rotated uniformly in +/- this many degrees (small, so shapes stay canonical).
        shape_repeat: probability that a new object re-uses the shape of an object already in the scene; repeated
            shapes are what referring expressions need ("the larger of the two squares").
        relation_margin: fraction of ``image_size`` by which box centres must differ for a spatial relation or
            an ordinal ("leftmost") to be stated; objects within the margin make the expression ambiguous.
        size_ratio: how much bigger (ratio of sizes) an object must be to be called "the larger" one.
        caption_variants: vary caption templates and object order (deterministically per scene); if False,
            captions are always "<objects> on a <background> background" in drawing order.
        triplet_kinds: edits used for composed-retrieval triplets, a subset of ``TRIPLET_KINDS``.
    """

    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    shapes: tuple[str, ...] = ("circle", "square", "triangle", "star", "hexagon", "cross")
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
    size_range: tuple[float, float] = (0.18, 0.45)
    occlusion: float = 0.0
    distractors: int = 0
    distractor_colours: tuple[str, ...] = ("white", "black")
    distractor_size_range: tuple[float, float] = (0.05, 0.09)
    background: Literal["plain", "gradient", "noise", "mixed"] = "mixed"
    background_palette: tuple[str, ...] = ("grey", "light grey", "dark grey", "beige", "taupe")
    colour_jitter: int = 10
    max_rotation: float = 15.0
    shape_repeat: float = 0.25
    relation_margin: float = 0.08
    size_ratio: float = 1.25
    caption_variants: bool = True
    triplet_kinds: tuple[str, ...] = ("colour", "shape")

    def __post_init__(self) -> None:
        # Accept lists (Python callers, YAML) but store tuples so the config stays hashable and immutable.
        for name in ("shapes", "colours", "size_range", "distractor_colours", "distractor_size_range"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "background_palette", tuple(self.background_palette))
        object.__setattr__(self, "triplet_kinds", tuple(self.triplet_kinds))
        self._validate()

    def _validate(self) -> None:
        if self.image_size < 16:
            raise ValueError(f"image_size must be at least 16 pixels, got {self.image_size}")
        if self.min_objects < 1:
            raise ValueError(f"min_objects must be at least 1, got {self.min_objects}")
        if self.min_objects > self.max_objects:
            raise ValueError(f"min_objects ({self.min_objects}) must not exceed max_objects ({self.max_objects})")
        _check_names("shapes", self.shapes, SHAPES)
        _check_names("colours", self.colours, COLOURS)
        _check_names("background_palette", self.background_palette, COLOURS)
        _check_names("distractor_colours", self.distractor_colours, COLOURS, allow_empty=self.distractors == 0)
        _check_range("size_range", self.size_range)
        _check_range("distractor_size_range", self.distractor_size_range)
        if not 0.0 <= self.occlusion < 1.0:
            raise ValueError(f"occlusion must be in [0, 1), got {self.occlusion}")
        if self.distractors < 0:
            raise ValueError(f"distractors must be >= 0, got {self.distractors}")
        if self.background not in (*BACKGROUND_KINDS, "mixed"):
            raise ValueError(f"unknown background {self.background!r}; choose from {[*BACKGROUND_KINDS, 'mixed']}")
        if not 0 <= self.colour_jitter <= 30:
            raise ValueError(f"colour_jitter must be in [0, 30] levels, got {self.colour_jitter}")
        if not 0.0 <= self.shape_repeat <= 1.0:
            raise ValueError(f"shape_repeat must be a probability in [0, 1], got {self.shape_repeat}")
        if not 0.0 <= self.relation_margin < 0.5:
            raise ValueError(f"relation_margin must be in [0, 0.5), got {self.relation_margin}")
        if self.size_ratio < 1.0:
            raise ValueError(f"size_ratio must be >= 1, got {self.size_ratio}")
        _check_names("triplet_kinds", self.triplet_kinds, TRIPLET_KINDS)
        if "colour" in self.triplet_kinds and len(self.colours) < 2:
            raise ValueError("triplet kind 'colour' needs at least two colours")
        if "shape" in self.triplet_kinds and len(self.shapes) < 2:
            raise ValueError("triplet kind 'shape' needs at least two shapes")
        for a, b in itertools.combinations(self.colours, 2):
            d = _distance(COLOURS[a], COLOURS[b])
            if d < MIN_COLOUR_SEPARATION:
                raise ValueError(
                    f"object colours {a!r} and {b!r} are too similar (RGB distance {d:.0f} < {MIN_COLOUR_SEPARATION})"
                )
        for name in (*self.colours, *self.distractor_colours):
            for a, b in itertools.combinations_with_replacement(self.background_palette, 2):
                d = _segment_distance(COLOURS[name], COLOURS[a], COLOURS[b])
                if d < MIN_BACKGROUND_CONTRAST:
                    blend = repr(a) if a == b else f"a blend of {a!r} and {b!r}"
                    raise ValueError(
                        f"background colour {blend} is too close to colour {name!r} "
                        f"(RGB distance {d:.0f} < {MIN_BACKGROUND_CONTRAST}); change background_palette"
                    )
        for a in self.distractor_colours:
            if a in self.colours:
                raise ValueError(f"distractor colour {a!r} is also an object colour; distractors must stand apart")

    def size_name(self, scale: float) -> str:
        """``"small"``, ``"medium"`` or ``"large"``: the tertile of ``size_range`` that ``scale`` falls in."""
        lo, hi = self.size_range
        t = (scale - lo) / (hi - lo) if hi > lo else 0.5
        return "small" if t < 1 / 3 else ("medium" if t < 2 / 3 else "large")


@dataclass(eq=False)
class SceneObject:
    """One object of a scene.

    Attributes:
        shape: shape name, e.g. ``"circle"``.
        colour: colour name, e.g. ``"red"``.
        size: ``"small"``, ``"medium"`` or ``"large"`` (tertiles of ``WorldConfig.size_range``).
        bbox: ``(x1, y1, x2, y2)`` in pixels of the *visible* part; ``x2``/``y2`` exclusive (width = x2 - x1).
        mask: visible pixels, bool ``[H, W]`` (the silhouette minus what later objects cover).
        area: number of visible pixels.
        silhouette: the full shape before occlusion, bool ``[H, W]`` (amodal mask).
        rgb: the exact fill colour (the named colour plus jitter).
        center: ``(x, y)`` of the shape's placement, pixels.
        scale: size as a fraction of the image side.
        angle: rotation in degrees.
    """

    shape: str
    colour: str
    size: str
    bbox: tuple[int, int, int, int]
    mask: np.ndarray
    area: int
    silhouette: np.ndarray
    rgb: tuple[int, int, int]
    center: tuple[float, float]
    scale: float
    angle: float

    @property
    def name(self) -> str:
        """Class name, ``"<colour> <shape>"``, e.g. ``"red circle"``."""
        return f"{self.colour} {self.shape}"

    @property
    def box_center(self) -> tuple[float, float]:
        """``(x, y)`` centre of the visible box, pixels: what spatial relations are judged on."""
        x1, y1, x2, y2 = self.bbox
        return (x1 + x2) / 2, (y1 + y2) / 2

    def __repr__(self) -> str:
        return f"SceneObject({self.name!r}, size={self.size!r}, bbox={self.bbox}, area={self.area})"


@dataclass(eq=False)
class Scene:
    """A rendered scene.

    Attributes:
        image: uint8 ``[H, W, 3]``.
        objects: the objects in drawing order (later ones on top).
        caption: a whole-image caption, e.g. ``"a red circle and a blue star on a gradient background"``.
        index: the scene's index in its world.
        background: ``"plain"``, ``"gradient"`` or ``"noise"``.
        backdrop: uint8 ``[H, W, 3]``, the background with distractors and without objects.
    """

    image: np.ndarray
    objects: list[SceneObject]
    caption: str
    index: int
    background: str
    backdrop: np.ndarray = field(repr=False)

    @property
    def names(self) -> list[str]:
        """Class names of the objects, in order."""
        return [o.name for o in self.objects]

    def masks(self) -> np.ndarray:
        """Visible masks, uint8 ``[N, H, W]`` with values 0/1."""
        h, w = self.image.shape[:2]
        if not self.objects:
            return np.zeros((0, h, w), np.uint8)
        return np.stack([o.mask for o in self.objects]).astype(np.uint8)

    def boxes(self) -> np.ndarray:
        """Visible boxes, float32 ``[N, 4]`` xyxy in pixels (``x2``/``y2`` exclusive)."""
        return np.asarray([o.bbox for o in self.objects], np.float32).reshape(-1, 4)

    def __repr__(self) -> str:
        return f"Scene(index={self.index}, objects={self.names}, caption={self.caption!r})"


@dataclass(frozen=True)
class Referring:
    """A referring expression that identifies exactly one object of a scene.

    Attributes:
        text: e.g. ``"the circle left of the star"``.
        target: index of the object in ``scene.objects``.
        kind: ``"category"`` ("the circle"), ``"attribute"`` ("the red circle"), ``"size"`` ("the larger of the
            two squares"), ``"ordinal"`` ("the leftmost triangle") or ``"relation"`` ("the circle above the star").
        anchor: for relations, the index of the reference object; otherwise None.
    """

    text: str
    target: int
    kind: str
    anchor: int | None = None


@dataclass(eq=False)
class Triplet:
    """A composed-retrieval triplet: ``reference`` + ``modifier`` -> ``target``.

    The target is the reference re-rendered with one edit; the backdrop and every other object are identical, so
    pixels outside ``changed_mask`` are identical in both images.

    Attributes:
        reference: the unedited scene (identical to ``world.scene(index)``).
        modifier: the edit in words, e.g. ``"make the circle green"``.
        target: the edited scene.
        kind: ``"colour"``, ``"shape"``, ``"remove"`` or ``"add"``.
        changed: index of the edited object in ``target.objects`` (-1 for a removal).
        changed_reference: index of the edited object in ``reference.objects`` (-1 for an addition).
        changed_mask: uint8 ``[H, W]``, the union of the object's visible region before and after the edit: the
            only pixels that may differ between the two images.
    """

    reference: Scene
    modifier: str
    target: Scene
    kind: str
    changed: int
    changed_reference: int
    changed_mask: np.ndarray


# --------------------------------------------------------------------------------------------------------- geometry


def _distance(a: Sequence[float], b: Sequence[float]) -> float:
    return float(np.linalg.norm(np.subtract(a, b, dtype=np.float64)))


def _segment_distance(p: Sequence[float], a: Sequence[float], b: Sequence[float]) -> float:
    """Distance from colour ``p`` to the segment of blends between ``a`` and ``b``."""
    p, a, b = (np.asarray(v, np.float64) for v in (p, a, b))
    ab = b - a
    denom = float(ab @ ab)
    t = 0.0 if denom == 0 else float(np.clip((p - a) @ ab / denom, 0.0, 1.0))
    return float(np.linalg.norm(p - (a + t * ab)))


def _check_names(what: str, names: tuple[str, ...], known: Sequence[str], allow_empty: bool = False) -> None:
    if not names and not allow_empty:
        raise ValueError(f"{what} must not be empty")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; choose from {sorted(known)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} has duplicates: {list(names)}")


def _check_range(what: str, value: tuple[float, ...]) -> None:
    if len(value) != 2 or not 0.0 < value[0] <= value[1] <= 1.0:
        raise ValueError(f"{what} must be (min, max) with 0 < min <= max <= 1, got {value}")


def _regular(n: int, radius: float, start_deg: float) -> list[tuple[float, float]]:
    t = [math.radians(start_deg + 360.0 / n * k) for k in range(n)]
    return [(radius * math.cos(a), radius * math.sin(a)) for a in t]


def _unit_outlines() -> dict[str, list[tuple[float, float]]]:
    """Each shape as polygon vertices ``(x, y)`` (y down) centred on 0 with extent ~1 before rotation."""
    star = [
        (x * (1.0 if k % 2 == 0 else 0.45), y * (1.0 if k % 2 == 0 else 0.45))
        for k, (x, y) in enumerate(_regular(10, 0.5, -90.0))
    ]
    w = 1 / 6  # half the arm width of the cross: arms one third of its extent wide
    quarter = [(-w, -0.5), (w, -0.5), (w, -w), (0.5, -w), (0.5, w), (w, w)]  # a plus sign, clockwise from the top
    triangle = _regular(3, 1 / math.sqrt(3), -90.0)
    dy = -(min(y for _, y in triangle) + max(y for _, y in triangle)) / 2  # centre its box, not its centroid
    outlines = {
        "circle": _regular(24, 0.5, 0.0),
        "square": [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)],
        "triangle": [(x, y + dy) for x, y in triangle],
        "star": star,
        "hexagon": _regular(6, 0.5, 0.0),
        "cross": quarter + [(-x, -y) for x, y in quarter],
    }
    assert set(outlines) == set(SHAPES)
    return outlines


_OUTLINES = _unit_outlines()

# A rasterised shape: its bool mask on the smallest canvas around it, and that canvas's offset (x0, y0).
_Stamp = tuple[np.ndarray, int, int]


def _outline(shape: str, diameter: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of ``shape`` with extent ``diameter`` pixels, rotated by ``angle`` degrees, around 0."""
    t = math.radians(angle)
    c, s = math.cos(t) * diameter, math.sin(t) * diameter
    # Plain floats: these polygons have 4-24 vertices, far too few for numpy to pay off.
    return [(x * c - y * s, x * s + y * c) for x, y in _OUTLINES[shape]]


def _stamp(vertices: Sequence[tuple[float, float]], center: tuple[float, float], size: int) -> _Stamp:
    """Fill the polygon ``vertices + center`` (no anti-aliasing: exact masks) on a canvas just around it.

    The canvas has an integer offset, so the pixels are those of a full-size canvas, at a fraction of the cost.
    """
    cx, cy = center
    xs, ys = [x + cx for x, _ in vertices], [y + cy for _, y in vertices]
    x0, y0 = max(0, math.floor(min(xs))), max(0, math.floor(min(ys)))
    x1, y1 = min(size, math.ceil(max(xs)) + 1), min(size, math.ceil(max(ys)) + 1)
    if x1 <= x0 or y1 <= y0:
        return np.zeros((0, 0), bool), 0, 0
    canvas = Image.new("1", (x1 - x0, y1 - y0), 0)
    ImageDraw.Draw(canvas).polygon([(x - x0, y - y0) for x, y in zip(xs, ys, strict=True)], fill=1)
    return np.asarray(canvas), x0, y0


def _paste(stamp: _Stamp, size: int) -> np.ndarray:
    """The stamp as a full bool ``[size, size]`` mask."""
    crop, x0, y0 = stamp
    mask = np.zeros((size, size), bool)
    mask[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]] = crop
    return mask


def _rasterize(vertices: Sequence[tuple[float, float]], center: tuple[float, float], size: int) -> np.ndarray:
    """Fill the polygon ``vertices + center`` into a bool ``[size, size]`` mask."""
    return _paste(_stamp(vertices, center, size), size)


@functools.cache
def _upsampler(cells: int, size: int) -> np.ndarray:
    """Bilinear interpolation matrix ``[size, cells]``: ``U @ grid @ U.T`` upsamples a ``[cells, cells]`` grid."""
    pos = np.linspace(0, cells - 1, size)
    left = np.minimum(pos.astype(int), cells - 2)
    frac = pos - left
    up = np.zeros((size, cells), np.float32)
    up[np.arange(size), left] = 1 - frac
    up[np.arange(size), left + 1] = frac
    return up


def _dilate(mask: np.ndarray) -> np.ndarray:
    """Grow a bool mask by one pixel (4-neighbourhood)."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out[:, 1:] |= mask[:, :-1]
    out[:, :-1] |= mask[:, 1:]
    return out


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


# Scalar draws through ``Generator.random()``: several times cheaper than ``choice``/``integers``/``uniform`` for
# single values, which matters with thousands of draws per second.
def _uniform(rng: np.random.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * rng.random()


def _randint(rng: np.random.Generator, lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi]`` (inclusive)."""
    return min(hi, lo + int(rng.random() * (hi - lo + 1)))


def _pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    return items[_randint(rng, 0, len(items) - 1)]


def _plural(noun: str) -> str:
    return noun + ("es" if noun.endswith(("s", "x", "ch", "sh")) else "s")


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# ---------------------------------------------------------------------------------------------------------- objects


@dataclass(frozen=True)
class _Spec:
    """What is needed to (re-)draw an object."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    center: tuple[float, float]
    scale: float
    angle: float


class SyntheticWorld:
    """A seeded generator of multi-object scenes, referring expressions and composed-retrieval triplets.

    Args:
        config: the world's knobs; ``WorldConfig()`` when None.
        seed: the world's seed. Scene ``i`` depends only on ``(seed, i)`` and the config.
    """

    def __init__(self, config: WorldConfig | None = None, seed: int = 0) -> None:
        self.config = config if config is not None else WorldConfig()
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.seed = int(seed)
        self._class_names = sorted(f"{c} {s}" for c in self.config.colours for s in self.config.shapes)
        self._class_index = {name: i for i, name in enumerate(self._class_names)}
        size = self.config.image_size
        self._palette = np.asarray([COLOURS[c] for c in self.config.background_palette], np.float32)
        self._grid = np.mgrid[0:size, 0:size][::-1].astype(np.float32)  # (x, y) coordinates, [2, H, W]

    def __repr__(self) -> str:
        return f"SyntheticWorld(seed={self.seed}, config={self.config})"

    # ------------------------------------------------------------------------------------------------ classes

    @property
    def class_names(self) -> list[str]:
        """All ``"<colour> <shape>"`` combinations, sorted; the label of a name is its position here."""
        return list(self._class_names)

    def class_index(self, name: str) -> int:
        """Label of a class name such as ``"red circle"``."""
        try:
            return self._class_index[name]
        except KeyError:
            raise KeyError(f"unknown class {name!r}; this world has {self._class_names}") from None

    def labels(self, scene: Scene) -> np.ndarray:
        """Labels of ``scene.objects``, int64 ``[N]``."""
        return np.asarray([self._class_index[o.name] for o in scene.objects], np.int64)

    # ------------------------------------------------------------------------------------------------ scenes

    def _rng(self, index: int, *stream: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"scene index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, int(index), *stream])

    def scene(self, index: int) -> Scene:
        """Render scene ``index``; a pure function of ``(seed, index)``.

        Args:
            index: non-negative scene index.

        Returns:
            The scene: image uint8 ``[H, W, 3]``, objects with visible masks ``[H, W]``, caption.
        """
        cfg = self.config
        rng = self._rng(index)
        background = cfg.background if cfg.background != "mixed" else _pick(rng, BACKGROUND_KINDS)
        backdrop = self._backdrop(background, rng)
        specs: list[_Spec] = []
        silhouettes: list[np.ndarray] = []
        count = _randint(rng, cfg.min_objects, cfg.max_objects)
        for i in range(count):
            shape = _pick(rng, specs).shape if specs and rng.random() < cfg.shape_repeat else _pick(rng, cfg.shapes)
            colour = _pick(rng, cfg.colours)
            placed = self._place(shape, colour, silhouettes, rng, must=i < cfg.min_objects)
            if placed is None:
                break  # the canvas is full: keep the objects placed so far
            specs.append(placed[0])
            silhouettes.append(placed[1])
        image, objects = self._compose(backdrop, specs, silhouettes)
        caption = self._caption(objects, background, rng)
        return Scene(image, objects, caption, int(index), background, backdrop)

    def _backdrop(self, kind: str, rng: np.random.Generator) -> np.ndarray:
        """Background uint8 ``[H, W, 3]`` of ``kind`` with distractors painted on it."""
        cfg, size = self.config, self.config.image_size
        palette = self._palette
        first = _randint(rng, 0, len(palette) - 1)
        if kind == "plain":
            image = np.empty((size, size, 3), np.uint8)
            image[:] = palette[first]
        else:
            # Two distinct palette colours (the same one twice only for a one-colour palette).
            second = (first + 1 + _randint(rng, 0, len(palette) - 2)) % len(palette) if len(palette) > 1 else first
            a, b = palette[first], palette[second]
            if kind == "gradient":
                theta = _uniform(rng, 0, 2 * math.pi)
                c, s = math.cos(theta), math.sin(theta)
                lo = min(0.0, c * (size - 1)) + min(0.0, s * (size - 1))  # the projection's extremes are corners
                t = (self._grid[0] * c + self._grid[1] * s - lo) / (abs(c) + abs(s)) / (size - 1)
            else:  # low-frequency blobs between two palette colours, plus a little per-pixel grain
                cells = _randint(rng, 3, 6)
                up = _upsampler(cells, size)
                t = up @ rng.random((cells, cells), dtype=np.float32) @ up.T
            blend = np.empty((size, size, 3), np.float32)
            grain = (rng.random((size, size), dtype=np.float32) - 0.5) * (2 * _FINE_NOISE) if kind == "noise" else 0.0
            for c in range(3):  # per channel: numpy broadcasting over a trailing axis of 3 is several times slower
                blend[..., c] = a[c] + (b[c] - a[c]) * t + grain
            image = np.clip(blend + 0.5, 0, 255).astype(np.uint8)
        if cfg.distractors:
            for _ in range(_randint(rng, 0, cfg.distractors)):
                shape = _pick(rng, cfg.shapes)
                diameter = _uniform(rng, *cfg.distractor_size_range) * size
                vertices = _outline(shape, diameter, _uniform(rng, -cfg.max_rotation, cfg.max_rotation))
                center = self._sample_center(vertices, rng)
                image[_rasterize(vertices, center, size)] = COLOURS[_pick(rng, cfg.distractor_colours)]
        return image

    def _sample_center(self, vertices: Sequence[tuple[float, float]], rng: np.random.Generator) -> tuple[float, float]:
        """A centre that keeps the whole polygon inside the image."""
        last = self.config.image_size - 1
        xs, ys = [x for x, _ in vertices], [y for _, y in vertices]
        lo_x, lo_y, hi_x, hi_y = -min(xs), -min(ys), last - max(xs), last - max(ys)
        # Shapes wider than the image (size_range up to 1) get centred.
        if hi_x < lo_x:
            lo_x = hi_x = (lo_x + hi_x) / 2
        if hi_y < lo_y:
            lo_y = hi_y = (lo_y + hi_y) / 2
        return _uniform(rng, lo_x, hi_x), _uniform(rng, lo_y, hi_y)

    def _jitter(self, colour: str, rng: np.random.Generator) -> tuple[int, int, int]:
        j = self.config.colour_jitter
        r, g, b = (min(255, max(0, c + _randint(rng, -j, j))) for c in COLOURS[colour])
        return r, g, b

    def _place(
        self, shape: str, colour: str, silhouettes: list[np.ndarray], rng: np.random.Generator, must: bool
    ) -> tuple[_Spec, np.ndarray] | None:
        """Find a spot for a new top-most object by rejection sampling, shrinking it when the canvas is crowded.

        Returns None when nothing fits and the object is optional (``must`` False).
        """
        cfg, size = self.config, self.config.image_size
        fits = _Fits(silhouettes, cfg.occlusion)
        lo, hi = cfg.size_range
        scale = _uniform(rng, lo, hi)
        attempts = _PLACEMENT_ATTEMPTS * (4 if must else 1)
        for attempt in range(attempts):
            if attempt and attempt % 10 == 0:
                scale = max(lo, scale * 0.85)
            angle = _uniform(rng, -cfg.max_rotation, cfg.max_rotation)
            vertices = _outline(shape, scale * size, angle)
            center = self._sample_center(vertices, rng)
            if not fits.probe(center, 0.12 * scale * size):
                continue
            stamp = _stamp(vertices, center, size)
            if fits(stamp) and stamp[0].any():
                return _Spec(shape, colour, self._jitter(colour, rng), center, scale, angle), _paste(stamp, size)
        if must:
            raise RuntimeError(
                f"could not place {cfg.min_objects} objects of size >= {lo} without exceeding occlusion "
                f"{cfg.occlusion}; lower min_objects or size_range, or allow more occlusion"
            )
        return None

    def _compose(
        self, backdrop: np.ndarray, specs: Sequence[_Spec], silhouettes: Sequence[np.ndarray]
    ) -> tuple[np.ndarray, list[SceneObject]]:
        """Paint objects in order over ``backdrop``; visible masks are the silhouettes minus later objects."""
        # A label map (0 = backdrop, k = object k - 1) resolves occlusion once and gives every visible mask.
        label = np.zeros(backdrop.shape[:2], np.intp)
        for k, sil in enumerate(silhouettes, 1):
            label[sil] = k
        table = np.asarray([(0, 0, 0), *(spec.rgb for spec in specs)], np.uint8)
        image = backdrop.copy()
        front = label > 0
        image[front] = table[label[front]]
        objects = []
        for k, (spec, sil) in enumerate(zip(specs, silhouettes, strict=True), 1):
            visible = label == k
            objects.append(
                SceneObject(
                    shape=spec.shape,
                    colour=spec.colour,
                    size=self.config.size_name(spec.scale),
                    bbox=_bbox(visible),
                    mask=visible,
                    area=int(np.count_nonzero(visible)),
                    silhouette=sil,
                    rgb=spec.rgb,
                    center=spec.center,
                    scale=spec.scale,
                    angle=spec.angle,
                )
            )
        return image, objects

    def _caption(self, objects: Sequence[SceneObject], background: str, rng: np.random.Generator) -> str:
        counts = Counter(o.name for o in objects)
        names = list(counts)  # first-appearance (drawing) order
        templates = ["{} on a {} background"]
        if self.config.caption_variants:
            names = [names[i] for i in rng.permutation(len(names))]
            templates += [
                "a picture of {} on a {} background",
                "an image with {} on a {} background",
                "{} in front of a {} background",
            ]
        phrases = [
            _article(n) if counts[n] == 1 else f"{_NUMBERS.get(counts[n], counts[n])} {_plural(n)}" for n in names
        ]
        listed = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        template = _pick(rng, templates) if len(templates) > 1 else templates[0]
        return template.format(listed or "nothing", _BACKGROUND_WORDS[background])

    # ------------------------------------------------------------------------------------- referring expressions

    def referring_expressions(self, scene: Scene, ambiguous_only: bool = True) -> list[Referring]:
        """Expressions that each identify exactly one object of ``scene`` (checked against every object).

        Descriptions are built from a *head* (``"circle"`` or ``"red circle"``) plus, when the head matches several
        objects, a size comparison, an ordinal or a spatial relation to a uniquely named anchor object. Relations
        and ordinals use visible-box centres and need a gap of ``relation_margin`` (others must not satisfy the
        relation at all); sizes need a ratio of ``size_ratio`` and a visible-area order that agrees.

        Args:
            scene: a scene of this world.
            ambiguous_only: if True, only objects whose bare shape ("the circle") is ambiguous, i.e. expressions
                that need attributes or relations; if False, also ``"category"`` expressions and attribute
                expressions of objects with a unique shape.

        Returns:
            Unique expressions, ordered by target; none for scenes without repeated shapes when ``ambiguous_only``.
        """
        objs = scene.objects
        n = len(objs)
        margin = self.config.relation_margin * self.config.image_size
        centers = np.asarray([o.box_center for o in objs], np.float64).reshape(-1, 2)
        by_shape = {s: [i for i in range(n) if objs[i].shape == s] for s in {o.shape for o in objs}}
        by_name = {m: [i for i in range(n) if objs[i].name == m] for m in {o.name for o in objs}}

        def simple_name(i: int) -> str | None:
            """The shortest unique description of object ``i`` without relations (anchors use it)."""
            if len(by_shape[objs[i].shape]) == 1:
                return f"the {objs[i].shape}"
            if len(by_name[objs[i].name]) == 1:
                return f"the {objs[i].name}"
            return None

        out: list[Referring] = []
        for i, obj in enumerate(objs):
            shape_unique = len(by_shape[obj.shape]) == 1
            if ambiguous_only and shape_unique:
                continue
            if shape_unique:
                out.append(Referring(f"the {obj.shape}", i, "category"))
            if len(by_name[obj.name]) == 1:
                out.append(Referring(f"the {obj.name}", i, "attribute"))
            heads = [(obj.shape, by_shape[obj.shape]), (obj.name, by_name[obj.name])]
            seen = {r.text for r in out}
            for head, group in heads:
                if len(group) < 2 or (head == obj.name and group == by_shape[obj.shape]):
                    continue  # unique already, or the colour would add nothing to the bare shape
                others = [j for j in group if j != i]
                for ref in self._size_expressions(objs, head, group, i, others):
                    if ref.text not in seen:
                        out.append(ref)
                        seen.add(ref.text)
                for ref in _ordinal_expressions(centers, head, i, others, margin):
                    if ref.text not in seen:
                        out.append(ref)
                        seen.add(ref.text)
                for a in range(n):
                    anchor = simple_name(a)
                    if a in group or anchor is None:
                        continue
                    for ref in _relation_expressions(centers, head, i, others, a, anchor, margin):
                        if ref.text not in seen:
                            out.append(ref)
                            seen.add(ref.text)
        return out

    def _size_expressions(
        self, objs: Sequence[SceneObject], head: str, group: Sequence[int], i: int, others: Sequence[int]
    ) -> list[Referring]:
        ratio = self.config.size_ratio
        me = objs[i]
        larger = all(me.scale >= ratio * objs[j].scale and me.area > objs[j].area for j in others)
        smaller = all(objs[j].scale >= ratio * me.scale and objs[j].area > me.area for j in others)
        if not (larger or smaller):
            return []
        if len(group) == 2:
            word = "larger" if larger else "smaller"
            return [Referring(f"the {word} of the two {_plural(head)}", i, "size")]
        word = "largest" if larger else "smallest"
        return [Referring(f"the {word} {head}", i, "size")]

    # ------------------------------------------------------------------------------------------------ triplets

    def triplet(self, index: int) -> Triplet:
        """A composed-retrieval triplet built on scene ``index``; a pure function of ``(seed, index)``.

        The edit kind is drawn from ``config.triplet_kinds`` (falling back to the others when it does not apply,
        e.g. no free spot to add an object); the edited object is named in the modifier by a unique referring
        expression of the reference scene.

        Args:
            index: non-negative scene index; ``triplet(i).reference`` equals ``scene(i)``.

        Returns:
            The triplet; outside ``changed_mask`` the two images are identical.
        """
        reference = self.scene(index)
        rng = self._rng(index, 1)  # a separate stream: the reference stays exactly scene(index)
        kinds = list(self.config.triplet_kinds)
        kinds = [kinds[k] for k in rng.permutation(len(kinds))]
        for kind in [*kinds, *(k for k in ("colour", "add") if k not in kinds)]:
            built = self._edit(reference, kind, rng)
            if built is not None:
                return built
        raise RuntimeError(f"scene {index} admits no edit (no uniquely nameable object); this should not happen")

    def _edit(self, ref: Scene, kind: str, rng: np.random.Generator) -> Triplet | None:
        cfg = self.config
        specs = [_Spec(o.shape, o.colour, o.rgb, o.center, o.scale, o.angle) for o in ref.objects]
        sils = [o.silhouette for o in ref.objects]
        names = self._unique_names(ref)
        candidates = [i for i in rng.permutation(len(specs)) if i in names]
        if kind == "add":
            if len(specs) >= cfg.max_objects:
                return None
            shape, colour = _pick(rng, cfg.shapes), _pick(rng, cfg.colours)
            placed = self._place(shape, colour, sils, rng, must=False)
            if placed is None:
                return None
            modifier = _pick(rng, ["add {}", "put {} in the picture", "also show {}"]).format(
                _article(f"{colour} {shape}")
            )
            return self._finish(ref, [*specs, placed[0]], [*sils, placed[1]], modifier, kind, len(specs), -1, rng)
        for i in candidates:
            i = int(i)
            name, old = names[i], specs[i]
            if kind == "colour":
                if len(cfg.colours) < 2:
                    return None
                colour = _pick(rng, [c for c in cfg.colours if c != old.colour])
                new = replace(old, colour=colour, rgb=self._jitter(colour, rng))
                templates = ["make {} {}", "change the colour of {} to {}", "turn {} {}", "paint {} {}"]
                modifier = _pick(rng, templates).format(name, colour)
                specs[i] = new
                return self._finish(ref, specs, sils, modifier, kind, i, i, rng)
            if kind == "shape":
                for shape in rng.permutation([s for s in cfg.shapes if s != old.shape]):
                    shape = str(shape)
                    sil = _rasterize(_outline(shape, old.scale * cfg.image_size, old.angle), old.center, cfg.image_size)
                    new_sils = [*sils[:i], sil, *sils[i + 1 :]]
                    if not _valid(new_sils, cfg.occlusion):
                        continue  # the new shape collides with a neighbour
                    modifier = _pick(rng, ["replace {} with {}", "change {} into {}", "swap {} for {}"]).format(
                        name, _article(f"{old.colour} {shape}")
                    )
                    specs[i] = replace(old, shape=shape)
                    return self._finish(ref, specs, new_sils, modifier, kind, i, i, rng)
            if kind == "remove" and len(specs) >= 2:
                modifier = _pick(rng, ["remove {}", "take away {}", "delete {}"]).format(name)
                kept = [k for k in range(len(specs)) if k != i]
                return self._finish(ref, [specs[k] for k in kept], [sils[k] for k in kept], modifier, kind, -1, i, rng)
        return None

    def _unique_names(self, scene: Scene) -> dict[int, str]:
        """The simplest unique referring expression of every object that has one (category < attribute < ...)."""
        order = {"category": 0, "attribute": 1, "ordinal": 2, "size": 3, "relation": 4}
        names: dict[int, tuple[int, str]] = {}
        for ref in self.referring_expressions(scene, ambiguous_only=False):
            rank = order[ref.kind]
            if ref.target not in names or rank < names[ref.target][0]:
                names[ref.target] = (rank, ref.text)
        return {i: text for i, (_, text) in names.items()}

    def _finish(
        self,
        ref: Scene,
        specs: list[_Spec],
        sils: list[np.ndarray],
        modifier: str,
        kind: str,
        changed: int,
        changed_reference: int,
        rng: np.random.Generator,
    ) -> Triplet:
        image, objects = self._compose(ref.backdrop, specs, sils)
        target = Scene(
            image, objects, self._caption(objects, ref.background, rng), ref.index, ref.background, ref.backdrop
        )
        h, w = image.shape[:2]
        mask = np.zeros((h, w), bool)
        if changed_reference >= 0:
            mask |= ref.objects[changed_reference].mask
        if changed >= 0:
            mask |= objects[changed].mask
        return Triplet(ref, modifier, target, kind, changed, changed_reference, mask.astype(np.uint8))


def _covers(silhouettes: Sequence[np.ndarray]) -> list[np.ndarray]:
    """For each silhouette, the union of the silhouettes drawn after it (what may hide it)."""
    covers: list[np.ndarray] = []
    above: np.ndarray | None = None
    for sil in reversed(silhouettes):
        covers.append(np.zeros_like(sil) if above is None else above.copy())
        above = sil.copy() if above is None else above | sil
    return covers[::-1]


class _Fits:
    """Whether a new top-most shape keeps every object below within the occlusion bound.

    With ``occlusion == 0`` objects must also keep a one-pixel gap, so that touching objects of one colour never
    merge into one blob. Candidates are stamps, checked only on their own canvas: placement tries many.
    """

    def __init__(self, silhouettes: Sequence[np.ndarray], limit: float) -> None:
        self.limit = limit
        if limit == 0:
            self.blocked = _dilate(np.logical_or.reduce(silhouettes)) if len(silhouettes) else None
        else:
            covers = _covers(silhouettes)
            # What is still visible of each object, and how much more of it may be hidden.
            self.exposed = [sil & ~cover for sil, cover in zip(silhouettes, covers, strict=True)]
            self.budget = [
                limit * np.count_nonzero(sil) - np.count_nonzero(sil & cover)
                for sil, cover in zip(silhouettes, covers, strict=True)
            ]

    def probe(self, center: tuple[float, float], radius: float) -> bool:
        """A quick pre-check without drawing: False if the core of a shape at ``center`` already collides.

        Every shape contains the disc of radius ``0.14 * diameter`` around its centre; probing the centre and four
        points of a slightly smaller circle rejects most hopeless candidates for a few array look-ups.
        """
        if self.limit != 0 or self.blocked is None:
            return True
        last = self.blocked.shape[0] - 1
        cx, cy = center
        for dx, dy in ((0.0, 0.0), (radius, 0.0), (-radius, 0.0), (0.0, radius), (0.0, -radius)):
            x, y = min(last, max(0, round(cx + dx))), min(last, max(0, round(cy + dy)))
            if self.blocked[y, x]:
                return False
        return True

    def __call__(self, stamp: _Stamp) -> bool:
        crop, x0, y0 = stamp
        region = np.s_[y0 : y0 + crop.shape[0], x0 : x0 + crop.shape[1]]
        if self.limit == 0:
            return self.blocked is None or not np.any(self.blocked[region] & crop)
        return all(
            np.count_nonzero(exposed[region] & crop) <= budget
            for exposed, budget in zip(self.exposed, self.budget, strict=True)
        )


def _valid(silhouettes: Sequence[np.ndarray], limit: float) -> bool:
    """Whether a whole stack of silhouettes respects the occlusion bound (and the gap rule when ``limit == 0``)."""
    return all(_Fits(silhouettes[:k], limit)((silhouettes[k], 0, 0)) for k in range(1, len(silhouettes)))


# ((word, axis, sign)): a positive ``sign * (anchor - target)`` along ``axis`` means the relation holds.
_RELATIONS = (("left of", 0, 1.0), ("right of", 0, -1.0), ("above", 1, 1.0), ("below", 1, -1.0))
_ORDINALS = (("leftmost", 0, 1.0), ("rightmost", 0, -1.0), ("topmost", 1, 1.0), ("bottommost", 1, -1.0))


def _ordinal_expressions(
    centers: np.ndarray, head: str, i: int, others: Sequence[int], margin: float
) -> list[Referring]:
    out = []
    for word, axis, sign in _ORDINALS:
        # ``i`` is the most extreme along the direction, ahead of every other member by the margin.
        if all(sign * (centers[j, axis] - centers[i, axis]) >= margin for j in others):
            out.append(Referring(f"the {word} {head}", i, "ordinal"))
    return out


def _relation_expressions(
    centers: np.ndarray, head: str, i: int, others: Sequence[int], a: int, anchor: str, margin: float
) -> list[Referring]:
    out = []
    for word, axis, sign in _RELATIONS:
        offset = sign * (centers[a, axis] - centers[:, axis])
        # The target clearly satisfies the relation; no other member satisfies it even loosely.
        if offset[i] >= margin and all(offset[j] <= 0 for j in others):
            out.append(Referring(f"the {head} {word} {anchor}", i, "relation", anchor=a))
    return out


# ---------------------------------------------------------------------------------------------------- datasets


class _SceneRange(Dataset):
    """Scenes ``start .. start + length - 1`` of a world; disjoint ranges give disjoint splits."""

    def __init__(self, world: SyntheticWorld, start: int = 0, length: int = 1000) -> None:
        if start < 0 or length < 1:
            raise ValueError(f"need start >= 0 and length >= 1, got start={start}, length={length}")
        self.world, self.start, self.length = world, int(start), int(length)

    def __len__(self) -> int:
        return self.length

    def _index(self, i: int) -> int:
        if not -self.length <= i < self.length:
            raise IndexError(f"index {i} out of range for {type(self).__name__} of length {self.length}")
        return self.start + (i % self.length)

    def _image_id(self, index: int) -> str:
        return f"synthetic-s{self.world.seed}-{index:08d}"


def region_sample(world: SyntheticWorld, scene: Scene, image_id: str) -> dict[str, Any]:
    """The raw region sample of a scene (the schema of the shared data modules, see ``SyntheticRegions``)."""
    return {
        "image": scene.image,
        "masks": scene.masks(),
        "boxes": scene.boxes(),
        "labels": world.labels(scene),
        "texts": scene.names,
        "caption": scene.caption,
        "image_id": image_id,
    }


class SyntheticRegions(_SceneRange):
    """Scenes with all their regions, for region-level training and evaluation.

    Items are dicts of numpy arrays (no normalisation; transforms are applied elsewhere): ``image`` uint8
    ``[H, W, 3]``, ``masks`` uint8 ``[N, H, W]``, ``boxes`` float32 ``[N, 4]`` (xyxy pixels), ``labels`` int64
    ``[N]`` (``world.class_index``), ``texts`` (N class names), ``caption``, ``image_id``. N varies per image.

    Args:
        world: the synthetic world.
        start: first scene index.
        length: number of scenes.
    """

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self._index(i)
        return region_sample(self.world, self.world.scene(index), self._image_id(index))


class SyntheticCaptions(_SceneRange):
    """Image-caption pairs for contrastive training, optionally with one region and its class name.

    Items: ``image`` uint8 ``[H, W, 3]``, ``caption``, ``image_id``; with ``region=True`` also ``mask`` uint8
    ``[H, W]``, ``box`` float32 ``[4]``, ``label`` int64 and ``text`` (the class name) of one object, drawn
    deterministically from ``(seed, index)``.

    Args:
        world: the synthetic world.
        start: first scene index.
        length: number of scenes.
        region: also return one region with its class name (region-text training).
    """

    def __init__(self, world: SyntheticWorld, start: int = 0, length: int = 1000, region: bool = False) -> None:
        super().__init__(world, start, length)
        self.region = region

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self._index(i)
        scene = self.world.scene(index)
        item: dict[str, Any] = {"image": scene.image, "caption": scene.caption, "image_id": self._image_id(index)}
        if self.region:
            k = int(self.world._rng(index, 2).integers(len(scene.objects)))
            obj = scene.objects[k]
            item.update(
                mask=obj.mask.astype(np.uint8),
                box=np.asarray(obj.bbox, np.float32),
                label=np.int64(self.world.class_index(obj.name)),
                text=obj.name,
            )
        return item


class SyntheticReferring(_SceneRange):
    """Referring-expression grounding: one (scene, expression) pair per item.

    All expressions of scenes ``start .. start + length - 1`` are enumerated once at construction (this renders
    every scene of the range once), so ``len(dataset)`` is the number of expressions, not ``length``; scenes
    without expressions contribute nothing.

    Items: ``image`` uint8 ``[H, W, 3]``, ``text``, ``kind``, ``target`` (index into the candidates), ``mask``
    uint8 ``[H, W]`` and ``box`` float32 ``[4]`` of the target, ``masks`` uint8 ``[N, H, W]`` and ``boxes``
    float32 ``[N, 4]`` of all objects (the candidates), ``image_id``.

    Args:
        world: the synthetic world.
        start: first scene index.
        length: number of scenes scanned.
        ambiguous_only: see ``SyntheticWorld.referring_expressions``.
    """

    def __init__(self, world: SyntheticWorld, start: int = 0, length: int = 1000, ambiguous_only: bool = True) -> None:
        super().__init__(world, start, length)
        self.ambiguous_only = ambiguous_only
        self.pairs: list[tuple[int, int]] = []
        for index in range(self.start, self.start + self.length):
            refs = world.referring_expressions(world.scene(index), ambiguous_only)
            self.pairs.extend((index, k) for k in range(len(refs)))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        index, k = self.pairs[i]
        scene = self.world.scene(index)
        ref = self.world.referring_expressions(scene, self.ambiguous_only)[k]
        target = scene.objects[ref.target]
        return {
            "image": scene.image,
            "text": ref.text,
            "kind": ref.kind,
            "target": ref.target,
            "mask": target.mask.astype(np.uint8),
            "box": np.asarray(target.bbox, np.float32),
            "masks": scene.masks(),
            "boxes": scene.boxes(),
            "image_id": self._image_id(index),
        }


class SyntheticTriplets(_SceneRange):
    """Composed-retrieval triplets (reference image + modifier -> target image).

    Items: ``reference`` and ``target`` uint8 ``[H, W, 3]``, ``modifier``, ``kind``, ``changed_mask`` uint8
    ``[H, W]``, ``reference_caption``, ``target_caption``, ``image_id`` (of the reference scene).

    Args:
        world: the synthetic world.
        start: first scene index.
        length: number of triplets.
    """

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = self._index(i)
        t = self.world.triplet(index)
        return {
            "reference": t.reference.image,
            "modifier": t.modifier,
            "target": t.target.image,
            "kind": t.kind,
            "changed_mask": t.changed_mask,
            "reference_caption": t.reference.caption,
            "target_caption": t.target.caption,
            "image_id": self._image_id(index),
        }
