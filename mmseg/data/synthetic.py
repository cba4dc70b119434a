"""SynthRef: synthetic referring-segmentation data written in the on-disk layout of refCOCO.

Each image shows 2-6 coloured shapes (circle, square, triangle, star, cross, hexagon) on a
plain, noisy or gradient background, possibly overlapping (later shapes on top). Every
object gets at most one referring expression ("ref") with 1-3 phrasings. Expressions are
built as small programs (:class:`Expr`) and kept only when :func:`resolve` finds that they
denote exactly one object (or none, for no-target refs), with coordinate / size margins
so that no expression depends on a pixel-level judgement call.

Layout written by :func:`write_synthref` (same as REFER's refcoco folder)::

    OUT/images/synthref_{split}_{i:06d}.png      RGB, image_size x image_size
    OUT/synthref/instances.json                   COCO images / annotations / categories
    OUT/synthref/refs(unc).p                      list of refs, pickle protocol 4
    OUT/synthref/qa.json                          short-answer questions per image, with the ids of the
                                                  annotations each question is about (``ann_ids``)

Annotations carry the visible part of each object as COCO RLE (counts as str) plus the
SynthRef-only key ``attributes = {"color": str, "size": float}`` where ``size`` is the
radius (px) of a disc with the same area as the unoccluded shape. Refs carry the extra key
``expr_type``, one of :data:`EXPR_TYPES`.

Expression semantics (``m`` = :data:`POS_MARGIN` x image side, positions = centroids of
the visible masks, y grows downwards):

* attribute: colour and/or kind ("the red circle"); size superlatives compare an object
  with the others matching the same words, and need a size ratio of :data:`SIZE_RATIO`.
* positional: extreme along an axis among the objects matching the words, ahead of the
  runner-up by ``m``; or the only such object inside an image quadrant (``m/2`` from both
  mid-lines, every other one ``m/2`` outside).
* relational: relative to a uniquely named anchor. "left of" holds when the object is at
  least ``m`` to the left and at least as far left as it is off vertically; it clearly fails
  when the object is not left of the anchor at all; anything in between makes the
  expression ambiguous and it is not used. "next to" / "closest to" means nearest by
  centroid distance, ahead of the runner-up by ``m``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from mmseg.data.prompts import article
from mmseg.masks import encode_rle, mask_to_box

__all__ = [
    "COLORS",
    "KINDS",
    "EXPR_TYPES",
    "SPLITS",
    "Desc",
    "Expr",
    "SceneObject",
    "resolve",
    "render",
    "parse_expression",
    "split_relation",
    "RelationParts",
    "expr_type",
    "mask_centroid",
    "write_synthref",
]

# Saturated object colours, far from each other and from the dark/neutral backgrounds.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (40, 185, 60),
    "blue": (45, 95, 240),
    "yellow": (245, 225, 40),
    "purple": (150, 60, 215),
    "orange": (250, 140, 15),
    "white": (240, 240, 240),
}
KINDS: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon")
PLURALS: dict[str, str] = {
    "circle": "circles",
    "square": "squares",
    "triangle": "triangles",
    "star": "stars",
    "cross": "crosses",
    "hexagon": "hexagons",
}
GENERIC_NOUNS: tuple[str, ...] = ("object", "shape", "one")
SPLITS: tuple[str, ...] = ("train", "val", "testA", "testB")
EXPR_TYPES: tuple[str, ...] = ("attribute", "positional", "relational", "no_target")

POS_MARGIN = 0.10  # positional / relational margin as a fraction of the image side
SIZE_RATIO = 1.3  # the "big" one must be this much larger (equal-area radius) than any peer
MIN_VISIBLE_PX = 60  # every object keeps at least this many visible pixels ...
MIN_VISIBLE_FRAC = 0.6  # ... and at least this share of its unoccluded area
SIZE_RANGE = (0.065, 0.19)  # equal-area radius as a fraction of the image side
COLOR_JITTER = 12  # per-channel jitter of an object's colour, keeps colours separable
QA_DIGITS = tuple(str(i) for i in range(7))

# Type mix of the target refs per split (no-target refs are added on top, ~10% of all refs).
_SPLIT_SHARES: dict[str, dict[str, float]] = {
    "train": {"attribute": 0.4, "positional": 0.3, "relational": 0.3},
    "val": {"attribute": 0.3, "positional": 0.35, "relational": 0.35},
    "testA": {"attribute": 1.0},
    "testB": {"relational": 1.0},
}
_NO_TARGET_SHARE = 0.10

# Vocabulary of the templates; the parser below is built from the same tables.
_SIZE_WORDS: dict[tuple[str, bool], tuple[str, ...]] = {
    # (arg, exactly two peers) -> adjectives; comparatives only make sense for a pair
    ("largest", True): ("big", "large", "bigger", "larger"),
    ("largest", False): ("biggest", "largest"),
    ("smallest", True): ("small", "smaller"),
    ("smallest", False): ("smallest",),
}
_EXTREME_WORDS: dict[tuple[str, bool], tuple[tuple[str, ...], tuple[str, ...]]] = {
    # (direction, exactly two peers) -> (prefix adjectives, postfix phrases)
    ("left", True): (("left", "leftmost"), ("on the left",)),
    ("left", False): (("leftmost",), ("on the far left",)),
    ("right", True): (("right", "rightmost"), ("on the right",)),
    ("right", False): (("rightmost",), ("on the far right",)),
    ("top", True): (("top", "upper"), ("at the top", "on top")),
    ("top", False): (("topmost", "highest"), ("at the very top",)),
    ("bottom", True): (("bottom", "lower"), ("at the bottom",)),
    ("bottom", False): (("bottommost", "lowest"), ("at the very bottom",)),
}
_CORNERS: tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
_REL_WORDS: dict[str, tuple[str, ...]] = {
    "left_of": ("left of", "to the left of"),
    "right_of": ("right of", "to the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "nearest": ("next to", "closest to", "nearest to"),
}


# --------------------------------------------------------------------------------------
# Expression programs and their semantics
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Desc:
    """Noun-phrase filter: colour and/or kind; ``Desc()`` matches every object."""

    color: str | None = None
    kind: str | None = None

    def matches(self, obj: "SceneObject") -> bool:
        return self.accepts(obj.color, obj.kind)

    def accepts(self, color: str | None, kind: str | None) -> bool:
        """Whether an object of this colour and kind fits (e.g. an annotation's labels)."""
        return (self.color is None or color == self.color) and (self.kind is None or kind == self.kind)

    @property
    def empty(self) -> bool:
        return self.color is None and self.kind is None


@dataclass(frozen=True)
class Expr:
    """A referring-expression program.

    ``op`` / ``arg``: ``attr`` (no arg); ``size`` with "largest"/"smallest"; ``extreme``
    with "left"/"right"/"top"/"bottom"; ``corner`` with e.g. "bottom right"; ``relation``
    with "left_of"/"right_of"/"above"/"below"/"nearest" and an ``anchor`` description.
    """

    op: str
    desc: Desc
    arg: str | None = None
    anchor: Desc | None = None


@dataclass(frozen=True)
class SceneObject:
    """What the semantics look at: kind, colour, equal-area radius (px), visible centroid (px)."""

    kind: str
    color: str
    size: float
    cx: float
    cy: float


def expr_type(expr: Expr, result: tuple[int, ...]) -> str:
    """Map a program and its resolution to the ``expr_type`` stored in the refs."""
    if not result:
        return "no_target"
    if expr.op in ("attr", "size"):
        return "attribute"
    if expr.op in ("extreme", "corner"):
        return "positional"
    return "relational"


def _relation_state(t: SceneObject, a: SceneObject, rel: str, margin: float) -> bool | None:
    """True if ``t`` clearly stands in ``rel`` to anchor ``a``, False if clearly not, None if unclear."""
    dx, dy = t.cx - a.cx, t.cy - a.cy
    if rel in ("left_of", "right_of"):
        along, across = (-dx if rel == "left_of" else dx), dy
    else:
        along, across = (-dy if rel == "above" else dy), dx
    if along >= margin and along >= abs(across):  # within 45 degrees of the direction
        return True
    if along <= 0:
        return False
    return None


def resolve(expr: Expr, objects: Sequence[SceneObject], image_size: int) -> tuple[int, ...] | None:
    """Indices of the objects ``expr`` denotes, or ``None`` if it is ambiguous / ill-posed.

    A usable target expression resolves to exactly one index; a usable no-target
    expression resolves to ``()``.
    """
    m = POS_MARGIN * image_size
    cands = [i for i, o in enumerate(objects) if expr.desc.matches(o)]
    if expr.op == "attr":
        return tuple(cands)
    if expr.op == "relation":
        assert expr.anchor is not None
        anchors = [i for i, o in enumerate(objects) if expr.anchor.matches(o)]
        if len(anchors) != 1:
            return None  # the anchor phrase itself must name one object
        a = objects[anchors[0]]
        cands = [i for i in cands if i != anchors[0]]
        if expr.arg == "nearest":
            if not cands:
                return ()
            dist = sorted((math.hypot(objects[i].cx - a.cx, objects[i].cy - a.cy), i) for i in cands)
            if len(dist) >= 2 and dist[1][0] - dist[0][0] < m:
                return None
            return (dist[0][1],)
        hits = []
        for i in cands:
            state = _relation_state(objects[i], a, str(expr.arg), m)
            if state is None:
                return None
            if state:
                hits.append(i)
        return tuple(hits)
    # size / position words compare an object with its peers, so there must be peers
    if len(cands) < 2:
        return None
    if expr.op == "size":
        largest = expr.arg == "largest"
        order = sorted(cands, key=lambda i: objects[i].size, reverse=largest)
        first, second = objects[order[0]].size, objects[order[1]].size
        ok = first >= SIZE_RATIO * second if largest else second >= SIZE_RATIO * first
        return (order[0],) if ok else None
    if expr.op == "extreme":
        horizontal = expr.arg in ("left", "right")
        sign = -1.0 if expr.arg in ("left", "top") else 1.0

        def key(i: int) -> float:
            o = objects[i]
            return sign * (o.cx if horizontal else o.cy)

        order = sorted(cands, key=key, reverse=True)
        return (order[0],) if key(order[0]) - key(order[1]) >= m else None
    if expr.op == "corner":
        vert, horiz = str(expr.arg).split()
        half, c = m / 2, image_size / 2
        hits = []
        for i in cands:
            o = objects[i]
            inside_x = (c - o.cx) if horiz == "left" else (o.cx - c)
            inside_y = (c - o.cy) if vert == "top" else (o.cy - c)
            if inside_x >= half and inside_y >= half:
                hits.append(i)
            elif not (inside_x <= -half or inside_y <= -half):
                return None  # too close to a mid-line to say which quadrant it is in
        return tuple(hits)
    raise ValueError(f"unknown expression op {expr.op!r}")


# --------------------------------------------------------------------------------------
# Rendering programs to sentences, and parsing them back
# --------------------------------------------------------------------------------------


def _noun_phrases(desc: Desc) -> list[str]:
    nouns = [desc.kind] if desc.kind else list(GENERIC_NOUNS)
    return [f"{desc.color} {n}" if desc.color else n for n in nouns]


def render(expr: Expr, n_peers: int) -> list[str]:
    """All phrasings (lowercase, no punctuation) of ``expr``.

    ``n_peers`` is how many objects match ``expr.desc``; with exactly two the comparative
    forms ("the bigger circle", "the left circle") are used, otherwise superlatives.
    """
    nps = _noun_phrases(expr.desc)
    pair = n_peers == 2
    if expr.op == "attr":
        out = [f"the {np_}" for np_ in nps]
        if expr.desc.kind:  # terse refCOCO-style form; "red one" alone would not read well
            out += nps
        return out
    if expr.op == "size":
        return [f"the {adj} {np_}" for adj in _SIZE_WORDS[(str(expr.arg), pair)] for np_ in nps]
    if expr.op == "extreme":
        pre, post = _EXTREME_WORDS[(str(expr.arg), pair)]
        return [f"the {p} {np_}" for p in pre for np_ in nps] + [f"the {np_} {q}" for q in post for np_ in nps]
    if expr.op == "corner":
        a = expr.arg
        return (
            [f"the {a} {np_}" for np_ in nps]
            + [f"the {np_} at the {a}" for np_ in nps]
            + [f"the {np_} in the {a} corner" for np_ in nps]
        )
    if expr.op == "relation":
        assert expr.anchor is not None and not expr.anchor.empty
        anchors = _noun_phrases(expr.anchor)
        return [f"the {np_} {r} the {anp}" for np_ in nps for r in _REL_WORDS[str(expr.arg)] for anp in anchors]
    raise ValueError(f"unknown expression op {expr.op!r}")


def _alt(words: Iterable[str]) -> str:
    # longest first so that e.g. "leftmost" is not cut to "left"
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


def _np_pattern(prefix: str) -> str:
    return rf"(?:(?P<{prefix}c>{_alt(COLORS)}) )?(?P<{prefix}n>{_alt(KINDS + GENERIC_NOUNS)})"


def _build_parser() -> list[tuple[str, re.Pattern[str]]]:
    size_adj = _alt(w for ws in _SIZE_WORDS.values() for w in ws)
    ext_pre = _alt(w for pre, _ in _EXTREME_WORDS.values() for w in pre)
    ext_post = _alt(w for _, post in _EXTREME_WORDS.values() for w in post)
    rel = _alt(w for ws in _REL_WORDS.values() for w in ws)
    np1, np2 = _np_pattern("a"), _np_pattern("b")
    corner = r"(?P<v>top|bottom) (?P<h>left|right)"
    forms = [
        ("relation", rf"{np1} (?P<rel>{rel}) the {np2}"),
        ("corner", rf"{corner} {np1}"),
        ("corner", rf"{np1} (?:at the|in the) {corner}(?: corner)?"),
        ("size", rf"(?P<adj>{size_adj}) {np1}"),
        ("extreme", rf"(?P<adj>{ext_pre}) {np1}"),
        ("extreme", rf"{np1} (?P<post>{ext_post})"),
        ("attr", np1),
    ]
    return [(op, re.compile(rf"^(?:the )?{pat}$")) for op, pat in forms]


_PARSER: list[tuple[str, re.Pattern[str]]] | None = None


def _desc_from(match: re.Match[str], prefix: str) -> Desc:
    noun = match.group(f"{prefix}n")
    return Desc(match.group(f"{prefix}c"), None if noun in GENERIC_NOUNS else noun)


def _parse(sentence: str) -> tuple[list[tuple[str, re.Pattern[str]]], str]:
    """The parser's forms (built on first use, not at import time) and ``sentence`` normalised for them."""
    global _PARSER
    if _PARSER is None:
        _PARSER = _build_parser()
    return _PARSER, " ".join(re.sub(r"[^a-z ]", " ", sentence.lower()).split())


def parse_expression(sentence: str) -> Expr:
    """Parse a SynthRef sentence (any phrasing :func:`render` produces) back into its program.

    Raises ``ValueError`` for sentences outside the SynthRef grammar.
    """
    forms, text = _parse(sentence)
    for op, pattern in forms:
        mt = pattern.match(text)
        if mt is None:
            continue
        desc = _desc_from(mt, "a")
        if op == "attr":
            return Expr("attr", desc)
        if op == "relation":
            word = mt.group("rel")
            arg = next(k for k, ws in _REL_WORDS.items() if word in ws)
            return Expr("relation", desc, arg, _desc_from(mt, "b"))
        if op == "corner":
            return Expr("corner", desc, f"{mt.group('v')} {mt.group('h')}")
        if op == "size":
            adj = mt.group("adj")
            arg = next(a for (a, _), ws in _SIZE_WORDS.items() if adj in ws)
            return Expr("size", desc, arg)
        word = mt.groupdict().get("adj") or mt.group("post")
        arg = next(d for (d, _), (pre, post) in _EXTREME_WORDS.items() if word in pre or word in post)
        return Expr("extreme", desc, arg)
    raise ValueError(f"not a SynthRef expression: {sentence!r}")


@dataclass(frozen=True)
class RelationParts:
    """A relational sentence cut into its words as the user wrote them: "the star to the left of the red star"
    gives ``subject="star"``, ``relation="to the left of"``, ``anchor="red star"`` and
    ``anchor_desc=Desc("red", "star")``."""

    subject: str
    relation: str
    anchor: str
    anchor_desc: Desc


def split_relation(sentence: str) -> RelationParts | None:
    """The parts of a SynthRef relational sentence ("the star left of the red star"), or None for any other
    sentence (another SynthRef form, or one outside the grammar such as refCOCO's)."""
    forms, text = _parse(sentence)
    op, pattern = forms[0]
    assert op == "relation"  # the parser tries the relational form first
    mt = pattern.match(text)
    if mt is None:
        return None

    def words(prefix: str) -> str:
        return " ".join(w for w in (mt.group(f"{prefix}c"), mt.group(f"{prefix}n")) if w)

    return RelationParts(words("a"), mt.group("rel"), words("b"), _desc_from(mt, "b"))


# --------------------------------------------------------------------------------------
# Scenes
# --------------------------------------------------------------------------------------


def _unit_polygon(kind: str) -> np.ndarray:
    """Vertices (k, 2) of the shape with circumradius 1, centred at the origin, unrotated."""
    if kind == "square":
        ang = np.deg2rad([45, 135, 225, 315])
        return np.stack([np.cos(ang), np.sin(ang)], 1)
    if kind == "triangle":
        ang = np.deg2rad([-90, 30, 150])
        return np.stack([np.cos(ang), np.sin(ang)], 1)
    if kind == "hexagon":
        ang = np.deg2rad(np.arange(6) * 60.0)
        return np.stack([np.cos(ang), np.sin(ang)], 1)
    if kind == "star":
        ang = np.deg2rad(-90 + np.arange(10) * 36.0)
        rad = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)
    if kind == "cross":
        w = 0.34  # half-width of the arms
        pts = [(w, -1), (w, -w), (1, -w), (1, w), (w, w), (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w), (-w, -1)]
        return np.asarray(pts, dtype=np.float64)
    raise ValueError(kind)


@functools.lru_cache(maxsize=None)
def _circumradius_factor(kind: str) -> float:
    """Circumradius per unit equal-area radius, so that a given ``size`` means the same area for every kind."""
    if kind == "circle":
        return 1.0
    p = _unit_polygon(kind)
    x, y = p[:, 0], p[:, 1]
    area = 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))
    return math.sqrt(math.pi / area)


def mask_centroid(mask: np.ndarray) -> tuple[float, float]:
    """Centroid (cx, cy) in pixels (pixel centres at +0.5) of a non-empty bool (H, W) mask."""
    ys, xs = np.nonzero(mask)
    return float(xs.mean()) + 0.5, float(ys.mean()) + 0.5


@dataclass
class _Placed:
    kind: str
    color: str
    size: float  # equal-area radius, px (rounded to 0.01 so JSON round-trips exactly)
    radius: float  # circumradius, px
    cx: float  # drawing centre, px
    cy: float
    full: np.ndarray  # bool (S, S), unoccluded shape
    full_area: int
    visible: np.ndarray = field(repr=False, default_factory=lambda: np.zeros(0, bool))


def _shape_mask(kind: str, cx: float, cy: float, radius: float, angle: float, size: int) -> np.ndarray:
    """Rasterise one shape to a bool (size, size) mask with PIL (C speed, no pixel loops)."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    if kind == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=1)
    else:
        p = _unit_polygon(kind)
        c, s = math.cos(angle), math.sin(angle)
        xs = cx + radius * (c * p[:, 0] - s * p[:, 1])
        ys = cy + radius * (s * p[:, 0] + c * p[:, 1])
        draw.polygon([(float(x), float(y)) for x, y in zip(xs, ys)], fill=1)
    return np.asarray(canvas, dtype=bool)


def _sample_objects(rng: np.random.Generator, size: int) -> list[_Placed]:
    """Place 2-6 shapes; later ones occlude earlier ones but each keeps enough visible area."""
    radius_factor = {k: _circumradius_factor(k) for k in KINDS}
    color_names = tuple(COLORS)
    while True:
        n = int(rng.integers(2, 7))
        # small pools of kinds/colours make repeated words common, which is what forces
        # positional and relational expressions
        kinds = [str(k) for k in rng.choice(KINDS, size=int(rng.integers(2, 5)), replace=False)]
        colors = [str(c) for c in rng.choice(color_names, size=int(rng.integers(2, 5)), replace=False)]
        max_frac = SIZE_RANGE[1] if n <= 3 else 0.15
        placed: list[_Placed] = []
        for _ in range(n):
            kind = kinds[int(rng.integers(len(kinds)))]
            color = colors[int(rng.integers(len(colors)))]
            # most objects stand free; about a third may be partly covered or cover others
            may_overlap = rng.random() < 0.35
            for attempt in range(30):
                eq_r = round(size * float(rng.uniform(SIZE_RANGE[0], max_frac)), 2)
                radius = eq_r * radius_factor[kind]
                lo, hi = radius + 1.0, size - radius - 1.0
                cx, cy = float(rng.uniform(lo, hi)), float(rng.uniform(lo, hi))
                angle = float(rng.uniform(0.0, 2 * math.pi))
                # touching shapes of the same colour would read as one blob
                if any(p.color == color and math.hypot(p.cx - cx, p.cy - cy) < p.radius + radius + 2 for p in placed):
                    continue
                full = _shape_mask(kind, cx, cy, radius, angle, size)
                if not may_overlap and attempt < 20 and any((p.full & full).any() for p in placed):
                    continue
                new_visible = []
                for p in placed:
                    vis = p.visible & ~full
                    if np.count_nonzero(vis) < max(MIN_VISIBLE_PX, MIN_VISIBLE_FRAC * p.full_area):
                        break
                    new_visible.append(vis)
                else:
                    for p, vis in zip(placed, new_visible):
                        p.visible = vis
                    area = int(np.count_nonzero(full))
                    placed.append(_Placed(kind, color, eq_r, radius, cx, cy, full, area, full.copy()))
                    break
        if len(placed) >= 2:
            return placed


def _render_image(rng: np.random.Generator, objects: list[_Placed], size: int) -> np.ndarray:
    """Paint background and objects; returns uint8 (size, size, 3)."""
    bg_kind = int(rng.integers(3))

    def dark_color() -> np.ndarray:
        grey = rng.uniform(15, 85)
        return np.clip(grey + rng.uniform(-15, 15, size=3), 0, 255)

    if bg_kind == 2:  # gradient between two dark colours along a random direction
        ang = rng.uniform(0, 2 * math.pi)
        t = np.linspace(-0.5, 0.5, size)
        ramp = np.clip(math.cos(ang) * t[None, :] + math.sin(ang) * t[:, None] + 0.5, 0, 1)
        c0, c1 = dark_color(), dark_color()
        img = c0[None, None, :] + ramp[..., None] * (c1 - c0)[None, None, :]
    else:
        img = np.broadcast_to(dark_color(), (size, size, 3)).copy()
    img = img.astype(np.float32)
    for o in objects:
        rgb = np.asarray(COLORS[o.color], np.float32) + rng.uniform(-COLOR_JITTER, COLOR_JITTER, 3).astype(np.float32)
        img[o.full] = rgb  # drawn in order: later objects cover earlier ones
    if bg_kind == 1:  # sensor-like noise over everything, objects included
        img += rng.normal(0.0, rng.uniform(6, 14), size=img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------
# Choosing expressions
# --------------------------------------------------------------------------------------


@dataclass
class _Candidates:
    """Valid programs of one scene: per target object and type, plus no-target programs."""

    by_object: dict[int, dict[str, list[Expr]]]
    absent: list[Expr]  # attribute no-target ("the purple hexagon")
    absent_hard: list[Expr]  # ... whose colour and kind both appear in the image
    relational_absent: list[Expr]
    n_peers: dict[Desc, int]


def _find_candidates(objs: list[SceneObject], size: int) -> _Candidates:
    descs: set[Desc] = set()
    for o in objs:
        descs.update((Desc(o.color, o.kind), Desc(None, o.kind), Desc(o.color, None), Desc()))
    ordered = sorted(descs, key=lambda d: (d.color or "", d.kind or ""))  # fixed order -> reproducible
    matches = {d: [i for i, o in enumerate(objs) if d.matches(o)] for d in ordered}
    by_object: dict[int, dict[str, list[Expr]]] = {i: {} for i in range(len(objs))}

    def add(expr: Expr, result: tuple[int, ...] | None) -> None:
        if result is not None and len(result) == 1:
            by_object[result[0]].setdefault(expr_type(expr, result), []).append(expr)

    for d in ordered:
        if not d.empty:
            e = Expr("attr", d)
            add(e, resolve(e, objs, size))
        if len(matches[d]) >= 2:
            for arg in ("largest", "smallest"):
                e = Expr("size", d, arg)
                add(e, resolve(e, objs, size))
            for arg in ("left", "right", "top", "bottom"):
                e = Expr("extreme", d, arg)
                add(e, resolve(e, objs, size))
            for arg in _CORNERS:
                e = Expr("corner", d, arg)
                add(e, resolve(e, objs, size))

    # Relations: the per-object relation states are computed once per (anchor, relation) and
    # reused for every target description; this is resolve()'s relation branch, unrolled.
    m = POS_MARGIN * size
    relational_absent: list[Expr] = []
    anchor_descs = [d for d in ordered if not d.empty and len(matches[d]) == 1]
    for j in sorted({matches[ad][0] for ad in anchor_descs}):
        names = [ad for ad in anchor_descs if matches[ad][0] == j]
        a = objs[j]
        for rel in _REL_WORDS:
            if rel == "nearest":
                dist = {i: math.hypot(o.cx - a.cx, o.cy - a.cy) for i, o in enumerate(objs) if i != j}
            else:
                state = {i: _relation_state(o, a, rel, m) for i, o in enumerate(objs) if i != j}
            for d in ordered:
                peers = [i for i in matches[d] if i != j]
                if not peers:
                    continue
                if rel == "nearest":
                    ranked = sorted((dist[i], i) for i in peers)
                    if len(ranked) >= 2 and ranked[1][0] - ranked[0][0] < m:
                        continue
                    res: tuple[int, ...] = (ranked[0][1],)
                else:
                    if any(state[i] is None for i in peers):
                        continue
                    res = tuple(i for i in peers if state[i])
                for ad in names:
                    e = Expr("relation", d, rel, ad)
                    # the relation must do work: the words alone must not already single it out
                    if len(res) == 1 and len(peers) >= 2:
                        add(e, res)
                    elif not res and d.kind is not None:
                        relational_absent.append(e)

    present_colors = {o.color for o in objs}
    present_kinds = {o.kind for o in objs}
    absent, hard = [], []
    for c in COLORS:
        for k in KINDS:
            if not any(o.color == c and o.kind == k for o in objs):
                absent.append(Expr("attr", Desc(c, k)))
                if c in present_colors and k in present_kinds:
                    hard.append(absent[-1])
    return _Candidates(by_object, absent, hard, relational_absent, {d: len(m) for d, m in matches.items()})


_SUB_FORMS: dict[str, tuple[str, ...]] = {
    "attribute": ("attr", "size"),
    "positional": ("extreme", "corner"),
    "relational": tuple(f"relation:{r}" for r in _REL_WORDS),
}


def _sub_form(expr: Expr) -> str:
    """Finer grouping than expr_type, used to balance the expression forms."""
    return f"{expr.op}:{expr.arg}" if expr.op == "relation" else expr.op


class _TypeBalancer:
    """Picks the category (expression type or sub-form) whose share lags its target most.

    Deterministic given the rng, and keeps every split's mix close to its target shares
    even though each object only offers some categories.
    """

    def __init__(self, shares: dict[str, float]) -> None:
        self.shares = shares
        self.counts = {t: 0 for t in shares}

    def choose(self, available: Iterable[str], rng: np.random.Generator) -> str | None:
        offered = set(available)
        avail = [t for t in self.shares if t in offered]
        if not avail:
            return None
        total = sum(self.counts.values()) + 1
        deficit = {t: self.shares[t] * total - self.counts[t] for t in avail}
        best = max(deficit.values())
        ties = [t for t in avail if deficit[t] >= best - 1e-9]
        pick = ties[int(rng.integers(len(ties)))]
        self.counts[pick] += 1
        return pick


def _sentences(
    main: Expr, pool: list[Expr], n_peers: dict[Desc, int], rng: np.random.Generator, k: int
) -> list[str]:
    """Up to ``k`` distinct phrasings: first of ``main``, then of other programs of the same type."""
    out: list[str] = []
    others = [e for e in pool if e != main]
    order = [main] + [others[i] for i in rng.permutation(len(others))]
    for e in order:
        phr = render(e, n_peers.get(e.desc, 0))
        for idx in rng.permutation(len(phr)):
            if phr[idx] not in out:
                out.append(phr[idx])
                break
        if len(out) >= k:
            break
    if len(out) < k:  # few programs: fill with more phrasings of the main one
        phr = render(main, n_peers.get(main.desc, 0))
        for idx in rng.permutation(len(phr)):
            if len(out) >= k:
                break
            if phr[idx] not in out:
                out.append(phr[idx])
    return out


def _question_phrase(i: int, cands: _Candidates, rng: np.random.Generator) -> str | None:
    """A unique attribute noun phrase for object ``i`` ("the red circle"), if one exists."""
    attrs = [e for e in cands.by_object[i].get("attribute", []) if e.op == "attr"]
    if not attrs:
        return None
    e = attrs[int(rng.integers(len(attrs)))]
    nps = _noun_phrases(e.desc)
    return "the " + nps[int(rng.integers(len(nps)))]


def _make_qa(objs: list[SceneObject], cands: _Candidates, size: int,
             rng: np.random.Generator) -> list[tuple[str, str, list[int]]]:
    """Short-answer questions: counting, colour, left/right or above/below, yes/no existence.

    Each comes as ``(question, answer, subject)``: ``subject`` lists the indices of the objects the question is
    about (those counted; the one whose colour or place is asked; those that make an existence answer "yes"), so a
    model can be told where to look (see ``ModelConfig.ground_layer``)."""
    qa: list[tuple[str, str, list[int]]] = []

    def which(keep) -> list[int]:
        return [i for i, o in enumerate(objs) if keep(o)]

    kinds_present = sorted({o.kind for o in objs})
    colors_present = sorted({o.color for o in objs})
    # counting (digits "0".."6")
    form = int(rng.integers(4))
    if form == 0:
        pool = list(KINDS) if rng.random() < 0.2 else kinds_present  # sometimes ask about an absent kind -> "0"
        k = pool[int(rng.integers(len(pool)))]
        subject = which(lambda o: o.kind == k)
        qa.append((f"how many {PLURALS[k]} are there?", str(len(subject)), subject))
    elif form == 1:
        c = colors_present[int(rng.integers(len(colors_present)))]
        noun = ("objects", "shapes")[int(rng.integers(2))]
        subject = which(lambda o: o.color == c)
        qa.append((f"how many {c} {noun} are there?", str(len(subject)), subject))
    elif form == 2:
        noun = ("objects", "shapes")[int(rng.integers(2))]
        qa.append((f"how many {noun} are there?", str(len(objs)), list(range(len(objs)))))
    else:
        o = objs[int(rng.integers(len(objs)))]
        subject = which(lambda p: p.color == o.color and p.kind == o.kind)
        qa.append((f"how many {o.color} {PLURALS[o.kind]} are there?", str(len(subject)), subject))
    # colour of a kind that occurs once
    unique_kinds = [k for k in kinds_present if sum(o.kind == k for o in objs) == 1]
    if unique_kinds:
        k = unique_kinds[int(rng.integers(len(unique_kinds)))]
        word = ("colour", "color")[int(rng.integers(2))]
        subject = which(lambda o: o.kind == k)
        qa.append((f"what {word} is the {k}?", objs[subject[0]].color, subject))
    # relative position of two uniquely named objects, with the usual margin
    m = POS_MARGIN * size
    pairs = []
    for i in range(len(objs)):
        for j in range(len(objs)):
            if i != j:
                dx, dy = objs[i].cx - objs[j].cx, objs[i].cy - objs[j].cy
                if abs(dx) >= m:
                    pairs.append((i, j, "h", "left" if dx < 0 else "right"))
                if abs(dy) >= m:
                    pairs.append((i, j, "v", "above" if dy < 0 else "below"))
    for idx in rng.permutation(len(pairs)):
        i, j, axis, answer = pairs[idx]
        a, b = _question_phrase(i, cands, rng), _question_phrase(j, cands, rng)
        if a and b:
            words = "left or right of" if axis == "h" else "above or below"
            qa.append((f"is {a} {words} {b}?", answer, [i]))
            break
    # existence: one yes and one no per image keeps the answers balanced
    o = objs[int(rng.integers(len(objs)))]
    qa.append((f"is there {article(o.color)} {o.color} {o.kind}?", "yes",
               which(lambda p: p.color == o.color and p.kind == o.kind)))
    pool = cands.absent_hard if cands.absent_hard and rng.random() < 0.7 else cands.absent
    e = pool[int(rng.integers(len(pool)))]
    qa.append((f"is there {article(str(e.desc.color))} {e.desc.color} {e.desc.kind}?", "no", []))
    return qa


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------


def _sentence_record(text: str, sent_id: int, rng: np.random.Generator) -> dict[str, Any]:
    raw = text[0].upper() + text[1:] if rng.random() < 0.3 else text  # as if typed by an annotator
    sent = " ".join(re.sub(r"[^a-z0-9 ]", " ", raw.lower()).split())
    return {"sent_id": sent_id, "sent": sent, "raw": raw, "tokens": sent.split()}


def write_synthref(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 10000,
    n_val: int = 1000,
    n_test: int = 500,
    image_size: int = 128,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate SynthRef under ``out_dir`` (layout in the module docstring).

    Args:
        n_train, n_val: number of images in those splits.
        n_test: number of images in testA and, separately, in testB.
        image_size: side of the square images in pixels (>= 128).
    Returns counts: ``{"images", "annotations", "refs", "sentences", "qa", "splits": {split: {...}}}``.
    The same arguments give byte-identical files.
    """
    if image_size < 128:
        raise ValueError(f"image_size must be >= 128, got {image_size}")
    if min(n_train, n_val, n_test) < 0:
        raise ValueError("image counts must be >= 0")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "synthref").mkdir(parents=True, exist_ok=True)

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    refs: list[dict[str, Any]] = []
    qa_rows: list[dict[str, Any]] = []
    split_counts: dict[str, dict[str, int]] = {}
    next_image, next_ann, next_ref, next_sent = 1, 1, 0, 0
    plan = [("train", n_train), ("val", n_val), ("testA", n_test), ("testB", n_test)]
    bar = tqdm(total=sum(n for _, n in plan), desc="SynthRef", unit="img", disable=not progress)
    for split_index, (split, n_images) in enumerate(plan):
        balancer = _TypeBalancer(_SPLIT_SHARES[split])
        form_balancers = {t: _TypeBalancer(dict.fromkeys(forms, 1 / len(forms))) for t, forms in _SUB_FORMS.items()}
        n_target = n_no_target = n_sents = 0
        for i in range(n_images):
            # one generator per image: image content does not depend on the other split sizes
            rng = np.random.default_rng([seed, split_index, i])
            for _attempt in range(50):
                placed = _sample_objects(rng, image_size)
                objs = [SceneObject(p.kind, p.color, p.size, *mask_centroid(p.visible)) for p in placed]
                cands = _find_candidates(objs, image_size)
                wanted = set(_SPLIT_SHARES[split])
                if any(wanted & set(c) for c in cands.by_object.values()):
                    break  # e.g. a testB image needs at least one relational target
            image_id = next_image
            next_image += 1
            file_name = f"synthref_{split}_{i:06d}.png"
            Image.fromarray(_render_image(rng, placed, image_size)).save(
                out / "images" / file_name, format="PNG", compress_level=1  # speed over size
            )
            images.append({"id": image_id, "file_name": file_name, "width": image_size, "height": image_size})
            ann_ids = []
            for p in placed:
                x1, y1, x2, y2 = mask_to_box(p.visible) or (0.0, 0.0, 0.0, 0.0)
                annotations.append(
                    {
                        "id": next_ann,
                        "image_id": image_id,
                        "category_id": KINDS.index(p.kind) + 1,
                        "segmentation": encode_rle(p.visible),
                        "area": int(np.count_nonzero(p.visible)),
                        "bbox": [x1, y1, x2 - x1, y2 - y1],
                        "iscrowd": 0,
                        "attributes": {"color": p.color, "size": p.size},
                    }
                )
                ann_ids.append(next_ann)
                next_ann += 1

            def add_ref(main: Expr, pool: list[Expr], etype: str, obj_index: int | None) -> None:
                nonlocal next_ref, next_sent, n_sents
                k = int(rng.choice([1, 2, 3], p=[0.25, 0.4, 0.35]))
                texts = _sentences(main, pool, cands.n_peers, rng, k)
                sents = [_sentence_record(t, next_sent + j, rng) for j, t in enumerate(texts)]
                next_sent += len(sents)
                n_sents += len(sents)
                kind = objs[obj_index].kind if obj_index is not None else main.desc.kind
                refs.append(
                    {
                        "ref_id": next_ref,
                        "ann_id": ann_ids[obj_index] if obj_index is not None else -1,
                        "image_id": image_id,
                        "split": split,
                        "category_id": KINDS.index(str(kind)) + 1,
                        "file_name": file_name,
                        "sent_ids": [s["sent_id"] for s in sents],
                        "sentences": sents,
                        "expr_type": etype,
                    }
                )
                next_ref += 1

            for obj_index in rng.permutation(len(objs)):
                by_type = cands.by_object[int(obj_index)]
                etype = balancer.choose(by_type, rng)
                if etype is None:
                    continue
                # pick a sub-form first (colour vs size, left-of vs next-to, ...) so that forms
                # with many valid programs (e.g. "next to") do not swamp the others; all
                # sentences of a ref use the same sub-form
                form = form_balancers[etype].choose({_sub_form(e) for e in by_type[etype]}, rng)
                sub = [e for e in by_type[etype] if _sub_form(e) == form]
                add_ref(sub[int(rng.integers(len(sub)))], sub, etype, int(obj_index))
                n_target += 1

            # no-target refs keep a running share of ~10% of all refs in every split
            for _ in range(2):
                if n_no_target + 1 > _NO_TARGET_SHARE * (n_target + n_no_target + 1) + 0.5:
                    break
                if split == "testA":
                    use_rel = False
                elif split == "testB":
                    use_rel = bool(cands.relational_absent)
                else:
                    use_rel = bool(cands.relational_absent) and rng.random() < 0.5
                if use_rel:
                    pool = cands.relational_absent
                else:
                    pool = cands.absent_hard if cands.absent_hard and rng.random() < 0.7 else cands.absent
                main = pool[int(rng.integers(len(pool)))]
                add_ref(main, [main], "no_target", None)
                n_no_target += 1

            for question, answer, subject in _make_qa(objs, cands, image_size, rng):
                qa_rows.append({"image_id": image_id, "file_name": file_name, "split": split, "question": question,
                                "answer": answer, "ann_ids": [ann_ids[i] for i in subject]})
            bar.update(1)
        split_counts[split] = {
            "images": n_images,
            "refs": n_target + n_no_target,
            "no_target_refs": n_no_target,
            "sentences": n_sents,
        }
    bar.close()

    categories = [{"id": i + 1, "name": k, "supercategory": "shape"} for i, k in enumerate(KINDS)]
    instances = {"images": images, "annotations": annotations, "categories": categories}
    # sorted keys and fixed separators / pickle protocol: same seed -> same bytes
    (out / "synthref" / "instances.json").write_text(json.dumps(instances, sort_keys=True, separators=(",", ":")))
    (out / "synthref" / "qa.json").write_text(json.dumps(qa_rows, sort_keys=True, indent=0))
    with open(out / "synthref" / "refs(unc).p", "wb") as f:
        pickle.dump(refs, f, protocol=4)
    return {
        "images": len(images),
        "annotations": len(annotations),
        "refs": len(refs),
        "sentences": next_sent,
        "qa": len(qa_rows),
        "splits": split_counts,
    }


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m mmseg.data.synthetic OUT_DIR [--seed S] [--n-train N] ...``"""
    ap = argparse.ArgumentParser(description="Write the SynthRef synthetic referring-segmentation dataset.")
    ap.add_argument("out_dir")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--n-train", type=int, default=10000)
    ap.add_argument("--n-val", type=int, default=1000)
    ap.add_argument("--n-test", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=128)
    args = ap.parse_args(argv)
    counts = write_synthref(args.out_dir, args.seed, args.n_train, args.n_val, args.n_test, args.image_size)
    print(json.dumps(counts, indent=1))


if __name__ == "__main__":
    main()
