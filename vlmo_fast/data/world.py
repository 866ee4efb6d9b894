"""The embedded procedural image-text world: seeded scenes, scene graphs, captions, documents,
VQA and NLVR2 items, with an i.i.d. and a compositional held-out split.

Every item is a pure function of (world seed, split, index): the random generator of scene
`index` of split `split` is `numpy.random.default_rng([seed, split_code, index])`, so the same
seed gives the same scenes, captions and pixels on every machine, in every worker, in any
order. Rendering lives in `render.py`; this module holds the semantics.

Scenes: 1-4 objects on a `grid` x `grid` board (one object per cell), each with a shape (6),
a colour (8), a size (3) and a texture (plain / striped / outlined), small jitter inside its
cell, over a dark background (flat noise, gradient or speckle).

Compositional split: `held_out_pairs` are colour+shape combinations that never occur in
"train", "val" or "test"; every scene of "test_comp" contains at least one of them. By
default each colour is held out with exactly one shape (colour i with shape i mod 6), so every
colour and every shape is still seen in training, only not in those combinations.

Captions come with machine-checkable claims (`Caption.claims`), which `check_claims`
evaluates against the scene graph: that is how the tests show captions are true by
construction.
"""
from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

SPLITS = ("train", "val", "test", "test_comp")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2, "test_comp": 3}
# streams drawn from the same scene index but independent of its scene
_STREAM_NLVR2 = 101
_STREAM_VQA = 102

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "ring")
COLOURS = {
    "red": (0.92, 0.12, 0.10), "green": (0.15, 0.78, 0.20), "blue": (0.15, 0.32, 1.00),
    "yellow": (0.97, 0.90, 0.10), "purple": (0.62, 0.18, 0.88), "orange": (1.00, 0.55, 0.05),
    "cyan": (0.10, 0.86, 0.92), "white": (0.96, 0.96, 0.96),
}
SIZES = ("small", "medium", "large")
# half-extent of an object as a fraction of half a grid cell
SIZE_SCALE = {"small": 0.46, "medium": 0.68, "large": 0.94}
TEXTURES = ("plain", "striped", "outlined")
BACKGROUNDS = ("noise", "gradient", "speckle")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")

SIZE_WORDS = {"small": ("small", "little", "tiny"), "medium": ("medium", "medium sized"),
              "large": ("large", "big")}
RELATION_WORDS = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "bigger than": ("bigger than", "larger than"),
    "smaller than": ("smaller than",),
}
RELATIONS = tuple(RELATION_WORDS)


def position_name(row: int, col: int, grid: int) -> str:
    """'top left', 'top', ..., 'center', ... for a 3x3 grid; corners only for 2x2."""
    rows = ("top", "bottom") if grid == 2 else ("top", "middle", "bottom")
    cols = ("left", "right") if grid == 2 else ("left", "center", "right")
    r, c = rows[row], cols[col]
    if grid == 3:
        if r == "middle" and c == "center":
            return "center"
        if r == "middle":
            return c
        if c == "center":
            return r
    return f"{r} {c}"


def position_phrase(pos: str, rng: Optional[np.random.Generator] = None) -> str:
    """'in the center', 'on the left', 'at the top', 'in the top left' / 'at the top left'."""
    if pos == "center":
        return "in the center"
    if pos in ("left", "right"):
        return f"on the {pos}"
    if pos in ("top", "bottom"):
        return f"at the {pos}"
    return f"{'in' if rng is None or rng.random() < 0.5 else 'at'} the {pos}"


@dataclass(frozen=True)
class SceneObject:
    shape: str
    colour: str
    size: str
    texture: str
    row: int
    col: int
    jitter: Tuple[float, float] = (0.0, 0.0)   # centre offset in fractions of a cell (dy, dx)
    shade: float = 1.0                          # brightness factor of the colour

    def attrs(self, grid: int) -> Dict[str, str]:
        return {"shape": self.shape, "colour": self.colour, "size": self.size,
                "texture": self.texture, "position": position_name(self.row, self.col, grid)}


@dataclass(frozen=True)
class Scene:
    """A scene graph: objects with attributes and grid cells, background, render seed."""
    objects: Tuple[SceneObject, ...]
    background: str
    background_colours: Tuple[Tuple[float, float, float], Tuple[float, float, float]]
    grid: int
    render_seed: int
    split: str = "train"
    index: int = 0

    def relations(self) -> List[Tuple[int, str, int]]:
        """Every true pairwise relation (i, relation, j): i is <relation> j."""
        out = []
        for i, a in enumerate(self.objects):
            for j, b in enumerate(self.objects):
                if i != j:
                    out.extend((i, r, j) for r in RELATIONS if relation_holds(a, r, b))
        return out

    def count(self, **attrs) -> int:
        return sum(matches(o, attrs, self.grid) for o in self.objects)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def relation_holds(a: SceneObject, relation: str, b: SceneObject) -> bool:
    if relation == "left of":
        return a.col < b.col
    if relation == "right of":
        return a.col > b.col
    if relation == "above":
        return a.row < b.row
    if relation == "below":
        return a.row > b.row
    rank = SIZES.index
    if relation == "bigger than":
        return rank(a.size) > rank(b.size)
    if relation == "smaller than":
        return rank(a.size) < rank(b.size)
    raise ValueError(f"unknown relation {relation!r}; expected one of {RELATIONS}")


def matches(obj: SceneObject, attrs: Dict[str, str], grid: int) -> bool:
    own = obj.attrs(grid)
    return all(own[k] == v for k, v in attrs.items())


@dataclass(frozen=True)
class Caption:
    """A caption with its claims: ("exists", attrs), ("relation", attrs_a, rel, attrs_b),
    ("count", n, attrs). `check_claims` evaluates them against a scene."""
    text: str
    claims: Tuple[tuple, ...]
    template: str


def check_claims(scene: Scene, claims: Sequence[tuple]) -> bool:
    """True when every claim holds in `scene` (existential reading of object phrases)."""
    objs, g = scene.objects, scene.grid
    for claim in claims:
        kind = claim[0]
        if kind == "exists":
            ok = any(matches(o, claim[1], g) for o in objs)
        elif kind == "relation":
            _, attrs_a, rel, attrs_b = claim
            ok = any(matches(a, attrs_a, g) and matches(b, attrs_b, g) and relation_holds(a, rel, b)
                     for a in objs for b in objs if a is not b)
        elif kind == "count":
            ok = scene.count(**claim[2]) == claim[1]
        else:
            raise ValueError(f"unknown claim kind {kind!r}")
        if not ok:
            return False
    return True


@dataclass
class WorldConfig:
    """Knobs of the embedded world (defaults are what the tests and README run use)."""
    grid: int = 3
    max_objects: int = 4
    # probability of 1, 2, 3, 4 objects (truncated to max_objects and renormalised)
    count_probs: Tuple[float, ...] = (0.3, 0.35, 0.2, 0.15)
    texture_prob: float = 0.25           # probability an object is striped or outlined
    captions_per_image: int = 5
    held_out_pairs: Optional[Tuple[Tuple[str, str], ...]] = None   # None = the default rule
    # default epoch sizes of each split (the loaders' num_samples overrides them)
    split_sizes: Dict[str, int] = field(default_factory=lambda: {
        "train": 20000, "val": 500, "test": 500, "test_comp": 500})

    def __post_init__(self):
        if self.grid not in (2, 3):
            raise ValueError(f"WorldConfig.grid must be 2 or 3, got {self.grid}")
        if not 1 <= self.max_objects <= self.grid * self.grid:
            raise ValueError(f"WorldConfig.max_objects must be in [1, {self.grid ** 2}], "
                             f"got {self.max_objects}")
        if self.captions_per_image < 1:
            raise ValueError(f"WorldConfig.captions_per_image must be >= 1, got {self.captions_per_image}")
        if self.held_out_pairs is None:
            self.held_out_pairs = tuple((c, SHAPES[i % len(SHAPES)]) for i, c in enumerate(COLOURS))
        for c, s in self.held_out_pairs:
            if c not in COLOURS or s not in SHAPES:
                raise ValueError(f"WorldConfig.held_out_pairs: unknown pair {(c, s)}; colours "
                                 f"{tuple(COLOURS)}, shapes {SHAPES}")
        self.held_out_pairs = tuple(tuple(p) for p in self.held_out_pairs)


_TEMPLATES = ("positions", "list", "relation", "there_is", "count_list", "colour_count")
_TEMPLATES_SINGLE = ("positions", "list", "there_is", "count_list", "single")
_TEMPLATE_PERMUTATIONS = {n: list(itertools.permutations(range(n - 2)))
                          for n in (len(_TEMPLATES), len(_TEMPLATES_SINGLE))}


def _pick(rng: np.random.Generator, options: Sequence):
    return options[int(rng.integers(len(options)))]


def _article(words: str) -> str:
    return ("an " if words[0] in "aeiou" else "a ") + words


class EmbeddedWorld:
    """The procedural image-text world. Pure functions of (seed, split, index).

    world = EmbeddedWorld(seed=0)
    scene = world.scene("train", 7)
    img = world.render(scene, img_size=32)            # float32 [3, H, W] in [-1, 1]
    caps = world.captions(scene)                      # list[Caption], captions_per_image of them
    doc = world.document(scene)                       # multi-sentence text (text-only corpus)
    q = world.vqa_item("train", 7)                    # dict question/answer/answer_id/...
    n = world.nlvr2_item("train", 7)                  # dict scenes (2), statement, label
    """

    def __init__(self, seed: int = 0, config: Optional[WorldConfig] = None):
        self.seed = int(seed)
        self.config = config if config is not None else WorldConfig()
        self.held_out = frozenset(self.config.held_out_pairs)
        probs = np.asarray(self.config.count_probs[:self.config.max_objects], dtype=np.float64)
        self._count_probs = probs / probs.sum()
        # inverse-CDF draw of the object count (Generator.choice with p= is slow per call)
        self._count_cdf = np.cumsum(self._count_probs)[:-1]
        self.answer_vocab: List[str] = (list(COLOURS) + list(SHAPES) + list(SIZES)
                                        + [str(n) for n in range(self.config.max_objects + 1)]
                                        + ["yes", "no"]
                                        + [position_name(r, c, self.config.grid)
                                           for r in range(self.config.grid) for c in range(self.config.grid)])
        self.answer_to_id = {a: i for i, a in enumerate(self.answer_vocab)}

    # -- randomness ------------------------------------------------------------------------
    def rng(self, split: str, index: int, stream: int = 0) -> np.random.Generator:
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        return np.random.default_rng([self.seed, SPLIT_CODES[split], int(index), stream])

    def split_size(self, split: str) -> int:
        if split not in SPLIT_CODES:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return int(self.config.split_sizes[split])

    # -- scenes ----------------------------------------------------------------------------
    def scene(self, split: str, index: int) -> Scene:
        rng = self.rng(split, index)
        return self._sample_scene(rng, split, index)

    def _sample_scene(self, rng: np.random.Generator, split: str, index: int) -> Scene:
        cfg = self.config
        n = 1 + int(np.searchsorted(self._count_cdf, rng.random(), side="right"))
        cells = rng.permutation(cfg.grid * cfg.grid)[:n]
        colours, shapes = list(COLOURS), SHAPES
        held = sorted(self.held_out)
        # test_comp: one object (at a random slot) carries a held-out colour+shape pair
        forced_slot = int(rng.integers(n)) if split == "test_comp" else -1
        objects = []
        for k in range(n):
            if k == forced_slot:
                colour, shape = held[int(rng.integers(len(held)))]
            else:
                colour = _pick(rng, colours)
                allowed = shapes if split == "test_comp" else [s for s in shapes if (colour, s) not in self.held_out]
                shape = _pick(rng, allowed)
            texture = "plain" if rng.random() >= cfg.texture_prob else _pick(rng, TEXTURES[1:])
            size = _pick(rng, SIZES)
            jitter = tuple(float(v) for v in rng.uniform(-0.12, 0.12, size=2))
            shade = float(rng.uniform(0.85, 1.0))
            cell = int(cells[k])
            objects.append(SceneObject(shape, colour, size, texture, cell // cfg.grid, cell % cfg.grid,
                                       jitter, shade))
        background = _pick(rng, BACKGROUNDS)
        bg = tuple(tuple(float(v) for v in rng.uniform(0.02, 0.28, size=3)) for _ in range(2))
        render_seed = int(rng.integers(2 ** 31 - 1))
        return Scene(tuple(objects), background, bg, cfg.grid, render_seed, split, int(index))

    def render(self, scene: Scene, img_size: int) -> np.ndarray:
        from .render import render_scene
        return render_scene(scene, img_size)

    # -- language --------------------------------------------------------------------------
    def _object_phrase(self, obj: SceneObject, rng: np.random.Generator, detail: float = 0.5,
                       position: bool = False) -> Tuple[str, Dict[str, str]]:
        """'a small striped red circle' and the attributes it claims."""
        attrs = {"colour": obj.colour, "shape": obj.shape}
        words = [obj.colour, obj.shape]
        if obj.texture != "plain" and rng.random() < 0.7:
            words.insert(0, obj.texture)
            attrs["texture"] = obj.texture
        if rng.random() < detail:
            words.insert(0, _pick(rng, SIZE_WORDS[obj.size]))
            attrs["size"] = obj.size
        text = _article(" ".join(words))
        if position:
            pos = position_name(obj.row, obj.col, self.config.grid)
            text = f"{text} {position_phrase(pos, rng)}"
            attrs["position"] = pos
        return text, attrs

    def caption_templates(self, scene: Scene) -> List[str]:
        """The template of each of the scene's captions (the first two always describe every
        object, or two of them: the most discriminative; the rest in a scene-seeded order)."""
        templates = _TEMPLATES_SINGLE if len(scene.objects) == 1 else _TEMPLATES
        # the order of the other templates: one of their permutations, picked by the scene's
        # seed (cheaper than a random generator per call; every vl item asks for it)
        rest = _TEMPLATE_PERMUTATIONS[len(templates)]
        order = list(templates[:2]) + [templates[2 + i] for i in rest[scene.render_seed % len(rest)]]
        return [order[k % len(order)] for k in range(self.config.captions_per_image)]

    def caption(self, scene: Scene, j: int) -> Caption:
        """Caption j of the scene (its own random stream: no need to build the others)."""
        template = self.caption_templates(scene)[j]
        return self._caption(scene, template, np.random.default_rng([scene.render_seed, 8, j]))

    def captions(self, scene: Scene) -> List[Caption]:
        """`captions_per_image` captions from different templates, true by construction."""
        return [self.caption(scene, j) for j in range(self.config.captions_per_image)]

    def _caption(self, scene: Scene, template: str, rng: np.random.Generator) -> Caption:
        objs, n = scene.objects, len(scene.objects)
        perm = [objs[i] for i in rng.permutation(n)]
        claims = []
        if template == "positions":
            parts = []
            for o in perm[:2] if n > 2 else perm:
                text, attrs = self._object_phrase(o, rng, detail=0.2, position=True)
                parts.append(text)
                claims.append(("exists", attrs))
            text = " and ".join(parts)
        elif template == "list":
            parts = []
            for o in perm:
                t, attrs = self._object_phrase(o, rng, detail=0.5 if n <= 2 else 0.0)
                parts.append(t)
                claims.append(("exists", attrs))
            text = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
        elif template == "count_list":
            parts = []
            for o in perm:
                parts.append(f"{o.colour} {o.shape}")
                claims.append(("exists", {"colour": o.colour, "shape": o.shape}))
            noun = "object" if n == 1 else _pick(rng, ("objects", "shapes"))
            text = f"{NUMBER_WORDS[n]} {noun}: " + ", ".join(parts)
            claims.append(("count", n, {}))
        elif template == "relation":
            rels = scene.relations()
            i, rel, j = rels[int(rng.integers(len(rels)))]
            a, attrs_a = self._object_phrase(objs[i], rng, detail=0.3)
            b, attrs_b = self._object_phrase(objs[j], rng, detail=0.3)
            if rel in ("bigger than", "smaller than"):
                a, b = "the" + a[a.index(" "):], "the" + b[b.index(" "):]
                text = f"{a} is {_pick(rng, RELATION_WORDS[rel])} {b}"
            else:
                text = f"{a} {_pick(rng, RELATION_WORDS[rel])} {b}"
            claims.append(("relation", attrs_a, rel, attrs_b))
        elif template == "there_is":
            o = perm[0]
            t, attrs = self._object_phrase(o, rng, detail=0.6, position=rng.random() < 0.5)
            claims.append(("exists", attrs))
            if n == 1:
                text = f"there is {t}"
            else:
                text = f"there are {NUMBER_WORDS[n]} shapes, one of them is {t}"
                claims.append(("count", n, {}))
        elif template == "colour_count":
            o = perm[0]
            c = scene.count(colour=o.colour)
            noun = "shape" if c == 1 else "shapes"
            t, attrs = self._object_phrase(perm[-1], rng, detail=0.0)
            text = f"{NUMBER_WORDS[c]} {o.colour} {noun} and {t}"
            claims.extend([("count", c, {"colour": o.colour}), ("exists", attrs)])
        elif template == "single":
            o = objs[0]
            t, attrs = self._object_phrase(o, rng, detail=1.0)
            text = f"a single {t[t.index(' ') + 1:]} on a dark background"
            claims.extend([("exists", attrs), ("count", 1, {})])
        else:
            raise ValueError(f"unknown caption template {template!r}")
        return Caption(text, tuple(claims), template)

    def caption_texts(self, scene: Scene) -> List[str]:
        return [c.text for c in self.captions(scene)]

    def reference(self, scene: Scene, obj: SceneObject) -> str:
        """The shortest phrase naming `obj` unambiguously in `scene`: 'the red circle', else
        'the small red circle', else 'the red circle on the left'."""
        if scene.count(colour=obj.colour, shape=obj.shape) == 1:
            return f"the {obj.colour} {obj.shape}"
        if scene.count(colour=obj.colour, shape=obj.shape, size=obj.size) == 1:
            return f"the {obj.size} {obj.colour} {obj.shape}"
        return f"the {obj.colour} {obj.shape} {position_phrase(position_name(obj.row, obj.col, scene.grid))}"

    def document(self, scene: Scene) -> str:
        """A multi-sentence description of the scene (the text-only stage's corpus)."""
        rng = np.random.default_rng([scene.render_seed, 11])
        objs, n = scene.objects, len(scene.objects)
        bg = {"noise": "a dark noisy", "gradient": "a dark gradient", "speckle": "a dark speckled"}
        sents = [f"the picture shows {NUMBER_WORDS[n]} {'object' if n == 1 else 'objects'} "
                 f"on {bg[scene.background]} background."]
        for o in objs:
            t, _ = self._object_phrase(o, rng, detail=1.0, position=False)
            pos = position_name(o.row, o.col, scene.grid)
            verb = _pick(rng, ("is", "sits", "lies"))
            sents.append(f"{t} {verb} {position_phrase(pos, rng)}.")
        rels = scene.relations()
        for r in rng.permutation(len(rels))[:3]:
            i, rel, j = rels[int(r)]
            sents.append(f"{self.reference(scene, objs[i])} is {_pick(rng, RELATION_WORDS[rel])} "
                         f"{self.reference(scene, objs[j])}.")
        colour_counts = sorted({o.colour for o in objs})
        c = colour_counts[int(rng.integers(len(colour_counts)))]
        k = scene.count(colour=c)
        sents.append(f"there {'is' if k == 1 else 'are'} {NUMBER_WORDS[k]} {c} "
                     f"{'shape' if k == 1 else 'shapes'} in total.")
        return " ".join(sents)

    def corpus(self, split: str = "train", num_documents: int = 2000,
               captions: bool = True) -> List[str]:
        """Texts of the first scenes of `split`: documents (and captions) for tokenizer training."""
        texts = []
        for i in range(num_documents):
            scene = self.scene(split, i)
            texts.append(self.document(scene))
            if captions:
                texts.extend(self.caption_texts(scene))
        return texts

    # -- VQA -------------------------------------------------------------------------------
    def vqa_questions(self, scene: Scene) -> List[Tuple[str, str, str]]:
        """Every question this scene answers: (question, answer, question_type)."""
        objs, g = scene.objects, scene.grid
        out = []
        for o in objs:
            pos = position_name(o.row, o.col, g)
            where = position_phrase(pos)
            out.append((f"what colour is the shape {where}?", o.colour, "colour"))
            out.append((f"what shape is {where}?", o.shape, "shape"))
            if scene.count(colour=o.colour, shape=o.shape) == 1:
                out.append((f"how big is the {o.colour} {o.shape}?", o.size, "size"))
                out.append((f"where is the {o.colour} {o.shape}?", pos, "position"))
        out.append(("how many objects are there?", str(len(objs)), "count"))
        for c in COLOURS:
            out.append((f"how many {c} shapes are there?", str(scene.count(colour=c)), "count"))
        for s in SHAPES:
            yes = scene.count(shape=s) > 0
            out.append((f"is there a {s}?", "yes" if yes else "no", "exists"))
        for i, a in enumerate(objs):
            for j, b in enumerate(objs):
                if i == j or scene.count(colour=a.colour, shape=a.shape) != 1 \
                        or scene.count(colour=b.colour, shape=b.shape) != 1:
                    continue
                for rel in ("left of", "above", "bigger than"):
                    ans = "yes" if relation_holds(a, rel, b) else "no"
                    word = RELATION_WORDS[rel][0]
                    out.append((f"is the {a.colour} {a.shape} {word} the {b.colour} {b.shape}?",
                                ans, "relation"))
        return out

    def vqa_item(self, split: str, index: int) -> dict:
        """One question about scene `index`: the question type is drawn uniformly first (so
        count and yes/no questions do not swamp the rest), then a question of that type."""
        scene = self.scene(split, index)
        rng = self.rng(split, index, _STREAM_VQA)
        qs = self.vqa_questions(scene)
        types = sorted({t for _, _, t in qs})
        qtype = types[int(rng.integers(len(types)))]
        pool = [q for q in qs if q[2] == qtype]
        question, answer, qtype = pool[int(rng.integers(len(pool)))]
        return {"scene": scene, "question": question, "answer": answer,
                "answer_id": self.answer_to_id[answer], "question_type": qtype}

    # -- NLVR2 -----------------------------------------------------------------------------
    def nlvr2_item(self, split: str, index: int) -> dict:
        """Two scenes (2*index and 2*index+1 of an NLVR2 stream of `split`) and a statement
        about them; labels are balanced: the target label is drawn first."""
        rng = self.rng(split, index, _STREAM_NLVR2)
        left = self._sample_scene(self.rng(split, index, _STREAM_NLVR2 + 1), split, 2 * index)
        right = self._sample_scene(self.rng(split, index, _STREAM_NLVR2 + 2), split, 2 * index + 1)
        want = bool(rng.random() < 0.5)
        candidates = self._nlvr2_statements(left, right, rng)
        pool = [s for s in candidates if s[1] == want] or candidates
        statement, label = pool[int(rng.integers(len(pool)))]
        return {"scenes": (left, right), "statement": statement, "label": int(label)}

    def _nlvr2_statements(self, left: Scene, right: Scene, rng) -> List[Tuple[str, bool]]:
        out = []
        both = left.objects + right.objects
        colours = sorted({o.colour for o in both} | {_pick(rng, list(COLOURS))})
        shapes = sorted({o.shape for o in both} | {_pick(rng, SHAPES)})
        for c in colours:
            for s in shapes:
                in_l, in_r = left.count(colour=c, shape=s) > 0, right.count(colour=c, shape=s) > 0
                out.append((f"the left image contains a {c} {s}", in_l))
                out.append((f"the right image contains a {c} {s}", in_r))
                out.append((f"both images contain a {c} {s}", in_l and in_r))
        for c in colours:
            total = left.count(colour=c) + right.count(colour=c)
            out.append((f"there are exactly {NUMBER_WORDS[min(total, 8)]} {c} shapes in total", True))
            wrong = (total + 1 + int(rng.integers(2))) % 5
            if wrong != total:
                out.append((f"there are exactly {NUMBER_WORDS[wrong]} {c} shapes in total", False))
        nl, nr = len(left.objects), len(right.objects)
        out.append(("the left image has more objects than the right image", nl > nr))
        out.append(("the right image has more objects than the left image", nr > nl))
        out.append(("both images have the same number of objects", nl == nr))
        return out
