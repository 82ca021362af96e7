"""Synthetic BLINK subtasks with known answers, in BLINK's layout: correspondence, multi-view and counting
questions drawn from the synthetic world (the style-match triples are `sightline.data.blink.style_triples`).

- **Visual_Correspondence** (`correspondence_pairs`): image_1 is a window of a wide scene, image_2 another
  window of it, shifted and rescaled (the camera moved); the reference point (a ring labelled "REF" on
  image_1) is inside an object, and of the four points drawn on image_2 (rings labelled A-D) the right one
  is the same scene point; the others lie on other objects or the background, at least 1.5 of the
  organism's tokens away from it and from each other. No object is red or orange (the markers' colour).
- **Multi-view_Reasoning** (`view_pairs`): two windows of one wide scene, the second shifted horizontally
  by 1/8 to 1/4 of the width. The answer follows the rule the readout uses (`sightline.kv.surfacing`):
  content moving left in the frame is "left" (a camera orbiting clockwise sees the background behind
  the object move the way it moves). The fixture checks the matching, not that rule.
- **Counting** (`count_scenes`): "How many objects are there?" with choices 1-4 in a random order (the
  choice texts recur across questions, so a probe reads them as classes).

`write_blink_fixture(root, ...)` writes the subtasks asked for (and Art_Style) as ROOT/<Subtask>/<split>-
00000-of-00001.parquet; with `points=True` the correspondence points also go to the sidecar file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from sightline.data.blink import (
    LETTERS,
    draw_marker,
    write_style_fixture,
    write_subtask,
)

VISUAL_CORRESPONDENCE_QUESTION = (
    "A point is circled on the first image, labeled with REF. We change the camera position or lighting and shoot "
    'the second image. You are given multiple red-circled points on the second image, choices of "A, B, C, D" are '
    "drawn beside each circle. Which point on the second image corresponds to the point in the first image?")
MULTIVIEW_QUESTION = (
    "The images are frames from a video. The video is shooting a static scene. The camera is either moving "
    "clockwise (left) or counter-clockwise (right) around the object. The first image is from the beginning of "
    "the video and the second image is from the end. Is the camera moving left or right when shooting the video?")
COUNT_QUESTION = "How many objects are there?"
FIXTURE_SUBTASKS = ("Art_Style", "Visual_Correspondence", "Multi-view_Reasoning", "Counting")
MARKER_FREE_COLOURS = ("green", "blue", "yellow", "purple", "cyan", "white")  # none reads as the marker red
TOKENS_PER_SIDE = 8  # the organism's grid: the fixture keeps points 1.5 tokens apart


def _interior(mask: np.ndarray) -> tuple[float, float] | None:
    """(x, y) of the pixel of `mask` farthest from its border (its pixel centre); None for an empty mask."""
    from scipy import ndimage

    if not mask.any():
        return None
    d = ndimage.distance_transform_edt(mask)
    y, x = np.unravel_index(int(np.argmax(d)), d.shape)
    return float(x) + 0.5, float(y) + 0.5


def correspondence_pairs(seed: int, n: int, image_size: int = 224) -> list[dict[str, Any]]:
    """n Visual_Correspondence questions (see the module docstring). Each: {"images": [image_1, image_2]
    (PIL, markers drawn), "answer": index of the right point, "points": {"ref": (x, y), "choices": [(x, y)
    x 4]} (the drawn centres), "choices": ["Point A", ..., "Point D"], "question"}. Reproducible from `seed`."""
    from PIL import Image

    from sightline.data.synthetic import WorldConfig, derive_seed, render_scene

    s_img = image_size
    extra = s_img // 4
    token = s_img / TOKENS_PER_SIDE
    margin = 28 * s_img / 224
    world = WorldConfig(image_size=(s_img, s_img + extra), colours=MARKER_FREE_COLOURS, count_probs=(0, 0, 0.5, 0.5))
    out: list[dict[str, Any]] = []
    attempt = 0
    while len(out) < n:
        rng = np.random.default_rng([seed, len(out), attempt, 0xC0])
        scene = render_scene(derive_seed(seed, "blink-corr", len(out), attempt), world)
        attempt += 1
        x0 = int(rng.integers(0, extra + 1))
        side = round(s_img * rng.uniform(0.8, 1.0))
        bx, by = int(rng.integers(0, s_img + extra - side + 1)), int(rng.integers(0, s_img - side + 1))
        scale = s_img / side

        def in1(p, x0=x0):
            return margin <= p[0] - x0 <= s_img - margin and margin <= p[1] <= s_img - margin

        def to2(p, bx=bx, by=by, scale=scale):
            return (p[0] - bx) * scale, (p[1] - by) * scale

        def in2(q):
            return margin <= q[0] <= s_img - margin and margin <= q[1] <= s_img - margin

        inst = scene.instance_mask
        centres = [_interior(inst == 1 + k) for k in range(len(scene.objects))]
        objs = [k for k, c in enumerate(centres) if c is not None and in1(c) and in2(to2(c))]
        if not objs:
            continue
        ref_obj = int(rng.choice(objs))
        ref = centres[ref_obj]
        truth = to2(ref)
        pool = [to2(c) for k, c in enumerate(centres) if c is not None and k != ref_obj]
        pool += [tuple(v) for v in rng.uniform(margin, s_img - margin, size=(12, 2))]
        chosen: list[tuple[float, float]] = []
        for q in pool:
            if in2(q) and all(np.hypot(q[0] - p[0], q[1] - p[1]) >= 1.5 * token for p in [truth, *chosen]):
                chosen.append(q)
            if len(chosen) == 3:
                break
        if len(chosen) < 3:
            continue
        order = rng.permutation(4)  # order[k]: which point (0 = the right one) is drawn as letter k
        pts = [truth, *chosen]
        choice_xy = [(float(pts[int(i)][0]), float(pts[int(i)][1])) for i in order]
        im1 = Image.fromarray(scene.image[:, x0:x0 + s_img])
        im2 = Image.fromarray(scene.image[by:by + side, bx:bx + side]).resize((s_img, s_img), Image.BILINEAR)
        ref1 = (ref[0] - x0, ref[1])
        draw_marker(im1, ref1, "REF")
        for k, q in enumerate(choice_xy):
            draw_marker(im2, q, LETTERS[k])
        out.append({"question": VISUAL_CORRESPONDENCE_QUESTION, "images": [im1, im2],
                    "choices": [f"Point {LETTERS[k]}" for k in range(4)], "answer": int(np.flatnonzero(order == 0)[0]),
                    "points": {"ref": ref1, "choices": choice_xy},
                    "explanation": f"window 2 at ({bx}, {by}), side {side}; reference on object {ref_obj}"})
    return out


def view_pairs(seed: int, n: int, image_size: int = 224) -> list[dict[str, Any]]:
    """n Multi-view_Reasoning questions: two windows of one wide scene, the second shifted horizontally by
    1/8-1/4 of the width; {"images", "choices": ["left", "right"], "answer" (0: content moved left in the
    frame), "shift" (window shift, pixels), "question"}."""
    from PIL import Image

    from sightline.data.synthetic import WorldConfig, derive_seed, render_scene

    d_max = image_size // 4
    world = WorldConfig(image_size=(image_size, image_size + 2 * d_max), count_probs=(0, 0, 0.5, 0.5))
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 0x3D])
        scene = render_scene(derive_seed(seed, "blink-view", i), world)
        d = int(rng.integers(image_size // 8, d_max + 1)) * (1 if rng.random() < 0.5 else -1)
        ims = [Image.fromarray(scene.image[:, x:x + image_size]) for x in (d_max, d_max + d)]
        # the window moving right moves the content left: "left" under the readout's rule
        out.append({"question": MULTIVIEW_QUESTION, "images": ims, "choices": ["left", "right"],
                    "answer": 0 if d > 0 else 1, "shift": d, "explanation": f"window shifted by {d} px"})
    return out


def count_scenes(seed: int, n: int, image_size: int = 112) -> list[dict[str, Any]]:
    """n Counting questions: a scene of 1-4 objects, "How many objects are there?", choices "1".."4" in a
    random order; {"images": [scene], "choices", "answer", "count", "question"}."""
    from sightline.data.synthetic import WorldConfig, derive_seed, render_scene

    world = WorldConfig(image_size=image_size)
    out = []
    for i in range(n):
        rng = np.random.default_rng([seed, i, 0xC7])
        scene = render_scene(derive_seed(seed, "blink-count", i), world)
        count = sum(o.area > 0 for o in scene.objects)
        choices = [str(v) for v in rng.permutation([1, 2, 3, 4])]
        out.append({"question": COUNT_QUESTION, "images": [scene.to_pil()], "choices": choices,
                    "answer": choices.index(str(count)), "count": count, "explanation": f"{count} objects"})
    return out


def write_blink_fixture(root: str | os.PathLike, seed: int = 0, n: int = 40, image_size: int = 112,
                        split: str = "val", subtasks: tuple[str, ...] = FIXTURE_SUBTASKS,
                        points: bool = False) -> Path:
    """Write the synthetic subtasks (FIXTURE_SUBTASKS by default) in BLINK's layout under ROOT, n questions
    each; correspondence and multi-view images are 2 x `image_size` on a side (room for the markers), the
    others `image_size`. `points`: also write the correspondence points' sidecar. Returns ROOT."""
    root = Path(root)
    for subtask in subtasks:
        if subtask == "Art_Style":
            write_style_fixture(root, seed, n, image_size, split)
            continue
        if subtask == "Visual_Correspondence":
            rows = correspondence_pairs(seed, n, 2 * image_size)
        elif subtask == "Multi-view_Reasoning":
            rows = view_pairs(seed, n, 2 * image_size)
        elif subtask == "Counting":
            rows = count_scenes(seed, n, image_size)
        else:
            raise ValueError(f"no synthetic fixture for BLINK subtask {subtask!r}: use {', '.join(FIXTURE_SUBTASKS)}")
        side = ({f"{split}_{subtask}_{i + 1}": r["points"] for i, r in enumerate(rows)}
                if points and subtask == "Visual_Correspondence" else None)
        write_subtask(root, subtask, rows, split, side)
    return root
