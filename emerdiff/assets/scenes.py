"""A procedural scene world with exact ground truth, for the reference model.

Every scene is a textured "stuff" background (bands of sky, water, grass,
sand, brick separated by smooth wavy boundaries) with several "thing"
instances painted on top (ball, box, tree, star, ring, cross, house), each
with its own colour, pattern, scale, rotation and aspect, overlapping so that
later objects occlude earlier ones.

Ground truth by construction: a scene is rendered with the painter's
algorithm, and every layer (a stuff region or one object) writes its pixels
and its class id through the *same* boolean mask, so a labelled pixel was
always drawn by that class. ``make_scene(..., return_layers=True)`` hands the
layers back so tests can re-composite them independently.

A scene is a pure function of its seed: the random draws make a size-free
:class:`SceneSpec` (geometry in normalised [0, 1] units, per-layer noise
seeds), and :func:`render` turns it into pixels at any size.

Two worlds share classes, captions, geometry rules and seeds: ``"textured"``
(reference v0/v1: textured stuff, patterned and shaded objects, 1-6 objects)
and ``"flat"`` (reference v2: flat-coloured stuff bands and plain objects
without pattern, shading or noise, 1-4 larger objects). The flat world exists
because v1 never learned the textured world's objects (its samples are
texture soup); object edges still cross the 8x8-pixel token cells, so
upsampling 16x16 segments still has boundaries to lose.

Seeds: training uses :func:`train_scene_seed` (5-element seed tuples tagged
with the training stream), evaluation uses :func:`heldout_scene_seeds`
(2-element tuples tagged with another stream), so held-out scenes are never
seen in training whatever the run seed or step count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

STUFF = ("sky", "water", "grass", "sand", "brick")
THINGS = ("ball", "box", "tree", "star", "ring", "cross", "house")
CLASSES: tuple[str, ...] = STUFF + THINGS  # class id = index in this tuple

PLURALS = {"ball": "balls", "box": "boxes", "tree": "trees", "star": "stars", "ring": "rings",
           "cross": "crosses", "house": "houses"}
NUMBERS = ("a", "two", "three", "four", "five", "six")
CONNECTORS = ("and", "on", "under")
# Every word a caption can contain: the tokenizer makes each one a single token.
CAPTION_WORDS: tuple[str, ...] = CLASSES + tuple(PLURALS.values()) + NUMBERS + CONNECTORS

WORLDS = ("textured", "flat")
# per world: (largest number of objects, range of object half-sizes as a fraction of the image)
_WORLD_OBJECTS = {"textured": (6, (0.08, 0.2)), "flat": (4, (0.12, 0.25))}

TRAIN_STREAM = 7001  # first entry of every training seed tuple
HELDOUT_STREAM = 9002  # first entry of every held-out seed tuple

Seed = int | Sequence[int]


# ------------------------------------------------------------------ seeds
def train_scene_seed(run_seed: int, step: int, index: int, purpose: int = 0) -> tuple[int, ...]:
    """Seed of the ``index``-th scene of training step ``step`` (pure function: resumable).

    ``purpose`` separates other draws from the training batches (1: the VAE
    scaling-factor estimate, 2: the latent pool).
    """
    return (TRAIN_STREAM, int(run_seed), int(purpose), int(step), int(index))


def heldout_scene_seeds(n: int, start: int = 0) -> list[tuple[int, int]]:
    """Seeds of held-out evaluation scenes; disjoint from every training seed."""
    return [(HELDOUT_STREAM, i) for i in range(start, start + n)]


# ------------------------------------------------------------------ specs
@dataclass
class ObjectSpec:
    """One thing instance, in normalised image coordinates (x right, y down)."""

    cls: int  # class id (index into CLASSES)
    cx: float
    cy: float
    sx: float  # half-size along the object's local u axis
    sy: float  # half-size along local v
    angle: float  # radians
    colors: np.ndarray  # (3, 3) float in [0, 1]: primary, secondary, accent
    pattern: int  # 0 plain, 1 stripes, 2 dots, 3 two-tone
    pattern_freq: float
    noise_seed: int


@dataclass
class SceneSpec:
    """Everything random about a scene; :func:`render` is deterministic given it."""

    stuff: list[int]  # stuff class per band, top to bottom
    boundaries: np.ndarray  # (n_bands - 1, 6): offset, tilt, 2 x (amplitude, frequency) ... see _band_map
    stuff_colors: np.ndarray  # (n_bands, 3)
    stuff_seeds: list[int]
    objects: list[ObjectSpec] = field(default_factory=list)
    world: str = "textured"


@dataclass
class Layer:
    """One painted layer: the pixels it covers and the colour it gives them."""

    cls: int
    mask: np.ndarray  # (H, W) bool
    rgb: np.ndarray  # (H, W, 3) float; meaningful only inside mask


@dataclass
class Scene:
    """A rendered scene: image, per-pixel class ids, caption, and provenance."""

    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int64 class ids into CLASSES
    caption: str
    counts: dict[str, int]  # visible thing instances per class name
    stuff: list[str]  # stuff classes present in the label map
    spec: SceneSpec
    layers: list[Layer] | None = None  # only with return_layers=True

    @property
    def classes_present(self) -> set[int]:
        return set(np.unique(self.labels).tolist())


# ----------------------------------------------------------- sampling
_STUFF_BASE = {  # mean colour and per-scene jitter of each stuff class
    "sky": ((0.40, 0.62, 0.92), 0.08),
    "water": ((0.10, 0.33, 0.58), 0.07),
    "grass": ((0.25, 0.55, 0.17), 0.08),
    "sand": ((0.86, 0.76, 0.52), 0.06),
    "brick": ((0.62, 0.26, 0.16), 0.07),
}


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6.0) % 6
    f = h * 6.0 - int(h * 6.0)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])


def _thing_colors(rng: np.random.Generator, name: str) -> np.ndarray:
    """Primary/secondary/accent colours; class-typical palettes with wide variation."""
    def hsv(h: float, s: float, v: float) -> np.ndarray:
        return _hsv_to_rgb(h % 1.0, float(np.clip(s, 0, 1)), float(np.clip(v, 0, 1)))

    hue = rng.random()
    if name == "tree":  # canopy in greens or autumn colours, brown trunk
        hue = rng.choice([0.28, 0.33, 0.38, 0.08, 0.12]) + rng.normal(0, 0.02)
        prim = hsv(hue, 0.7 + 0.2 * rng.random(), 0.35 + 0.35 * rng.random())
        sec = hsv(0.07 + 0.03 * rng.random(), 0.6, 0.3 + 0.15 * rng.random())
    elif name == "star":  # mostly golden, sometimes any hue
        hue = 0.13 + rng.normal(0, 0.03) if rng.random() < 0.6 else hue
        prim = hsv(hue, 0.8 + 0.2 * rng.random(), 0.85 + 0.15 * rng.random())
        sec = hsv(hue + 0.05, 0.5, 1.0)
    elif name == "house":  # pale walls, reddish/dark roof
        prim = hsv(hue, 0.15 + 0.35 * rng.random(), 0.75 + 0.25 * rng.random())
        sec = hsv(rng.choice([0.0, 0.03, 0.6]) + rng.normal(0, 0.02), 0.7, 0.35 + 0.3 * rng.random())
    elif name == "box":  # wooden crates or painted boxes
        if rng.random() < 0.5:
            hue = 0.08 + rng.normal(0, 0.02)
        prim = hsv(hue, 0.5 + 0.3 * rng.random(), 0.5 + 0.35 * rng.random())
        sec = prim * 0.6
    else:  # ball, ring, cross: any saturated hue
        prim = hsv(hue, 0.6 + 0.4 * rng.random(), 0.6 + 0.4 * rng.random())
        sec = hsv(hue + 0.5, 0.5 + 0.5 * rng.random(), 0.9)
    accent = hsv(rng.random(), 0.3 * rng.random(), 0.1 + 0.8 * rng.random())
    return np.stack([prim, sec, accent]).astype(np.float64)


def check_world(world: str) -> str:
    if world not in WORLDS:
        raise ValueError(f"unknown scene world {world!r}; choose from {list(WORLDS)}")
    return world


def sample_spec(rng: np.random.Generator, max_objects: int | None = None, world: str = "textured") -> SceneSpec:
    """Draw a size-free scene description (``max_objects`` defaults to the world's)."""
    default_max, (size_lo, size_hi) = _WORLD_OBJECTS[check_world(world)]
    max_objects = default_max if max_objects is None else max_objects
    # Background: 1-3 bands; sky (when present) is the top band.
    n_bands = int(rng.choice([1, 2, 2, 3, 3]))
    ground = [c for c in STUFF if c != "sky"]
    has_sky = n_bands > 1 and rng.random() < 0.75
    names = (["sky"] if has_sky else []) + list(rng.choice(ground, size=n_bands - has_sky, replace=False))
    stuff = [CLASSES.index(n) for n in names]
    # Band boundaries: sorted mean heights, random tilt and two sine waves each.
    heights = np.sort(rng.uniform(0.25, 0.8, size=n_bands - 1))
    if n_bands == 3 and heights[1] - heights[0] < 0.15:
        heights[1] = min(heights[0] + 0.15, 0.9)
    boundaries = np.zeros((n_bands - 1, 6))
    for k in range(n_bands - 1):
        boundaries[k] = (heights[k], rng.normal(0, 0.12),
                         rng.uniform(0.0, 0.04), rng.uniform(0.5, 3.0),
                         rng.uniform(0.0, 0.02), rng.uniform(3.0, 8.0))
    colors = []
    for n in names:
        mean, jitter = _STUFF_BASE[n]
        colors.append(np.clip(np.array(mean) + rng.normal(0, jitter, 3), 0, 1))
    spec = SceneSpec(stuff, boundaries, np.stack(colors), [int(s) for s in rng.integers(0, 2**31, n_bands)],
                     world=world)

    # Things: 1-max_objects instances of 1-3 classes (several instances of a class is common).
    n_obj = int(rng.integers(1, max_objects + 1))
    n_cls = int(min(n_obj, rng.integers(1, 4)))
    kinds = rng.choice(len(THINGS), size=n_cls, replace=False)
    for i in range(n_obj):
        name = THINGS[int(kinds[i % n_cls])]
        size = rng.uniform(size_lo, size_hi)
        aspect = np.exp(rng.normal(0, 0.12))
        upright = name in ("tree", "house")  # these keep roughly upright
        angle = rng.normal(0, 0.15) if upright else rng.uniform(0, 2 * np.pi)
        spec.objects.append(ObjectSpec(
            cls=CLASSES.index(name),
            cx=rng.uniform(0.08, 0.92), cy=rng.uniform(0.12, 0.92),
            sx=size * aspect, sy=size / aspect, angle=float(angle),
            colors=_thing_colors(rng, name),
            pattern=int(rng.integers(0, 4)) if world == "textured" else 0, pattern_freq=float(rng.uniform(2.0, 5.0)),
            noise_seed=int(rng.integers(0, 2**31)),
        ))
    return spec


# ----------------------------------------------------------- rendering
def _value_noise(rng: np.random.Generator, h: int, w: int, cells_y: int, cells_x: int) -> np.ndarray:
    """Smooth noise in [0, 1]: a random lattice, bilinearly interpolated with smoothstep weights."""
    grid = rng.random((cells_y + 1, cells_x + 1))
    fy = np.linspace(0, cells_y, h, endpoint=False)
    fx = np.linspace(0, cells_x, w, endpoint=False)
    iy, ix = fy.astype(int), fx.astype(int)
    ty, tx = fy - iy, fx - ix
    ty, tx = ty * ty * (3 - 2 * ty), tx * tx * (3 - 2 * tx)
    top = grid[iy][:, ix] * (1 - tx) + grid[iy][:, ix + 1] * tx
    bot = grid[iy + 1][:, ix] * (1 - tx) + grid[iy + 1][:, ix + 1] * tx
    return top * (1 - ty[:, None]) + bot * ty[:, None]


def _band_map(spec: SceneSpec, size: int) -> np.ndarray:
    """Index of the stuff band of each pixel (0 = top band)."""
    x = (np.arange(size) + 0.5) / size
    y = (np.arange(size) + 0.5) / size
    band = np.zeros((size, size), dtype=np.int64)
    for off, tilt, a1, f1, a2, f2 in spec.boundaries:
        curve = off + tilt * (x - 0.5) + a1 * np.sin(2 * np.pi * f1 * x + 7 * off) \
            + a2 * np.sin(2 * np.pi * f2 * x + 3 * tilt)
        band += y[:, None] > curve[None, :]
    return band


def _stuff_texture(name: str, color: np.ndarray, seed: int, size: int) -> np.ndarray:
    """Full-canvas texture of one stuff class (H, W, 3) in [0, 1]; depends only on its arguments."""
    rng = np.random.default_rng(seed)
    yy = (np.arange(size)[:, None] + 0.5) / size
    xx = (np.arange(size)[None, :] + 0.5) / size
    fine = rng.random((size, size))
    if name == "sky":  # vertical gradient towards the horizon, soft clouds
        tex = color[None, None] * (1 - 0.35 * yy[..., None]) + 0.35 * yy[..., None]
        cloud = np.clip((_value_noise(rng, size, size, 3, 5) - 0.55) * 4, 0, 1)[..., None]
        tex = tex * (1 - 0.8 * cloud) + 0.95 * 0.8 * cloud
    elif name == "water":  # horizontal waves with bright crests
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (yy * rng.uniform(14, 22) + 0.25 * np.sin(2 * np.pi * xx * 3 + phase)))
        tex = color[None, None] * (1 + 0.18 * wave[..., None]) + 0.25 * (wave > 0.9)[..., None]
    elif name == "grass":  # vertical blades: noise stretched along y, plus speckle
        blades = _value_noise(rng, size, size, 6, 48)
        tex = color[None, None] * (0.7 + 0.6 * blades[..., None]) * (0.9 + 0.2 * fine[..., None])
    elif name == "sand":  # fine speckle and diagonal ripples
        ripple = np.sin(2 * np.pi * (xx + 0.6 * yy) * rng.uniform(8, 14))
        tex = color[None, None] * (0.92 + 0.05 * ripple[..., None] + 0.14 * fine[..., None])
    elif name == "brick":  # staggered bricks with per-brick tint and light mortar
        bh, bw, mortar = 1 / 14, 1 / 7, 0.012
        row = np.floor(yy / bh).astype(int)
        shifted = xx + (row % 2) * bw / 2
        col = np.floor(shifted / bw).astype(int)
        tint = rng.normal(0, 0.06, (16, 16))[row % 16, col % 16]
        in_mortar = ((yy % bh) < mortar) | ((shifted % bw) < mortar * 0.8)
        tex = np.where(in_mortar[..., None], np.array([0.78, 0.75, 0.7]),
                       color[None, None] * (1 + tint[..., None] + 0.1 * (fine[..., None] - 0.5)))
    else:
        raise ValueError(name)
    return np.clip(np.broadcast_to(tex, (size, size, 3)), 0, 1)


def _object_frame(obj: ObjectSpec, size: int) -> tuple[slice, slice, np.ndarray, np.ndarray]:
    """Bounding-box slices and local coordinates (u, v) of an object's pixels."""
    reach = 1.45 * max(obj.sx, obj.sy)
    y0, y1 = (max(0, int((obj.cy - reach) * size)), min(size, int(np.ceil((obj.cy + reach) * size))))
    x0, x1 = (max(0, int((obj.cx - reach) * size)), min(size, int(np.ceil((obj.cx + reach) * size))))
    y = (np.arange(y0, y1)[:, None] + 0.5) / size - obj.cy
    x = (np.arange(x0, x1)[None, :] + 0.5) / size - obj.cx
    c, s = np.cos(obj.angle), np.sin(obj.angle)
    u = (x * c + y * s) / obj.sx
    v = (-x * s + y * c) / obj.sy
    return slice(y0, y1), slice(x0, x1), u, v


def _star_mask(u: np.ndarray, v: np.ndarray, inner: float = 0.45) -> np.ndarray:
    """Five-pointed star with straight edges, one tip pointing up (-v)."""
    r = np.hypot(u, v)
    sector = 2 * np.pi / 5
    a = np.arctan2(u, -v) % sector
    a = np.minimum(a, sector - a)  # fold onto [0, pi/5]: 0 is a tip, pi/5 a valley
    qx, qy = r * np.cos(a), r * np.sin(a)
    tx, ty = 1.0, 0.0
    vx, vy = inner * np.cos(sector / 2), inner * np.sin(sector / 2)
    # inside <=> q on the origin's side of the tip-valley line
    side = (vx - tx) * (qy - ty) - (vy - ty) * (qx - tx)
    origin = (vx - tx) * (0 - ty) - (vy - ty) * (0 - tx)
    return np.sign(side) == np.sign(origin)


def _object_mask_and_parts(name: str, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Shape mask and a part map (0 primary, 1 secondary, 2 accent) in local coordinates."""
    parts = np.zeros(u.shape, dtype=np.int64)
    r = np.hypot(u, v)
    if name == "ball":
        mask = r <= 1.0
    elif name == "box":
        m = np.maximum(np.abs(u), np.abs(v))
        mask = m <= 0.85
        parts[(m > 0.68) | (np.abs(u - v) < 0.12) | (np.abs(u + v) < 0.12)] = 1  # crate frame
    elif name == "tree":
        canopy = (v >= -1.0) & (v <= 0.45) & (np.abs(u) <= 0.8 * (v + 1.0) / 1.45)
        trunk = (np.abs(u) <= 0.16) & (v > 0.45) & (v <= 1.0)
        mask = canopy | trunk
        parts[trunk] = 1
    elif name == "star":
        mask = _star_mask(u, v)
    elif name == "ring":
        mask = (r <= 1.0) & (r >= 0.55)
    elif name == "cross":
        mask = ((np.abs(u) <= 0.3) & (np.abs(v) <= 0.95)) | ((np.abs(v) <= 0.3) & (np.abs(u) <= 0.95))
    elif name == "house":
        body = (np.abs(u) <= 0.7) & (v >= -0.1) & (v <= 0.9)
        roof = (v >= -0.95) & (v < -0.1) & (np.abs(u) <= 0.95 * (v + 0.95) / 0.85)
        mask = body | roof
        parts[roof] = 1
        door = (np.abs(u - 0.25) <= 0.14) & (v >= 0.45) & (v <= 0.9)
        window = (np.abs(u + 0.3) <= 0.16) & (np.abs(v - 0.3) <= 0.14)
        parts[door | window] = 2
    else:
        raise ValueError(name)
    return mask, parts


def _object_colors(obj: ObjectSpec, u: np.ndarray, v: np.ndarray, parts: np.ndarray,
                   world: str = "textured") -> np.ndarray:
    """Colour of every bbox pixel (H, W, 3): part colours, pattern, shading, noise (flat: parts only)."""
    name = CLASSES[obj.cls]
    rng = np.random.default_rng(obj.noise_seed)
    rgb = obj.colors[parts]  # (h, w, 3)
    if world == "flat":
        return np.clip(rgb, 0, 1)
    primary = parts == 0
    f = obj.pattern_freq
    if obj.pattern == 1:  # stripes along u
        rgb = np.where((primary & (np.sin(np.pi * f * u) > 0.3))[..., None], obj.colors[1] * 0.5 + rgb * 0.5, rgb)
    elif obj.pattern == 2:  # dots
        dots = (np.sin(np.pi * f * u) * np.sin(np.pi * f * v)) > 0.6
        rgb = np.where((primary & dots)[..., None], obj.colors[2], rgb)
    elif obj.pattern == 3:  # two-tone split
        rgb = np.where((primary & (v > 0.15 * np.sin(3 * u)))[..., None], rgb * 0.7, rgb)
    if name in ("ball", "ring"):  # spherical shading with a highlight towards upper left
        d = np.hypot(u + 0.35, v + 0.35)
        rgb = rgb * (1.15 - 0.45 * np.clip(d, 0, 1.3)[..., None] / 1.3)
    rgb = rgb * (0.94 + 0.12 * rng.random(u.shape)[..., None])
    return np.clip(rgb, 0, 1)


def render(spec: SceneSpec, size: int = 128, return_layers: bool = False,
           ) -> tuple[np.ndarray, np.ndarray, list[Layer] | None]:
    """Paint a spec: image (float, [0, 1]), labels, and optionally every layer.

    Each layer writes colour and class through one mask, in order, so later
    layers occlude earlier ones in image and labels alike.
    """
    image = np.zeros((size, size, 3))
    labels = np.zeros((size, size), dtype=np.int64)
    layers: list[Layer] | None = [] if return_layers else None
    band = _band_map(spec, size)
    for k, (cls, color, seed) in enumerate(zip(spec.stuff, spec.stuff_colors, spec.stuff_seeds)):
        mask = band == k
        if not mask.any():
            continue
        tex = (np.broadcast_to(np.clip(color, 0, 1), (size, size, 3)) if spec.world == "flat"
               else _stuff_texture(CLASSES[cls], color, seed, size))
        image[mask] = tex[mask]
        labels[mask] = cls
        if layers is not None:
            layers.append(Layer(cls, mask, tex))
    for obj in spec.objects:
        ys, xs, u, v = _object_frame(obj, size)
        mask, parts = _object_mask_and_parts(CLASSES[obj.cls], u, v)
        if not mask.any():
            continue
        rgb = _object_colors(obj, u, v, parts, spec.world)
        image[ys, xs][mask] = rgb[mask]
        labels[ys, xs][mask] = obj.cls
        if layers is not None:
            full_mask = np.zeros((size, size), dtype=bool)
            full_mask[ys, xs] = mask
            full_rgb = np.zeros((size, size, 3))
            full_rgb[ys, xs] = rgb
            layers.append(Layer(obj.cls, full_mask, full_rgb))
    return image, labels, layers


def _visible_areas(spec: SceneSpec, size: int) -> np.ndarray:
    """Visible pixel count of every object after occlusion by later objects."""
    owner = np.full((size, size), -1, dtype=np.int64)
    for i, obj in enumerate(spec.objects):
        ys, xs, u, v = _object_frame(obj, size)
        mask, _ = _object_mask_and_parts(CLASSES[obj.cls], u, v)
        owner[ys, xs][mask] = i
    return np.bincount(owner[owner >= 0], minlength=len(spec.objects))


def caption_for(counts: dict[str, int], stuff: Sequence[str]) -> str:
    """E.g. 'two stars and a ball on grass and water under sky'."""
    things = [f"{NUMBERS[n - 1]} {name if n == 1 else PLURALS[name]}" for name, n in counts.items() if n > 0]
    ground = [s for s in stuff if s != "sky"]
    text = " and ".join(things)
    if ground:
        text = f"{text} on {' and '.join(ground)}" if text else " and ".join(ground)
    if "sky" in stuff:
        text = f"{text} under sky" if text else "sky"
    return text


def make_scene(seed: Seed, size: int = 128, max_objects: int | None = None, min_area: float = 0.004,
               return_layers: bool = False, world: str = "textured") -> Scene:
    """Generate one scene of ``world`` ("textured" or "flat"), deterministic in ``seed`` (an int or a tuple of ints).

    Objects hidden by occlusion below ``min_area`` (fraction of the image) are
    removed, so the caption names exactly the thing classes in the label map;
    it names the stuff classes in the label map from top to bottom.
    """
    rng = np.random.default_rng(seed)
    spec = sample_spec(rng, max_objects=max_objects, world=world)
    if spec.objects:
        visible = _visible_areas(spec, size)
        keep = visible >= max(1, min_area * size * size)
        spec.objects = [o for o, k in zip(spec.objects, keep) if k]
    image, labels, layers = render(spec, size, return_layers=return_layers)
    present = set(np.unique(labels).tolist())
    counts: dict[str, int] = {}
    for name in THINGS:  # fixed class order: captions with the same content read the same
        n = sum(1 for o in spec.objects if CLASSES[o.cls] == name)
        if n:
            counts[name] = n
    stuff = [CLASSES[c] for c in dict.fromkeys(spec.stuff) if c in present]
    return Scene(
        image=np.round(image * 255).astype(np.uint8), labels=labels,
        caption=caption_for(counts, stuff), counts=counts, stuff=stuff, spec=spec, layers=layers,
    )
