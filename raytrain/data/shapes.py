"""The embedded procedural image-text world: scenes of coloured shapes, rendered to images with captions.

Three separate pieces, each usable alone:
- `generate_scene(rng, cfg)` draws a `Scene`: objects (shape, colour, size, position, rotation) and the pairwise
  spatial relations between them;
- `render(scene, size)` draws any scene record (generated here or written by another program, e.g. an edited one)
  to an RGB image;
- `describe(scene, rng)` writes a natural caption that mentions some of the objects, their attributes and a relation.

`Scene.to_dict`/`Scene.from_dict` give the structured record (JSON-safe) that visual question answering and
controllable synthesis read and edit; `from_dict` checks every field and names the bad one. `sample(index, seed)`
makes one record deterministically from (seed, index), so Ray Data can generate a data set in parallel and a
held-out set is just another range of indices.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any

from raytrain.config import RaytrainError

SHAPES = ("circle", "square", "triangle", "star", "heart", "cross", "diamond", "hexagon", "crescent", "arrow")
COLOURS = {"red": (214, 39, 40), "green": (44, 160, 44), "blue": (31, 119, 220), "yellow": (240, 210, 30),
           "purple": (128, 60, 170), "orange": (255, 127, 14), "pink": (240, 120, 190), "brown": (140, 86, 55),
           "gray": (127, 127, 127), "black": (20, 20, 20), "cyan": (23, 200, 220)}
BACKGROUNDS = {"white": (245, 245, 245), "beige": (225, 215, 190), "gray": (190, 190, 190)}
SIZES = {"small": 0.12, "large": 0.2}  # radius as a fraction of the image side
RELATIONS = ("left of", "right of", "above", "below")
_SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_NUMBERS = ("one", "two", "three", "four", "five")
_SAID = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}


class SceneError(RaytrainError):
    pass


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str
    x: float  # centre, fraction of the width (0 left, 1 right)
    y: float  # centre, fraction of the height (0 top, 1 bottom)
    rotation: float = 0.0  # degrees, counter-clockwise


@dataclass
class Relation:
    subject: int  # index into Scene.objects
    predicate: str  # one of RELATIONS
    object: int


@dataclass
class Scene:
    objects: list[SceneObject]
    background: str = "white"
    relations: list[Relation] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Scene:
        """A scene from its record; every field is checked and a bad one is named (`objects[2].colour: ...`)."""
        if not isinstance(record, dict) or not isinstance(record.get("objects"), list):
            raise SceneError("scene record: expected a mapping with an 'objects' list")
        objects = [_object(o, f"objects[{i}]") for i, o in enumerate(record["objects"])]
        background = record.get("background", "white")
        if background not in BACKGROUNDS:
            raise SceneError(f"background: {background!r} is not one of {', '.join(BACKGROUNDS)}")
        relations = []
        for i, r in enumerate(record.get("relations", [])):
            try:
                rel = Relation(int(r["subject"]), str(r["predicate"]), int(r["object"]))
            except (KeyError, TypeError, ValueError) as e:
                raise SceneError(f"relations[{i}]: {e!r}") from None
            if rel.predicate not in RELATIONS or not (0 <= rel.subject < len(objects) and
                                                      0 <= rel.object < len(objects)):
                raise SceneError(f"relations[{i}]: unknown predicate or object index in {r}")
            relations.append(rel)
        return cls(objects, background, relations)


def _object(o: Any, where: str) -> SceneObject:
    try:
        obj = SceneObject(str(o["shape"]), str(o["colour"]), str(o["size"]), float(o["x"]), float(o["y"]),
                          float(o.get("rotation", 0.0)))
    except (KeyError, TypeError, ValueError) as e:
        raise SceneError(f"{where}: missing or malformed field {e}") from None
    for name, value, allowed in (("shape", obj.shape, SHAPES), ("colour", obj.colour, COLOURS),
                                 ("size", obj.size, SIZES)):
        if value not in allowed:
            raise SceneError(f"{where}.{name}: {value!r} is not one of {', '.join(allowed)}")
    if not (0 <= obj.x <= 1 and 0 <= obj.y <= 1):
        raise SceneError(f"{where}: x and y must lie in [0, 1], got ({obj.x}, {obj.y})")
    return obj


@dataclass
class WorldConfig:
    min_objects: int = 1
    max_objects: int = 3
    image_size: int = 64  # rendered side in pixels
    shapes: list[str] = field(default_factory=lambda: list(SHAPES))


# ---- generator -------------------------------------------------------------------------------------------------

def generate_scene(rng: random.Random, cfg: WorldConfig, shape: str | None = None) -> Scene:
    """Random objects placed without overlap, plus their pairwise relations. `shape` forces a one-object scene of
    that shape (the labelled classification set)."""
    background = rng.choice(list(BACKGROUNDS))
    count = 1 if shape else rng.randint(cfg.min_objects, cfg.max_objects)
    objects: list[SceneObject] = []
    for _ in range(count):
        for _attempt in range(50):
            size = rng.choice(list(SIZES))
            r = SIZES[size]
            x, y = rng.uniform(r, 1 - r), rng.uniform(r, 1 - r)
            if all(math.dist((x, y), (o.x, o.y)) > r + SIZES[o.size] + 0.02 for o in objects):
                break
        else:
            continue  # no room left: a scene with fewer objects
        colour = rng.choice([c for c in COLOURS if c != background])
        objects.append(SceneObject(shape or rng.choice(cfg.shapes), colour, size, round(x, 4), round(y, 4),
                                   round(rng.uniform(-20, 20), 1)))
    return Scene(objects, background, spatial_relations(objects))


def spatial_relations(objects: list[SceneObject]) -> list[Relation]:
    """For each ordered pair, the relation along the axis where the two centres differ most."""
    out = []
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i != j:
                dx, dy = b.x - a.x, b.y - a.y
                pred = ("left of" if dx > 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy > 0 else
                                                                                        "below")
                out.append(Relation(i, pred, j))
    return out


# ---- renderer --------------------------------------------------------------------------------------------------

def shape_outline(shape: str, cx: float, cy: float, r: float, rotation: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape of radius `r` at (cx, cy) in pixels; None for the circle (drawn as an ellipse)."""
    def polar(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
        t = math.radians(rotation)
        return [(cx + r * (u * math.cos(t) + v * math.sin(t)), cy + r * (-u * math.sin(t) + v * math.cos(t)))
                for u, v in points]

    def ring(n: int, start: float, radii: tuple[float, ...] = (1.0,)) -> list[tuple[float, float]]:
        return [(radii[k % len(radii)] * math.cos(start + 2 * math.pi * k / n),
                 radii[k % len(radii)] * math.sin(start + 2 * math.pi * k / n)) for k in range(n)]

    if shape == "circle":
        return None
    if shape == "square":
        return polar(ring(4, math.pi / 4))
    if shape == "triangle":
        return polar(ring(3, -math.pi / 2))
    if shape == "diamond":
        return polar([(0, -1), (0.62, 0), (0, 1), (-0.62, 0)])
    if shape == "hexagon":
        return polar(ring(6, 0))
    if shape == "star":
        return polar(ring(10, -math.pi / 2, (1.0, 0.42)))
    if shape == "cross":
        a = 0.33
        return polar([(-a, -1), (a, -1), (a, -a), (1, -a), (1, a), (a, a), (a, 1), (-a, 1), (-a, a), (-1, a),
                      (-1, -a), (-a, -a)])
    if shape == "arrow":
        return polar([(-1, -0.3), (0.2, -0.3), (0.2, -0.75), (1, 0), (0.2, 0.75), (0.2, 0.3), (-1, 0.3)])
    if shape == "heart":
        pts = [(16 * math.sin(t) ** 3, -(13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t)
                                         - math.cos(4 * t))) for t in (2 * math.pi * k / 48 for k in range(48))]
        return polar([(u / 17, v / 17 + 0.1) for u, v in pts])
    if shape == "crescent":
        outer = [(math.cos(t), math.sin(t)) for t in (math.pi / 2 + math.pi * k / 24 for k in range(25))]
        inner = [(0.45 * math.cos(t) + 0.1, 0.95 * math.sin(t)) for t in
                 (3 * math.pi / 2 - math.pi * k / 24 for k in range(25))]
        return polar(outer + inner)
    raise SceneError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = 64, supersample: int = 4) -> Any:
    """An RGB `PIL.Image` of side `size` (drawn `supersample` times larger and downscaled, for smooth edges)."""
    from PIL import Image, ImageDraw

    big = size * supersample
    image = Image.new("RGB", (big, big), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(image)
    for o in scene.objects:
        cx, cy, r = o.x * big, o.y * big, SIZES[o.size] * big
        outline = shape_outline(o.shape, cx, cy, r, o.rotation)
        if outline is None:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[o.colour])
        else:
            draw.polygon(outline, fill=COLOURS[o.colour])
    return image.resize((size, size), Image.Resampling.LANCZOS)


def png_bytes(image: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# ---- captioner -------------------------------------------------------------------------------------------------

def describe(scene: Scene, rng: random.Random) -> str:
    """A caption in the style of alt-text: mentions objects with some of their attributes, sometimes a relation,
    a count or the background, in varied templates; may leave an object out, as web captions do."""
    objs = scene.objects
    if not objs:
        return rng.choice(["an empty canvas", f"a plain {scene.background} background"])
    shown = list(range(len(objs)))
    if len(objs) > 1 and rng.random() < 0.2:
        shown.remove(rng.choice(shown))
    same = {(objs[i].shape, objs[i].colour) for i in shown}
    if len(shown) > 1 and len(same) == 1:  # "two red circles"
        shape, colour = same.pop()
        body = f"{_NUMBERS[len(shown) - 1]} {colour} {shape}s"
    elif len(shown) == 2 and rng.random() < 0.6:
        rel = next(r for r in scene.relations if r.subject == shown[0] and r.object == shown[1])
        body = f"{_phrase(objs[shown[0]], rng)} {_SAID[rel.predicate]} {_phrase(objs[shown[1]], rng)}"
    else:
        parts = [_phrase(objs[i], rng) for i in shown]
        body = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    template = rng.choice(["{}", "{}", "a picture of {}", "{} on a {bg} background", "drawing of {}",
                           "stock image: {}", "{} in the scene", "illustration with {}"])
    return template.format(body, bg=scene.background)


def _phrase(o: SceneObject, rng: random.Random) -> str:
    words = []
    if rng.random() < 0.5:
        words.append(rng.choice(_SIZE_WORDS[o.size]))
    if rng.random() < 0.85:
        words.append(o.colour)
    words.append(o.shape)
    article = "an" if words[0][0] in "aeiou" else "a"
    return f"{article} {' '.join(words)}"


# ---- records ---------------------------------------------------------------------------------------------------

def sample_rng(seed: int, index: int) -> random.Random:
    """The same stream for (seed, index) in every process (string seeds hash with SHA-512, not Python's hash)."""
    return random.Random(f"shapes:{seed}:{index}")


def sample(index: int, seed: int, cfg: WorldConfig) -> dict[str, Any]:
    """One image-text record: key, PNG bytes, caption and the scene record."""
    rng = sample_rng(seed, index)
    scene = generate_scene(rng, cfg)
    return {"key": f"{index:09d}", "image": png_bytes(render(scene, cfg.image_size)), "caption": describe(scene, rng),
            "scene": scene.to_dict()}


def labelled_sample(index: int, seed: int, cfg: WorldConfig) -> dict[str, Any]:
    """One record of the labelled classification set: a single object; `label` indexes `cfg.shapes`."""
    rng = sample_rng(seed, index)
    label = rng.randrange(len(cfg.shapes))
    scene = generate_scene(rng, cfg, shape=cfg.shapes[label])
    return {"key": f"{index:09d}", "image": png_bytes(render(scene, cfg.image_size)), "label": label}
