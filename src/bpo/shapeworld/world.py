"""ShapeWorld: scenes of coloured shapes on a grid, their images, captions, questions and priors.

Ground truth is exact: a scene *is* its list of objects. Two samplers share the renderer and the
caption writer:

- `sample_scene` draws shapes independently (the unbiased image data the model is aligned on and
  evaluated on); some objects are faint, and every image carries fixed pixel noise, so the eye is
  sometimes unsure;
- `sample_text_scene` draws shapes with a strong co-occurrence prior (a shape's partner comes along
  with probability `prior_strength`) and a colour prior; only text is made from it: the corpus the
  language model is pretrained on. This is the language prior BPO has to overcome.

Partners look unalike (circle-cross, square-ring, triangle-bar, diamond-frame), so a partner named
in place of a real shape is the prior speaking, not a visual confusion. Captions list objects in a
fixed shape order with partners adjacent ("a red circle, a purple cross and a blue ring."), so
after each object the model chooses "which shape next, if any", where the prior competes with
the image. Some corpus texts also carry the scene as a grid description, one word per cell with
some cells unknown (`grid_description`): the LM learns to read a scene from its context and to fill
what it cannot read from its prior, as a real LLM does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from bpo.data.vocab import ObjectVocabulary, extract_objects

# Partners sit next to each other in this (caption) order, and each pair joins two shapes that
# look unalike, so a partner named in place of a real shape is the prior speaking, not the eye.
SHAPES: tuple[str, ...] = (
    "circle",
    "cross",
    "square",
    "ring",
    "triangle",
    "bar",
    "diamond",
    "frame",
)
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "white")
# Text-prior partners: in the text corpus each shape nearly always appears with its partner.
PARTNERS: dict[str, str] = {
    "circle": "cross",
    "cross": "circle",
    "square": "ring",
    "ring": "square",
    "triangle": "bar",
    "bar": "triangle",
    "diamond": "frame",
    "frame": "diamond",
}
# The colour a shape usually has in text (a weaker, attribute-level prior).
TYPICAL_COLOUR: dict[str, str] = {
    "circle": "red",
    "cross": "purple",
    "square": "blue",
    "ring": "white",
    "triangle": "green",
    "bar": "red",
    "diamond": "yellow",
    "frame": "green",
}
RGB: dict[str, tuple[float, float, float]] = {
    "red": (0.92, 0.16, 0.14),
    "green": (0.18, 0.80, 0.22),
    "blue": (0.20, 0.36, 0.96),
    "yellow": (0.96, 0.88, 0.16),
    "purple": (0.68, 0.22, 0.86),
    "white": (0.96, 0.96, 0.96),
}
BACKGROUND = (0.30, 0.30, 0.30)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
CAPTION_PROMPTS = (
    "Describe the image.",
    "What is in the image?",
    "List the shapes in the image.",
)


@dataclass(frozen=True)
class ShapeObject:
    """One object: a shape of a colour in grid cell (row, col), drawn with opacity `alpha`."""

    shape: str
    colour: str
    row: int = 0
    col: int = 0
    alpha: float = 1.0


@dataclass(frozen=True)
class Scene:
    """A scene: its objects in caption (shape) order, plus the grid size and a per-image seed."""

    objects: tuple[ShapeObject, ...]
    grid: int = 4
    seed: int = 0

    @property
    def shapes(self) -> set[str]:
        """The ground-truth object categories (what CHAIR compares mentions against)."""
        return {o.shape for o in self.objects}


@dataclass
class WorldConfig:
    """How scenes are drawn and rendered."""

    grid: int = 4
    cell_size: int = 8  # image side = grid * cell_size; the tiny tower's patch is one cell
    min_objects: int = 1
    max_objects: int = 3
    # Share of objects drawn faint (low contrast): visual ambiguity where the prior can decide.
    faint_prob: float = 0.5
    faint_alpha: tuple[float, float] = (0.25, 0.45)
    solid_alpha: tuple[float, float] = (0.8, 1.0)
    # Fixed per-image pixel noise (std on the 0..1 scale), part of the image, not augmentation.
    pixel_noise: float = 0.12
    # Clutter: with this probability an empty cell of the image holds a faint, shapeless speckle
    # that no caption mentions. It is where a model that cannot tell falls back on its prior.
    clutter_prob: float = 0.0
    # Out-of-focus objects: present and mentioned, but blurred until their shape is hard to tell.
    blur_prob: float = 0.0
    blur_sigma: tuple[float, float] = (1.2, 2.0)
    clutter_alpha: tuple[float, float] = (0.3, 0.6)
    prior_strength: float = 0.99  # P(partner in text | shape in text)
    colour_prior: float = 0.6  # P(typical colour in text)
    shapes: tuple[str, ...] = SHAPES
    colours: tuple[str, ...] = COLOURS
    partners: dict[str, str] = field(default_factory=lambda: dict(PARTNERS))

    @property
    def image_size(self) -> int:
        return self.grid * self.cell_size


def check_world(cfg: WorldConfig) -> None:
    """Raise ValueError naming the `world.` setting that cannot draw or render scenes (numpy's
    own errors, minutes in, name no setting)."""
    for name in ("grid", "cell_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"world.{name} must be at least 1, got {getattr(cfg, name)}")
    if not cfg.shapes or not cfg.colours or len(set(cfg.shapes)) != len(cfg.shapes):
        raise ValueError(
            f"world.shapes {cfg.shapes} and world.colours {cfg.colours} must be non-empty, and "
            "the shapes distinct"
        )
    room = min(len(cfg.shapes), cfg.grid * cfg.grid)  # a scene has distinct shapes, one per cell
    if cfg.max_objects > room:
        raise ValueError(
            f"world.max_objects {cfg.max_objects} is more than the {len(cfg.shapes)} shapes (or "
            f"the {cfg.grid * cfg.grid} cells) a scene can hold"
        )
    if not 0 <= cfg.min_objects <= cfg.max_objects:
        raise ValueError(
            f"world.min_objects {cfg.min_objects} must be in [0, max_objects {cfg.max_objects}]"
        )
    for name in ("faint_prob", "clutter_prob", "blur_prob", "prior_strength", "colour_prior"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise ValueError(f"world.{name} must be in [0, 1], got {getattr(cfg, name)}")
    for name in ("faint_alpha", "solid_alpha", "clutter_alpha"):
        low, high = getattr(cfg, name)
        if not 0 <= low <= high <= 1:
            raise ValueError(f"world.{name} must be (low, high) with 0 <= low <= high <= 1")
    if cfg.pixel_noise < 0 or min(cfg.blur_sigma) < 0:
        raise ValueError("world.pixel_noise and world.blur_sigma must be >= 0")


def _ordered(objects: list[ShapeObject], shapes: tuple[str, ...]) -> tuple[ShapeObject, ...]:
    """Objects in the fixed caption order (by shape, then position)."""
    return tuple(sorted(objects, key=lambda o: (shapes.index(o.shape), o.row, o.col)))


def _place(rng: np.random.Generator, shapes: list[str], colours: list[str], cfg: WorldConfig):
    cells = rng.choice(cfg.grid * cfg.grid, size=len(shapes), replace=False)
    objects = []
    for shape, colour, cell in zip(shapes, colours, cells, strict=True):
        faint = rng.random() < cfg.faint_prob
        low, high = cfg.faint_alpha if faint else cfg.solid_alpha
        alpha = round(float(rng.uniform(low, high)), 3)
        row, col = int(cell) // cfg.grid, int(cell) % cfg.grid
        objects.append(ShapeObject(shape, colour, row, col, alpha))
    return _ordered(objects, cfg.shapes)


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """An unbiased scene: distinct shapes and colours drawn independently and uniformly."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    shapes = [cfg.shapes[i] for i in rng.choice(len(cfg.shapes), size=n, replace=False)]
    colours = [cfg.colours[i] for i in rng.integers(0, len(cfg.colours), size=n)]
    return Scene(_place(rng, shapes, colours, cfg), cfg.grid, int(rng.integers(2**31)))


def sample_text_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """A scene as the text corpus describes the world: partners together, typical colours."""
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    shapes: list[str] = []
    while len(shapes) < n:
        remaining = [s for s in cfg.shapes if s not in shapes]
        shape = remaining[int(rng.integers(len(remaining)))]
        shapes.append(shape)
        partner = cfg.partners.get(shape)
        room = len(shapes) < cfg.max_objects
        if partner and partner not in shapes and room and rng.random() < cfg.prior_strength:
            shapes.append(partner)
    colours = [
        typical_colour(s, cfg)
        if rng.random() < cfg.colour_prior
        else cfg.colours[int(rng.integers(len(cfg.colours)))]
        for s in shapes
    ]
    # Positions matter only for the grid descriptions some corpus texts carry; no opacity in text.
    cells = rng.choice(cfg.grid * cfg.grid, size=len(shapes), replace=False)
    objects = [
        ShapeObject(s, c, int(cell) // cfg.grid, int(cell) % cfg.grid)
        for s, c, cell in zip(shapes, colours, cells, strict=True)
    ]
    return Scene(_ordered(objects, cfg.shapes), cfg.grid, 0)


EMPTY_CELL = "[empty]"
UNKNOWN_CELL = "[?]"


def cell_word(colour: str, shape: str) -> str:
    """The single-token word a grid description uses for one object, e.g. '[red circle]'."""
    return f"[{colour} {shape}]"


def grid_vocabulary(cfg: WorldConfig) -> list[str]:
    """Every word of grid descriptions: one per colour x shape, plus empty and unknown cells."""
    return [EMPTY_CELL, UNKNOWN_CELL] + [cell_word(c, s) for s in cfg.shapes for c in cfg.colours]


def grid_description(scene: Scene, rng: np.random.Generator, unknown_prob: float) -> str:
    """The scene cell by cell in row-major order, each object shown as unknown with a probability.

    This is how the text corpus gives the LM the skill of reading a scene from its context (the
    16 words line up with the 16 image tokens the projector will emit), and of filling in what
    the context leaves unknown from what it knows about the world: its prior.
    """
    words = [EMPTY_CELL] * (scene.grid * scene.grid)
    for obj in scene.objects:
        unknown = rng.random() < unknown_prob
        words[obj.row * scene.grid + obj.col] = (
            UNKNOWN_CELL if unknown else cell_word(obj.colour, obj.shape)
        )
    return "".join(words)


def typical_colour(shape: str, cfg: WorldConfig) -> str:
    """The colour the text corpus prefers for `shape` (one of the world's colours)."""
    colour = TYPICAL_COLOUR.get(shape)
    return (
        colour if colour in cfg.colours else cfg.colours[cfg.shapes.index(shape) % len(cfg.colours)]
    )


def caption(scene: Scene) -> str:
    """The gold caption: every object, in shape order, e.g. 'a red circle and a blue square.'"""
    phrases = [f"a {o.colour} {o.shape}" for o in scene.objects]
    if not phrases:
        return "nothing."
    if len(phrases) == 1:
        return phrases[0] + "."
    return ", ".join(phrases[:-1]) + " and " + phrases[-1] + "."


def existence_question(scene: Scene, shape: str) -> tuple[str, str]:
    """POPE's question about `shape` and the scene's true answer: ("Is there a ring in the
    image?", "ring yes." or "ring no.").

    The answer names the shape before deciding, so the decision is made where the shape was
    just read: a 2-layer LM then learns to look it up in its context in a few hundred steps,
    while a bare "Yes."/"No." needs a two-hop attention circuit that took it over 1,000 (POPE's
    parser reads either: "no" in the first sentence is no).
    """
    return f"Is there a {shape} in the image?", f"{shape} {existence_answer(shape in scene.shapes)}"


def existence_answer(present: bool) -> str:
    """The yes/no word ending an existence answer, with its period."""
    return "yes." if present else "no."


def is_existence_answer(text: str, shapes: tuple[str, ...] = SHAPES) -> bool:
    """Whether `text` is an existence answer in the world's form ("ring yes.", "ring no.")."""
    words = text.split()
    return (
        len(words) == 2
        and words[0] in shapes
        and words[1] in (existence_answer(True), existence_answer(False))
    )


def existence_qa(scene: Scene, rng: np.random.Generator, cfg: WorldConfig) -> tuple[str, str]:
    """One existence question, about a present or an absent shape with equal odds (the shape
    uniform among those), as POPE balances its labels."""
    present = sorted(scene.shapes, key=cfg.shapes.index)
    absent = [s for s in cfg.shapes if s not in scene.shapes]
    pool = present if present and (not absent or rng.random() < 0.5) else absent
    return existence_question(scene, pool[int(rng.integers(len(pool)))])


def questions(scene: Scene, rng: np.random.Generator, cfg: WorldConfig) -> list[tuple[str, str]]:
    """Short question/answer pairs about the scene: existence (POPE-style), colour, count."""
    present = sorted(scene.shapes, key=cfg.shapes.index)
    absent = [s for s in cfg.shapes if s not in scene.shapes]
    qa = []
    shown = present[int(rng.integers(len(present)))] if present else None
    if shown:
        qa.append(existence_question(scene, shown))
        colour = next(o.colour for o in scene.objects if o.shape == shown)
        qa.append((f"What color is the {shown}?", f"The {shown} is {colour}."))
    if absent:
        qa.append(existence_question(scene, absent[int(rng.integers(len(absent)))]))
    count = len(scene.objects)
    answer = "There is one shape." if count == 1 else f"There are {NUMBER_WORDS[count]} shapes."
    qa.append(("How many shapes are in the image?", answer))
    return qa


def _shape_masks(cell: int) -> dict[str, np.ndarray]:
    """Boolean (cell, cell) masks of each shape, drawn at the centre of a cell."""
    c = (cell - 1) / 2
    y, x = np.mgrid[0:cell, 0:cell].astype(np.float32)
    dx, dy = x - c, y - c
    r = cell * 0.42
    return {
        "circle": dx**2 + dy**2 <= r**2,
        "square": (np.abs(dx) <= r * 0.8) & (np.abs(dy) <= r * 0.8),
        "triangle": (dy <= r * 0.8) & (dy >= -r) & (np.abs(dx) <= (dy + r) * 0.55),
        "diamond": np.abs(dx) + np.abs(dy) <= r * 1.05,
        "cross": ((np.abs(dx) <= r * 0.3) | (np.abs(dy) <= r * 0.3))
        & (np.abs(dx) <= r)
        & (np.abs(dy) <= r),
        "ring": (dx**2 + dy**2 <= r**2) & (dx**2 + dy**2 >= (r * 0.55) ** 2),
        "bar": (np.abs(dx) <= r) & (np.abs(dy) <= r * 0.4),
        "frame": (np.maximum(np.abs(dx), np.abs(dy)) <= r * 0.9)
        & (np.maximum(np.abs(dx), np.abs(dy)) >= r * 0.45),
    }


_MASK_CACHE: dict[int, dict[str, np.ndarray]] = {}


def render(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """The scene as an (H, W, 3) uint8 image; the pixel noise is seeded by the scene."""
    masks = _MASK_CACHE.setdefault(cfg.cell_size, _shape_masks(cfg.cell_size))
    side, cell = cfg.image_size, cfg.cell_size
    image = np.empty((side, side, 3), np.float32)
    image[:] = BACKGROUND
    for obj in scene.objects:
        patch = image[obj.row * cell : (obj.row + 1) * cell, obj.col * cell : (obj.col + 1) * cell]
        mask = masks[obj.shape][..., None]
        blended = (1 - obj.alpha) * patch + obj.alpha * np.asarray(RGB[obj.colour], np.float32)
        patch[:] = np.where(mask, blended, patch)
    if cfg.pixel_noise > 0:
        noise_rng = np.random.default_rng(scene.seed)
        image += noise_rng.normal(0.0, cfg.pixel_noise, image.shape).astype(np.float32)
    return (np.clip(image, 0.0, 1.0) * 255 + 0.5).astype(np.uint8)


def cell_labels(scene: Scene, cfg: WorldConfig) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell targets in row-major order: shape index + 1 (0 = empty) and colour index + 1."""
    shape = np.zeros(cfg.grid * cfg.grid, np.int64)
    colour = np.zeros(cfg.grid * cfg.grid, np.int64)
    for obj in scene.objects:
        cell = obj.row * cfg.grid + obj.col
        shape[cell] = cfg.shapes.index(obj.shape) + 1
        colour[cell] = cfg.colours.index(obj.colour) + 1
    return shape, colour


@lru_cache(maxsize=8)
def shape_vocabulary(shapes: tuple[str, ...] = SHAPES) -> ObjectVocabulary:
    """CHAIR's word tables for ShapeWorld: each shape is its own category, plurals included."""
    return ObjectVocabulary({shape: shape for shape in shapes}, {})


def mentioned_shapes(text: str, shapes: tuple[str, ...] = SHAPES) -> list[str]:
    """Every shape mentioned in `text`, in order, repeats kept: CHAIR's extraction, our words."""
    return extract_objects(text, shape_vocabulary(tuple(shapes)))
