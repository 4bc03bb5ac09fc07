"""A synthetic, ScienceQA-format multimodal multiple-choice set for the embedded testbed.

Each sample is a small RGB scene (a 2x2 grid of cells, 1-4 coloured shapes of two sizes) with a question,
lettered choices and an answer index, in one of five categories (like ScienceQA's per-subject columns):

    colour      "what colour is the circle ?"                     4 choices (colours)
    shape       "what shape is the red object ?"                  4 choices (shapes)
    count       "how many objects are there ?"                    4 choices (numbers)
    position    "where is the blue square ?"                      4 choices (cells)
    comparison  "is the red circle bigger than the blue cross ?"  2 choices (yes / no)

Each category has ONE fixed option list in canonical order (like the yes/no and fixed-option questions of real
benchmarks): the prompt protocol is ScienceQA's (lettered choices, the answer is a letter), but the letter is a
function of the answer. Why: with shuffled options, a 1.7 M-parameter LLaVA trained on 2 CPU cores has to learn
an induction/copy step (find the answer among the options, emit its letter) that it picked up only very late --
39 % test accuracy (chance 30 %) after 3,500 steps in our first recipe, and still < 50 % after 5,500 steps with
auxiliary tasks. Fixed options keep every other part of the task (reading the image, resolving the question).

Chance accuracy = (4 x 1/4 + 1/2) / 5 = 30 %. Every split is generated deterministically from (seed, split):
the same seed always gives the same images, questions and answers, and the splits use disjoint random streams.
"""
from __future__ import annotations

import functools

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle", "cross")
SIZES = ("small", "large")
CELLS = ("top left", "top right", "bottom left", "bottom right")
NUMBERS = ("one", "two", "three", "four")
CATEGORIES = ("colour", "shape", "count", "position", "comparison")
SPLITS = {"train": 20000, "val": 500, "test": 1000}      # default sizes
_SPLIT_STREAM = {"train": 1, "val": 2, "test": 3}       # disjoint random streams per split

IMAGE_SIZE = 32                                          # pixels; the testbed's CLIP uses 16-px patches = the 2x2 cells
_SIZE_PX = {"small": 7, "large": 13}


def _draw(img: np.ndarray, cell: int, colour: str, shape: str, size: str, rng) -> None:
    """Draw one shape into cell 0..3 of the (H, W, 3) uint8 canvas, with a little positional jitter."""
    h = img.shape[0] // 2
    s = _SIZE_PX[size]
    cy0, cx0 = (cell // 2) * h, (cell % 2) * h
    oy, ox = rng.integers(0, h - s + 1, size=2)
    yy, xx = np.mgrid[0:s, 0:s]
    c = (s - 1) / 2
    if shape == "square":
        m = np.ones((s, s), bool)
    elif shape == "circle":
        m = (yy - c) ** 2 + (xx - c) ** 2 <= (s / 2) ** 2
    elif shape == "triangle":
        m = np.abs(xx - c) <= yy / 2 + 0.5
    else:  # cross
        w = max(1, s // 4)
        m = (np.abs(yy - c) < w) | (np.abs(xx - c) < w)
    rgb = np.array(COLOURS[colour]) + rng.integers(-20, 21, size=3)
    img[cy0 + oy: cy0 + oy + s, cx0 + ox: cx0 + ox + s][m] = np.clip(rgb, 0, 255)


def _scene(rng):
    n = int(rng.integers(1, 5))
    cells = rng.permutation(4)[:n]
    objs = [dict(cell=int(c), colour=str(rng.choice(list(COLOURS))), shape=str(rng.choice(SHAPES)),
                 size=str(rng.choice(SIZES))) for c in cells]
    img = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8) + rng.integers(0, 30, size=(1, 1, 3), dtype=np.uint8)
    for o in objs:
        _draw(img, o["cell"], o["colour"], o["shape"], o["size"], rng)
    noise = rng.integers(-8, 9, size=img.shape)
    return np.clip(img.astype(int) + noise, 0, 255).astype(np.uint8), objs


def _choices(rng, correct: str, pool):
    """The category's fixed option list, in canonical order, and the answer's index in it."""
    choices = list(pool)
    return choices, choices.index(correct)


def _question(rng, objs, category: str):
    """(question, choices, answer) for `category`, or None if the scene cannot support it."""
    if category == "colour":
        shapes = [o["shape"] for o in objs]
        uniq = [o for o in objs if shapes.count(o["shape"]) == 1]
        if not uniq:
            return None
        o = uniq[rng.integers(len(uniq))]
        return (f"what colour is the {o['shape']} ?", *_choices(rng, o["colour"], list(COLOURS)))
    if category == "shape":
        cols = [o["colour"] for o in objs]
        uniq = [o for o in objs if cols.count(o["colour"]) == 1]
        if not uniq:
            return None
        o = uniq[rng.integers(len(uniq))]
        return (f"what shape is the {o['colour']} object ?", *_choices(rng, o["shape"], SHAPES))
    if category == "count":
        return ("how many objects are there ?", *_choices(rng, NUMBERS[len(objs) - 1], NUMBERS))
    if category == "position":
        o = objs[rng.integers(len(objs))]
        return (f"where is the {o['colour']} {o['shape']} ?", *_choices(rng, CELLS[o["cell"]], CELLS))
    if category == "comparison":
        pairs = [(a, b) for a in objs for b in objs if a is not b and (a["colour"], a["shape"]) != (b["colour"], b["shape"])]
        if not pairs:
            return None
        a, b = pairs[rng.integers(len(pairs))]
        bigger = _SIZE_PX[a["size"]] > _SIZE_PX[b["size"]]
        choices = ["yes", "no"]
        return (f"is the {a['colour']} {a['shape']} bigger than the {b['colour']} {b['shape']} ?",
                choices, choices.index("yes" if bigger else "no"))
    raise ValueError(category)


def describe(objs) -> str:
    """A caption listing every object (used as an auxiliary target when training the testbed)."""
    return " ; ".join(f"{CELLS[o['cell']]} {o['size']} {o['colour']} {o['shape']}" for o in sorted(objs, key=lambda o: o["cell"]))


def generate(split: str, n: int | None = None, seed: int = 0) -> list[dict]:
    """Deterministic samples for `split`: dicts with image (H, W, 3) uint8, question, choices, answer, category,
    split, id, caption. Categories are balanced (round-robin). Up to MEMO_MAX samples are memoised per
    (split, n, seed) (experiments draw the same calibration pool and eval prefix run after run): every call returns
    fresh dicts; their images are shared read-only arrays."""
    n = SPLITS[split] if n is None else n
    made = _memo(split, n, seed) if n <= MEMO_MAX else _generate(split, n, seed)
    return [dict(s, choices=list(s["choices"])) for s in made]


def _generate(split: str, n: int, seed: int) -> tuple[dict, ...]:
    rng = np.random.default_rng([seed, _SPLIT_STREAM[split]])
    out = []
    i = 0
    while len(out) < n:
        category = CATEGORIES[i % len(CATEGORIES)]
        img, objs = _scene(rng)
        q = _question(rng, objs, category)
        if q is None:
            continue
        question, choices, answer = q
        img.setflags(write=False)
        out.append(dict(id=f"{split}-{len(out)}", image=img, question=question, choices=choices, answer=int(answer),
                        category=category, split=split, caption=describe(objs)))
        i += 1
    return tuple(out)


MEMO_MAX = 2000
_memo = functools.lru_cache(maxsize=8)(_generate)


def vocabulary() -> list[str]:
    """Every word the generator can emit (questions, choices, captions), for the testbed tokenizer."""
    words = set("what colour is the shape object how many objects are there where bigger than yes no ; ? describe image which option a word".split())
    words |= set(COLOURS) | set(SHAPES) | set(SIZES) | set(NUMBERS) | {w for c in CELLS for w in c.split()}
    return sorted(words)
