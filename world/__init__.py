"""The shapes world: the CartPole of text-to-image RL.

A synthetic world of procedurally rendered 32x32 images with captions (coloured circles, squares and
triangles on a grey background, one or two objects placed anywhere), a small text-to-image model of it
pretrained in Stable Diffusion's architecture (`--model shapes`, made by `python -m world.pretrain`), and a
weight-free compositional reward in the spirit of T2I-CompBench's attribute binding (`--reward shapes`).

Everything here is deterministic from a seed and needs no files; docs/world.md has the figures.

    from world import render, parse, analyse, reward
    images, captions = render(np.random.default_rng(0), 8)     # (8, 3, 32, 32) float32 in [0, 1]
    reward(torch.from_numpy(images), captions)                 # (8,) near 1 for rendered ground truth
"""

import itertools
import math
import re
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

import cli
import common

SIZE = 32  # image side in pixels
BACKGROUND = (0.5, 0.5, 0.5)
# Six saturated colours, far from each other and from the grey background.
COLORS = {"red": (0.9, 0.1, 0.1), "green": (0.1, 0.8, 0.1), "blue": (0.1, 0.2, 0.9),
          "yellow": (0.95, 0.9, 0.1), "magenta": (0.9, 0.1, 0.9), "cyan": (0.1, 0.85, 0.9)}
SHAPES = ("circle", "square", "triangle")
MODEL_DIR = common.SHAPES_DIR  # the pretrained model, diffusers' folder layout (world/shapes)


class Obj(NamedTuple):
    color: str
    shape: str


# ----------------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------------


def shape_mask(shape: str, cx, cy, s, xs, ys):
    """Inside-test of an ideal shape of bounding-box side s centred at (cx, cy), at points (xs, ys).

    Broadcasts: cx, cy, s of shape (N, 1, 1) against xs, ys of shape (1, H, W). The triangle points up:
    apex at the top centre, base along the bottom edge of the box.
    """
    dx, dy, h = xs - cx, ys - cy, s / 2
    if shape == "circle":
        return dx**2 + dy**2 <= h**2
    if shape == "square":
        return (np.abs(dx) <= h) & (np.abs(dy) <= h)
    if shape == "triangle":
        return (dy <= h) & (np.abs(dx) <= (dy + h) / 2)
    raise ValueError(shape)


def caption(objs: Sequence[Obj]) -> str:
    """'a red circle' or 'a red circle and a blue square' (in the order given)."""
    return " and ".join(f"a {o.color} {o.shape}" for o in objs)


def draw(scenes, supersample: int = 4) -> np.ndarray:
    """Render scenes, each a list of (Obj, cx, cy, side) in pixels, to (N, 3, SIZE, SIZE) float32 in [0, 1].

    Anti-aliased by supersampling: each pixel's colour is the area-weighted mix of what covers it, later
    objects drawn over earlier ones.
    """
    n, k = len(scenes), supersample
    grid = (np.arange(SIZE * k) + 0.5) / k  # sub-pixel centres in pixel units
    ys, xs = grid[None, :, None], grid[None, None, :]
    canvas = np.empty((n, SIZE * k, SIZE * k, 3), np.float32)
    canvas[:] = BACKGROUND
    for i, scene in enumerate(scenes):
        for obj, cx, cy, side in scene:
            m = shape_mask(obj.shape, cx, cy, side, xs, ys)[0]
            canvas[i][m] = COLORS[obj.color]
    images = canvas.reshape(n, SIZE, k, SIZE, k, 3).mean(axis=(2, 4))
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2))


def random_scene(rng: np.random.Generator, objs: Sequence[Obj]):
    """Place the objects anywhere at random sizes, bounding boxes at least 2 px apart and inside the image."""
    one = len(objs) == 1
    for _ in range(1000):
        scene = []
        for obj in objs:
            side = rng.uniform(11.0, 18.0) if one else rng.uniform(9.0, 14.0)
            cx, cy = rng.uniform(side / 2 + 1, SIZE - side / 2 - 1, size=2)
            scene.append((obj, cx, cy, side))
        if all(max(abs(a[1] - b[1]) - (a[3] + b[3]) / 2, abs(a[2] - b[2]) - (a[3] + b[3]) / 2) >= 2
               for a, b in itertools.combinations(scene, 2)):
            return scene
    raise RuntimeError("could not place the objects")


def random_objects(rng: np.random.Generator, n: int) -> list:
    """n objects with distinct colours and distinct shapes (so that binding is what a prompt tests)."""
    colors = rng.choice(list(COLORS), size=n, replace=False)
    shapes = rng.choice(SHAPES, size=n, replace=False)
    return [Obj(str(c), str(s)) for c, s in zip(colors, shapes)]


def render(rng: np.random.Generator, n: int, p_two: float = 0.5):
    """n random images with their captions: one object, or two with probability `p_two` (caption order random)."""
    scenes = [random_scene(rng, random_objects(rng, 2 if rng.random() < p_two else 1)) for _ in range(n)]
    return draw(scenes), [caption([obj for obj, *_ in scene]) for scene in scenes]


# ----------------------------------------------------------------------------------------------------
# Prompt sets: every single object, and the two-object combinations split into train and held-out eval
# ----------------------------------------------------------------------------------------------------

SINGLE = [caption([Obj(c, s)]) for c in COLORS for s in SHAPES]  # 18


def _pairs():
    """The 90 unordered pairs of objects with distinct colours and distinct shapes, in a fixed order."""
    objs = [Obj(c, s) for c in COLORS for s in SHAPES]
    return [(a, b) for a, b in itertools.combinations(objs, 2) if a.color != b.color and a.shape != b.shape]


def _split():
    """A fixed third of the pairs held out for evaluation, chosen so each colour and each shape appears in
    both sets (T2I-CompBench also keeps its train and validation prompts apart)."""
    pairs = _pairs()
    order = np.random.default_rng(2024).permutation(len(pairs))
    held = {int(i) for i in order[: len(pairs) // 3]}
    train = [caption(p) for i, p in enumerate(pairs) if i not in held]
    evaluation = [caption(p) for i, p in enumerate(pairs) if i in held]
    return train, evaluation


PAIRS_TRAIN, PAIRS_EVAL = _split()  # 60 and 30 two-object prompts, disjoint as sets of objects


# ----------------------------------------------------------------------------------------------------
# The compositional reward: per noun phrase "a <colour> <shape>", is there a region of that colour with
# that shape? Computed from pixels alone.
# ----------------------------------------------------------------------------------------------------

PHRASE = re.compile(r"\b(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b")
COLOR_CREDIT = 0.25  # a phrase whose colour is present but whose shape is wrong earns this much
EXTRA_PENALTY = 0.5  # each object beyond those the prompt names divides the score by (1 + 0.5 * extras)
TEMPERATURE = 0.03  # softness of the shape decision on intersection-over-union with ideal templates
NONE_IOU = 0.6  # a region that matches no template better than this is "no shape"
MIN_AREA = 8  # regions smaller than this many pixels (at 32x32) are specks, not objects
COLOR_RADIUS = 0.3  # a pixel belongs to a colour if it is within this RGB distance of it
BLEND_RADIUS = 0.15  # a pixel this close to a mix of the background and one palette colour is an object's edge
ASPECT_MIN = 0.75  # every named shape has a square bounding box: a flatter box scales its IoU by aspect / ASPECT_MIN
OTHER = "other"  # the colour of a region of non-background pixels that matches no palette colour


def parse(prompt: str) -> list:
    """The objects a prompt names: 'a blue square and a yellow triangle' -> [Obj(blue, square), Obj(yellow,
    triangle)]."""
    return [Obj(c, s) for c, s in PHRASE.findall(prompt.lower())]


def _components(masks: torch.Tensor) -> torch.Tensor:
    """Connected components (8-neighbourhood) of binary masks (N, H, W) by label propagation: every pixel
    takes the largest label around it until nothing changes. Returns int labels, 0 = background."""
    n, h, w = masks.shape
    index = torch.arange(1, h * w + 1, dtype=torch.float32).view(1, h, w)
    labels = torch.where(masks, index, 0.0)
    for _ in range(h * w):
        grown = F.max_pool2d(labels.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) * masks
        if torch.equal(grown, labels):
            break
        labels = grown
    return labels.long()


def _templates(y0: int, x0: int, hgt: int, wid: int) -> torch.Tensor:
    """Ideal circle, square and triangle filling a bounding box of hgt x wid pixels: (3, hgt, wid) bool
    masks, sampled at pixel centres (an ellipse / rectangle / triangle when the box is not square)."""
    ys = (np.arange(hgt) + 0.5)[None, :, None] / hgt * 2 - 1  # box coordinates in [-1, 1]
    xs = (np.arange(wid) + 0.5)[None, None, :] / wid * 2 - 1
    masks = [shape_mask(s, 0.0, 0.0, 2.0, xs, ys)[0] for s in SHAPES]
    return torch.from_numpy(np.stack(masks))


class Region(NamedTuple):
    color: str
    area: int
    shape_probs: dict  # shape -> probability, plus "none"


def regions(image: torch.Tensor) -> list:
    """The objects in one image (3, H, W) in [0, 1]: its connected regions of each palette colour with at
    least MIN_AREA pixels (scaled with the image size), each with its soft shape decision."""
    return analyse(image[None])[0]


def analyse(images: torch.Tensor) -> list:
    """Regions of a batch (B, 3, H, W) in [0, 1] (see `regions`). One call per reward batch, on the CPU.

    Besides the palette colours' regions, the connected regions of off-palette pixels (far from every palette colour,
    from the background and from every mix of the background with one palette colour, which is what an object's
    anti-aliased or blurred edge is) of at least MIN_AREA pixels are objects too, of colour OTHER: an extra object
    that no prompt names."""
    x = images.detach().float().cpu()
    b, _, h, w = x.shape
    palette = torch.tensor(list(COLORS.values()) + [BACKGROUND], dtype=torch.float32)  # (7, 3)
    pixels = x.permute(0, 2, 3, 1).reshape(b, h * w, 3)
    dist = torch.cdist(pixels, palette.expand(b, -1, -1))  # (B, HW, 7)
    best, label = dist.min(dim=2)
    # distance to the segments background -> colour: t the projection, clamped to the segment
    grey, spokes = palette[-1], palette[:-1] - palette[-1]  # (3,), (6, 3)
    t = ((pixels - grey) @ spokes.T / (spokes**2).sum(1)).clamp(0, 1)  # (B, HW, 6)
    blend = (pixels[:, :, None] - grey - t[..., None] * spokes).norm(dim=-1).min(dim=2).values  # (B, HW)
    label = torch.where(best < COLOR_RADIUS, label, torch.where(blend < BLEND_RADIUS, -1, len(palette)))
    label = label.view(b, h, w)  # 0-5 palette colours, 6 background, 7 off-palette, -1 an edge
    names = [*COLORS, OTHER]
    masks = torch.stack([label == i for i in (*range(len(COLORS)), len(palette))], dim=1)  # (B, 7, H, W)
    comps = _components(masks.view(-1, h, w)).view(b, len(names), h, w)
    min_area = max(1, round(MIN_AREA * h * w / SIZE**2))
    out = []
    for i in range(b):
        found = []
        for c, name in enumerate(names):
            ids, counts = comps[i, c].unique(return_counts=True)
            for k, area in zip(ids.tolist(), counts.tolist()):
                if k == 0 or area < min_area:
                    continue
                found.append(Region(name, area, {} if name == OTHER else _shape_probs(comps[i, c] == k)))
        out.append(found)
    return out


def _shape_probs(mask: torch.Tensor) -> dict:
    """softmax over {circle, square, triangle, none} of IoU(region, ideal shape in its bounding box) / T,
    with 'none' at a fixed IoU of NONE_IOU: a clean shape wins clearly, a blob spreads its mass.

    The templates stretch to the box, which keeps a blurred edge's one-pixel error cheap, but every named shape is
    equal-sided: a box flatter than ASPECT_MIN (short side / long side) scales each IoU by aspect / ASPECT_MIN, so a
    bar is 'none', not a confident square."""
    rows, cols = mask.any(dim=1).nonzero().flatten(), mask.any(dim=0).nonzero().flatten()
    y0, y1, x0, x1 = rows[0].item(), rows[-1].item() + 1, cols[0].item(), cols[-1].item() + 1
    box = mask[y0:y1, x0:x1]
    tpl = _templates(y0, x0, y1 - y0, x1 - x0)
    iou = (tpl & box).sum(dim=(1, 2)).float() / (tpl | box).sum(dim=(1, 2)).float()
    iou = iou * min(1.0, min(y1 - y0, x1 - x0) / max(y1 - y0, x1 - x0) / ASPECT_MIN)
    logits = torch.cat([iou, torch.tensor([NONE_IOU])]) / TEMPERATURE
    probs = torch.softmax(logits, dim=0).tolist()
    return dict(zip(SHAPES + ("none",), probs))


def score(found: Sequence[Region], objs: Sequence[Obj]) -> tuple:
    """(reward in [0, 1], correct as bool) of one image's regions against the objects its prompt names.

    Each named object earns max over the regions of its colour of COLOR_CREDIT + (1 - COLOR_CREDIT) *
    P(region has the named shape), and 0 if its colour is absent; the reward is the PRODUCT over the named objects,
    as T2I-CompBench combines its per-phrase scores (`reward_final *= reward[:, i]`), divided by
    (1 + EXTRA_PENALTY * extras) for regions (off-palette ones included) beyond the number of named objects. A
    missing object, or one colour drawn twice where two are named, scores 0; swapped colours COLOR_CREDIT^2.
    `correct` is the strict judgement: exactly the named objects, each the most probable shape.
    """
    per_obj, correct = [], len(found) == len(objs)
    for obj in objs:
        mine = [r for r in found if r.color == obj.color]
        per_obj.append(max((COLOR_CREDIT + (1 - COLOR_CREDIT) * r.shape_probs[obj.shape] for r in mine), default=0.0))
        correct &= any(max(r.shape_probs, key=r.shape_probs.get) == obj.shape for r in mine)
    extras = max(0, len(found) - len(objs))
    return math.prod(per_obj) / (1 + EXTRA_PENALTY * extras), bool(correct)


def parse_all(prompts: Sequence[str]) -> list:
    objs = [parse(p) for p in prompts]
    for p, o in zip(prompts, objs):
        if not o:
            cli.fail(f"the shapes reward needs prompts that name '<colour> <shape>' objects ({', '.join(COLORS)}; "
                        f"{', '.join(SHAPES)}); {p!r} names none (use --prompts shapes)")
    return objs


def check_inputs(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Which images are finite, (B,) bool, after checking that `images` is (B, 3, H, W) with values in [0, 1] and
    that there is one prompt per image (a mismatch was silently truncated, a 0-255 image scored 0.0): ValueError."""
    if not (isinstance(images, torch.Tensor) and images.dim() == 4 and images.shape[1] == 3):
        raise ValueError(f"images must be a (B, 3, H, W) tensor, not {getattr(images, 'shape', type(images).__name__)}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"{images.shape[0]} images and {len(prompts)} prompts: give one prompt per image")
    finite = torch.isfinite(images).flatten(1).all(1)
    values = images[finite]
    if values.numel() and not (values.min() >= 0 and values.max() <= 1):
        raise ValueError(f"image values must be in [0, 1], not [{values.min().item():g}, {values.max().item():g}] "
                         f"(divide 0-255 images by 255)")
    return finite


def reward(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """The compositional reward, (B,) float32 in [0, 1] on the images' device (see `score`); NaN for an image that is
    not finite (a diverged model: the scripts' reward check names it), not a score of nothing drawn."""
    finite = check_inputs(images, prompts)
    objs = parse_all(prompts)
    values = [score(found, o)[0] for found, o in zip(analyse(images.nan_to_num(0.0)), objs)]
    return torch.where(finite, torch.tensor(values, dtype=torch.float32, device=images.device), torch.nan)


def judge(images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
    """Strict correctness per image, (B,) bool: exactly the named objects, each of the named shape. Images that are
    not finite cannot be judged: ValueError."""
    if not check_inputs(images, prompts).all():
        raise ValueError("some images are not finite (a diverged model); they cannot be judged")
    objs = parse_all(prompts)
    return torch.tensor([score(found, o)[1] for found, o in zip(analyse(images), objs)])
