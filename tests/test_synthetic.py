"""sightline.data.synthetic: reproducible scenes whose pixels, masks, keypoints, language, pairs, clips
and exports all agree with the recorded facts."""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sightline.data import open_dataset
from sightline.data.synthetic import (
    ANSWERS,
    BACKGROUND_RGB,
    COLOUR_RGB,
    COLOURS,
    NUMBERS,
    QTYPES,
    SHAPES,
    SIZE_FRACTIONS,
    SIZES,
    STYLES,
    UNIT_SHAPES,
    ObjectSpec,
    RefExp,
    World,
    WorldConfig,
    caption,
    export_coco,
    export_davis,
    export_imagefolder,
    export_jsonl,
    export_pairs,
    parse_refexp,
    questions,
    referring_expressions,
    render_clip,
    render_pair,
    render_scene,
    resolve,
    sample_objects,
)
from sightline.data.synthetic.geometry import affine_apply, compose, placement
from sightline.data.synthetic.language import MARGIN_FRACTION, MIN_SEEN
from sightline.errors import UserError

FAST = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
seeds = st.integers(0, 2**40)
sizes_hw = st.one_of(st.sampled_from([64, 112]), st.tuples(st.integers(64, 200), st.integers(64, 200)))


def digest(scene) -> str:
    """A hash of everything a scene says: pixels, both maps, every object's masks and facts."""
    h = hashlib.sha256(scene.image.tobytes())
    h.update(scene.class_mask.tobytes())
    h.update(scene.instance_mask.tobytes())
    for obj in scene.objects:
        h.update(obj.mask.tobytes())
    h.update(json.dumps(scene.to_json(), sort_keys=True).encode())
    return h.hexdigest()


def nearest_colour(pixels_n3: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> np.ndarray:
    names = list(palette)
    rgb = np.array([palette[n] for n in names], dtype=float)
    dist = ((pixels_n3[:, None, :].astype(float) - rgb[None]) ** 2).sum(-1)
    return np.array(names)[dist.argmin(1)]


# ---------------------------------------------------------------------------------------------
# vocabulary


def test_vocabulary_sizes_and_colours_are_separable():
    assert len(SHAPES) >= 8 and len(COLOURS) >= 8 and SIZES == ("small", "medium", "large")
    assert len(set(SHAPES)) == len(SHAPES) and set(UNIT_SHAPES) == set(SHAPES)
    objects = np.array(list(COLOUR_RGB.values()), dtype=float)
    backgrounds = np.array(list(BACKGROUND_RGB.values()), dtype=float)
    pairwise = np.linalg.norm(objects[:, None] - objects[None], axis=-1)
    assert pairwise[~np.eye(len(objects), dtype=bool)].min() >= 90
    assert np.linalg.norm(backgrounds[:, None] - objects[None], axis=-1).min() >= 90
    # every colour a gradient can take (a segment between two background colours) stays far too
    t = np.linspace(0, 1, 201)[:, None]
    for a, b in itertools.permutations(backgrounds, 2):
        segment = a * (1 - t) + b * t
        assert np.linalg.norm(segment[:, None] - objects[None], axis=-1).min() >= 60
    assert list(SIZE_FRACTIONS.values()) == sorted(SIZE_FRACTIONS.values())


def test_every_shape_has_a_centre_keypoint_at_its_origin_and_unit_circumradius():
    for name, unit in UNIT_SHAPES.items():
        assert unit.keypoints["centre"] == (0.0, 0.0)
        if unit.polygon is not None:
            assert np.linalg.norm(unit.polygon, axis=1).max() == pytest.approx(1.0)
        for u, v in unit.keypoints.values():
            assert u * u + v * v <= 1 + 1e-9, name


# ---------------------------------------------------------------------------------------------
# determinism


@FAST
@given(seed=seeds, size=sizes_hw)
def test_same_seed_same_scene_different_seed_different_scene(seed, size):
    a = render_scene(seed, image_size=size)
    b = render_scene(seed, image_size=size)
    assert digest(a) == digest(b)
    c = render_scene(seed + 1, image_size=size)
    assert digest(a) != digest(c)


def test_scenes_are_identical_in_another_process():
    world = World(7)
    here = [digest(world.scene(i)) for i in (0, 5, 3)]
    code = ("import hashlib, json, sys\n"
            "from sightline.data.synthetic import World\n"
            "sys.path.insert(0, sys.argv[1])\n"
            "from test_synthetic import digest\n"
            "w = World(7)\n"
            "print(json.dumps([digest(w.scene(i)) for i in (0, 5, 3)]))\n")
    tests_dir = str(__import__("pathlib").Path(__file__).parent)
    out = subprocess.run([sys.executable, "-c", code, tests_dir], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == here


def test_world_items_do_not_depend_on_access_order_and_worlds_differ():
    world = World(3)
    forward = [digest(s) for s in world.scenes(4)]
    backward = [digest(world.scene(i)) for i in (3, 2, 1, 0)][::-1]
    assert forward == backward
    assert digest(World(4).scene(0)) != forward[0]
    assert World(3).pair(2).target.to_json() == world.pair(2).target.to_json()
    assert np.array_equal(World(3).clip(1, n_frames=8).instance_masks(), world.clip(1, n_frames=8).instance_masks())


def test_style_is_controllable_and_keeps_the_layout():
    base = render_scene(11, style="flat")
    for style in STYLES:
        other = render_scene(11, style=style)
        assert other.style == style
        assert [o.to_json() for o in other.objects] == [o.to_json() for o in base.objects]
    styles = {render_scene(s).style for s in range(60)}
    assert styles == set(STYLES)


# ---------------------------------------------------------------------------------------------
# masks and pixels


def check_scene_facts(scene, min_visible=None):
    """Masks, maps, boxes, areas and visible fractions agree with each other and with the pixels."""
    h, w = scene.size_hw
    assert scene.image.shape == (h, w, 3) and scene.image.dtype == np.uint8
    for obj in scene.objects:
        assert np.array_equal(obj.mask, scene.instance_mask == obj.index + 1)
        assert not (obj.mask & ~obj.full_mask).any()
        assert obj.area == int(obj.mask.sum())
        rows, cols = np.nonzero(obj.mask)
        if obj.area == 0:  # possible in pairs and clips: moved out of the image or fully covered
            assert obj.box is None and obj.visible_fraction == 0.0
            continue
        assert obj.box == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
        assert obj.visible_fraction == pytest.approx(obj.area / obj.full_area)
        if min_visible is not None:
            assert obj.visible_fraction >= min_visible
            assert int(obj.full_mask.sum()) == obj.full_area  # sampled objects lie wholly inside
    expected_classes = np.zeros((h, w), dtype=np.uint8)
    for obj in scene.objects:
        expected_classes[obj.mask] = SHAPES.index(obj.shape) + 1
    assert np.array_equal(scene.class_mask, expected_classes)
    assert set(np.unique(scene.instance_mask)) <= set(range(len(scene.objects) + 1))
    if scene.style == "noisy":
        # every object pixel's nearest palette colour is its object's; background pixels are nearest a background colour
        palette = {**COLOUR_RGB, **BACKGROUND_RGB}
        names = nearest_colour(scene.image.reshape(-1, 3), palette).reshape(h, w)
        for obj in scene.objects:
            assert (names[obj.mask] == obj.colour).all()
        assert np.isin(names[scene.instance_mask == 0], list(BACKGROUND_RGB)).all()
    else:
        # exact: the pixels of colour c are exactly the visible pixels of the objects coloured c
        for colour, rgb in COLOUR_RGB.items():
            painted = (scene.image == np.array(rgb, dtype=np.uint8)).all(-1)
            union = np.zeros((h, w), dtype=bool)
            for obj in scene.objects:
                if obj.colour == colour:
                    union |= obj.mask
            assert np.array_equal(painted, union), colour


@FAST
@given(seed=seeds, size=sizes_hw, style=st.sampled_from(STYLES), n=st.integers(1, 4))
def test_masks_are_exactly_the_painted_pixels(seed, size, style, n):
    scene = render_scene(seed, image_size=size, style=style, n_objects=n, min_visible=0.5)
    assert len(scene.objects) == n
    check_scene_facts(scene, min_visible=0.5)


def test_large_and_non_square_images_work():
    for size in ((448, 448), (96, 300), (300, 64)):
        scene = render_scene(1, image_size=size, n_objects=4)
        check_scene_facts(scene, min_visible=0.6)
        assert scene.size_hw == size


def test_rasterisation_follows_the_pixel_centre_rule():
    # an independent oracle: a rotated square is |R^T (p - c)| <= r / sqrt(2) on both axes
    cx, cy, rot = 40.3, 37.8, 20.0
    scene = render_scene(0, image_size=80, style="flat",
                         objects=[ObjectSpec("square", "red", "large", (cx, cy), rot)])
    obj = scene.objects[0]
    ys, xs = np.mgrid[0:80, 0:80] + 0.5
    a = np.deg2rad(rot)
    # unit frame (v up) of each pixel centre
    dx, dy = xs - cx, -(ys - cy)
    u = dx * np.cos(a) + dy * np.sin(a)
    v = -dx * np.sin(a) + dy * np.cos(a)
    half = obj.radius / np.sqrt(2)
    oracle = (np.abs(u) <= half) & (np.abs(v) <= half)
    keypoint_pixels = np.zeros_like(oracle)
    for p in obj.keypoints:
        keypoint_pixels[int(p.y), int(p.x)] = True
    assert np.array_equal(obj.mask, oracle | keypoint_pixels)
    assert (obj.mask ^ oracle).sum() <= 4
    # a circle: inside the disc
    scene = render_scene(0, image_size=80, style="flat", objects=[ObjectSpec("circle", "blue", "medium", (30.2, 50.7))])
    obj = scene.objects[0]
    disc = (xs - 30.2) ** 2 + (ys - 50.7) ** 2 <= obj.radius**2
    assert np.array_equal(obj.mask, disc)


def test_occlusion_records_visible_fraction_and_later_objects_win():
    objects = [ObjectSpec("square", "red", "large", (50, 50)), ObjectSpec("circle", "blue", "medium", (62, 50))]
    scene = render_scene(0, image_size=100, style="flat", objects=objects)
    back, front = scene.objects
    overlap = back.full_mask & front.full_mask
    assert overlap.any()
    assert not back.mask[overlap].any() and front.mask[overlap].all()
    assert back.area == int(back.full_mask.sum()) - int(overlap.sum())
    assert back.visible_fraction < 1.0 and front.visible_fraction == 1.0


# ---------------------------------------------------------------------------------------------
# keypoints


@FAST
@given(seed=seeds, size=sizes_hw, n=st.integers(1, 4))
def test_visible_keypoints_lie_on_their_object_and_covered_ones_are_occluded(seed, size, n):
    scene = render_scene(seed, image_size=size, n_objects=n, min_visible=0.4)
    for obj in scene.objects:
        for p in obj.keypoints:
            assert p.in_image  # sampled objects lie inside the image
            row, col = int(np.floor(p.y)), int(np.floor(p.x))
            assert obj.full_mask[row, col]  # every keypoint's pixel is the object's when nothing covers it
            holder = int(scene.instance_mask[row, col])
            if p.visible:
                assert obj.mask[row, col]  # inside its visible mask (within one pixel: exactly)
            else:
                assert holder > obj.index + 1  # hidden only by a later object's mask
            assert p.coco_v == (2 if p.visible else 1)
        assert obj.keypoint("centre").xy == pytest.approx(obj.centre)


def test_unoccluded_objects_show_every_keypoint_at_the_right_place():
    rng = np.random.default_rng(0)
    for k in range(120):
        shape, size, side = SHAPES[k % 8], SIZES[k % 3], (48, 64, 112)[k % 3]
        r = SIZE_FRACTIONS[size] * side / 2
        spec = ObjectSpec(shape, "red", size, tuple(rng.uniform(r + 1, side - r - 1, 2)), rng.uniform(-180, 180),
                          flip=bool(k % 2))
        obj = render_scene(k, image_size=side, style="flat", objects=[spec]).objects[0]
        assert all(p.visible for p in obj.keypoints), (shape, [p for p in obj.keypoints if not p.visible])
        expected = affine_apply(obj.affine, np.array(list(UNIT_SHAPES[shape].keypoints.values())))
        assert np.allclose([p.xy for p in obj.keypoints], expected)
    # an upright triangle's first tip is straight above the centre, one radius away
    tri = render_scene(0, image_size=100, objects=[ObjectSpec("triangle", "red", "large", (50, 60))]).objects[0]
    assert tri.keypoint("tip_0").xy == pytest.approx((50, 60 - tri.radius))


def test_a_keypoint_under_a_later_object_is_occluded():
    small = ObjectSpec("triangle", "red", "medium", (50, 50))
    tip_y = 50 - SIZE_FRACTIONS["medium"] * 100 / 2
    cover = ObjectSpec("circle", "blue", "small", (50, tip_y))
    scene = render_scene(0, image_size=100, style="flat", objects=[small, cover])
    tri = scene.objects[0]
    assert not tri.keypoint("tip_0").visible and tri.keypoint("tip_0").coco_v == 1
    assert tri.keypoint("tip_1").visible and tri.keypoint("centre").visible
    # outside the image: coco_v 0
    pair = render_scene(0, image_size=100, objects=[ObjectSpec("square", "red", "large", (5, 50))])
    assert any(p.coco_v == 0 and not p.in_image for p in pair.objects[0].keypoints)


# ---------------------------------------------------------------------------------------------
# referring expressions


@FAST
@given(seed=seeds, n=st.integers(1, 4))
def test_every_referring_expression_picks_out_exactly_its_object(seed, n):
    scene = render_scene(seed, n_objects=n)
    found = referring_expressions(scene)
    assert {i for _, i in found} <= set(range(n))
    for text, index in found:
        assert resolve(scene, text) == [index], text
        assert parse_refexp(text).text == text


def test_referring_expressions_cover_most_objects_and_use_all_kinds():
    kinds, covered, total = set(), 0, 0
    for seed in range(40):
        scene = render_scene(seed, n_objects=3)
        found = referring_expressions(scene)
        covered += len({i for _, i in found})
        total += 3
        kinds |= {parse_refexp(t).kind for t, _ in found}
    assert kinds == {"attribute", "location", "relation"}
    assert covered / total > 0.9


def test_evaluator_rejects_ambiguous_expressions():
    twins = [ObjectSpec("triangle", "red", "small", (25, 40)), ObjectSpec("triangle", "red", "small", (85, 40)),
             ObjectSpec("circle", "blue", "large", (55, 85))]
    scene = render_scene(0, image_size=112, style="flat", objects=twins)
    assert resolve(scene, "the red triangle") == [0, 1]
    assert resolve(scene, "the triangle") == [0, 1]
    assert resolve(scene, "the red triangle on the left") == [0]
    assert resolve(scene, "the small triangle on the right") == [1]
    assert resolve(scene, "the triangle at the top") == []  # both at the same height
    assert resolve(scene, "the circle") == [2]
    assert resolve(scene, "the circle below the triangle") == []  # the landmark is ambiguous
    assert resolve(scene, "the circle below the red triangle on the left") == [2]
    assert resolve(scene, "the triangle above the circle") == [0, 1]  # both are: not a referring expression
    assert resolve(scene, "the green triangle") == []
    found = dict(referring_expressions(scene))
    assert "the red triangle" not in found and "the triangle" not in found
    assert found.get("the triangle on the left") == 0 and found.get("the triangle on the right") == 1
    for text, index in found.items():
        assert resolve(scene, text) == [index]


def test_spatial_rules_follow_the_documented_margins():
    side = 100
    margin = MARGIN_FRACTION * side
    pair = [ObjectSpec("star", "red", "small", (50, 50)), ObjectSpec("circle", "blue", "small", (50, 50 + margin + 1))]
    scene = render_scene(0, image_size=side, objects=pair)
    assert resolve(scene, "the star above the circle") == [0]
    assert resolve(scene, "the circle below the star") == [1]
    assert resolve(scene, "the star to the left of the circle") == []
    close = [pair[0], ObjectSpec("circle", "blue", "small", (50, 50 + margin - 1))]
    assert resolve(render_scene(0, image_size=side, objects=close), "the star above the circle") == []
    # a lone match is "on the left" only if it lies left of the middle by the margin
    lone = render_scene(0, image_size=side, objects=[ObjectSpec("star", "red", "small", (50 - margin - 1, 50))])
    assert resolve(lone, "the star on the left") == [0] and resolve(lone, "the star on the right") == []
    middle = render_scene(0, image_size=side, objects=[ObjectSpec("star", "red", "small", (50, 50))])
    assert resolve(middle, "the star on the left") == []


def test_parser_round_trips_and_rejects_other_text():
    expr = RefExp(shape="star", colour="red", size="small", relation="left_of",
                  landmark=RefExp(shape="circle", location="top"))
    assert expr.text == "the small red star to the left of the circle at the top"
    assert parse_refexp(expr.text) == expr
    assert parse_refexp("the red object") == RefExp(colour="red")
    for bad in ("red star", "the", "the big star", "the star near the circle", "the star above"):
        with pytest.raises(ValueError):
            parse_refexp(bad)


# ---------------------------------------------------------------------------------------------
# questions


def described(question: str, prefix: str, suffix: str = "?") -> str:
    assert question.startswith(prefix) and question.endswith(suffix), question
    return question[len(prefix):len(question) - len(suffix)]


def check_answers(scene, qs):
    objects = [o for o in scene.objects if o.area > 0]
    if any(o.visible_fraction < MIN_SEEN for o in objects):
        assert not {q.qtype for q in qs} & {"count", "presence", "caption"}
    margin = MARGIN_FRACTION * min(scene.size_hw)
    for q in qs:
        assert q.qtype in QTYPES
        if q.qtype != "caption":
            assert q.answer in ANSWERS, q
        if q.qtype in ("shape", "colour", "size", "refexp") and q.question != "What shape is shown?":
            asked = q.question.split()[1]
            text = described(q.question, f"What {asked} is ")
            assert resolve(scene, text) == [q.object], q
            assert q.answer == getattr(scene.objects[q.object], asked)
        elif q.question == "What shape is shown?":
            assert len(objects) == 1 and q.answer == objects[0].shape
        elif q.qtype == "position":
            obj = scene.objects[q.object]
            if q.question.endswith("on the left or the right?"):
                assert resolve(scene, described(q.question, "Is ", " on the left or the right?")) == [q.object]
                offset = obj.centre[0] - scene.width / 2
                assert abs(offset) > margin and q.answer == ("left" if offset < 0 else "right")
            else:
                assert resolve(scene, described(q.question, "Is ", " at the top or the bottom?")) == [q.object]
                offset = obj.centre[1] - scene.height / 2
                assert abs(offset) > margin and q.answer == ("top" if offset < 0 else "bottom")
        elif q.qtype == "count":
            what = described(q.question, "How many ", " are there?")
            if what == "objects":
                truth = len(objects)
            elif what.endswith(" objects"):
                truth = sum(o.colour == what.split()[0] for o in objects)
            else:
                truth = sum(what in (o.shape + "s", o.shape + "es") for o in objects)
            assert q.answer == NUMBERS[truth], q
        elif q.qtype == "presence":
            words = described(q.question, "Is there ", "?").split()[1:]
            if words[-1] == "object":
                truth = any(o.colour == words[0] for o in objects)
            elif len(words) == 2:
                truth = any((o.colour, o.shape) == tuple(words) for o in objects)
            else:
                truth = any(o.shape == words[0] for o in objects)
            assert q.answer == ("yes" if truth else "no"), q
        elif q.qtype == "caption":
            ordered = sorted(objects, key=lambda o: o.centre[0])
            phrases = [f"a {o.size} {o.colour} {o.shape}" for o in ordered]
            assert q.answer == (phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1])


@FAST
@given(seed=seeds, n=st.integers(1, 4))
def test_answers_agree_with_the_facts(seed, n):
    scene = render_scene(seed, n_objects=n)
    qs = questions(scene)
    check_answers(scene, qs)
    assert {q.qtype for q in qs} >= {"count", "presence", "caption"}  # others need a nameable object
    assert [q.answer for q in qs if q.question == "How many objects are there?"] == [NUMBERS[n]]


def test_presence_is_balanced_and_every_type_appears():
    qs = [q for seed in range(60) for q in questions(render_scene(seed))]
    presence = [q.answer for q in qs if q.qtype == "presence"]
    assert len(presence) >= 300 and presence.count("yes") == presence.count("no")
    assert {q.qtype for q in qs} == set(QTYPES)
    single = questions(render_scene(0, n_objects=1))
    assert any(q.question == "What shape is shown?" for q in single)


def test_no_question_about_an_object_that_cannot_be_singled_out():
    twins = [ObjectSpec("square", "green", "medium", (30, 30)), ObjectSpec("square", "green", "medium", (33, 80))]
    scene = render_scene(0, image_size=112, style="flat", objects=twins)
    for q in questions(scene):
        if q.object is not None:
            assert "the square?" not in q.question and "the green square?" not in q.question
    check_answers(scene, questions(scene))
    assert caption(scene) == "a medium green square and a medium green square"


# ---------------------------------------------------------------------------------------------
# pairs


@FAST
@given(seed=seeds, affine=st.booleans())
def test_pair_keypoints_follow_the_transform(seed, affine):
    pair = render_pair(seed, affine=affine, flip_prob=0.5)
    assert pair.mode == "transform" and pair.transform is not None
    src, trg = pair.source.objects[pair.source_index], pair.target.objects[pair.target_index]
    assert src.shape == trg.shape == pair.category
    mapped = affine_apply(pair.transform, np.array([c.source_xy for c in pair.correspondences]))
    assert np.abs(mapped - np.array([c.target_xy for c in pair.correspondences])).max() <= 1e-6
    assert np.allclose(trg.affine, compose(pair.transform, src.affine))
    for c in pair.correspondences:
        assert c.visible == (src.keypoint(c.name).visible and trg.keypoint(c.name).visible)
        assert trg.keypoint(c.name).in_image  # the pair's object stays inside the target image
    check_scene_facts(pair.target)
    linear = pair.transform[:, :2]
    mirrored = np.linalg.det(linear) < 0
    assert trg.flip == (src.flip != mirrored)
    if not affine:  # a similarity: orthogonal up to scale, and the recorded pose follows it
        gram = linear.T @ linear
        assert np.allclose(gram, gram[0, 0] * np.eye(2), atol=1e-9)
        assert trg.radius == pytest.approx(src.radius * np.sqrt(gram[0, 0]))
        assert np.allclose(placement(trg.centre, trg.radius, trg.rotation, trg.flip), trg.affine)


def test_scene_pairs_share_the_category_and_name_keypoints_alike():
    kinds = set()
    for seed in range(10):
        pair = render_pair(seed, mode="scene")
        assert pair.transform is None
        src, trg = pair.source.objects[pair.source_index], pair.target.objects[pair.target_index]
        assert src.shape == trg.shape == pair.category
        assert [c.name for c in pair.correspondences] == list(UNIT_SHAPES[pair.category].keypoint_names)
        kinds.add(pair.category)
        facts = pair.to_json()
        assert len(facts["src_kps"]) == len(facts["trg_kps"]) == sum(c.visible for c in pair.correspondences)
    assert len(kinds) > 3


# ---------------------------------------------------------------------------------------------
# clips


def test_clip_masks_follow_the_objects_and_ids_are_stable():
    clip = render_clip(5, n_frames=16, n_objects=3)
    assert clip.n_frames == 16 and clip.n_objects == 3
    first = clip.frames[0]
    assert all(o.visible_fraction >= 0.6 for o in first.objects)
    side = min(first.size_hw)
    moved = False
    for t, frame in enumerate(clip.frames):
        check_scene_facts(frame)
        for obj, obj0 in zip(frame.objects, first.objects):
            assert (obj.shape, obj.colour) == (obj0.shape, obj0.colour)  # instance i is the same object
            # its own full mask, drawn alone from the recorded geometry, contains what is visible of it
            alone = render_scene(0, image_size=first.size_hw, style="flat",
                                 objects=[ObjectSpec(obj.shape, obj.colour, obj.size, obj.centre,
                                                     affine=tuple(map(tuple, obj.affine)))]).objects[0]
            assert np.array_equal(alone.full_mask, obj.full_mask)
            if obj.visible_fraction == 1.0:
                rows, cols = np.nonzero(obj.mask)
                assert abs(cols.mean() + 0.5 - obj.centre[0]) < 0.25 * obj.radius
                assert abs(rows.mean() + 0.5 - obj.centre[1]) < 0.25 * obj.radius
        if t:
            prev = clip.frames[t - 1]
            for obj, before in zip(frame.objects, prev.objects):
                step = np.hypot(obj.centre[0] - before.centre[0], obj.centre[1] - before.centre[1])
                assert step <= 0.06 * side * 2 + 1e-9  # at most one bounce's worth per frame
                moved |= step > 0.5
    assert moved
    ids = clip.instance_masks()
    assert ids.shape == (16, *first.size_hw) and set(np.unique(ids)) <= {0, 1, 2, 3}


def test_clips_contain_occlusion_somewhere():
    hidden = 0
    for seed in range(12):
        clip = render_clip(seed, n_frames=12, n_objects=4)
        hidden += sum(o.visible_fraction < 1.0 for f in clip.frames for o in f.objects)
    assert hidden > 0


# ---------------------------------------------------------------------------------------------
# exports


def test_imagefolder_export_opens_with_the_shape_labels(tmp_path):
    root = export_imagefolder(tmp_path / "shapes", seed=2, n=24)
    dataset = open_dataset(root)
    assert dataset.kind == "imagefolder" and len(dataset) == 24
    world = World(2, n_objects=1)
    for example in dataset:
        i = int(example.path.rsplit("/", 1)[1].split(".")[0])
        scene = world.scene(i)
        assert example.label == scene.objects[0].shape
        assert np.array_equal(np.asarray(Image.open(example.path).convert("RGB")), scene.image)
    by_count = open_dataset(export_imagefolder(tmp_path / "counts", seed=2, n=8, attribute="count"))
    assert set(by_count.classes) <= set(NUMBERS[1:5])
    with pytest.raises(UserError, match="one object per image"):
        export_imagefolder(tmp_path / "x", seed=0, n=2, config=WorldConfig(n_objects=2))
    with pytest.raises(UserError, match="folder attribute"):
        export_imagefolder(tmp_path / "x", seed=0, n=2, attribute="weight")


def test_jsonl_export_opens_with_questions_and_answers(tmp_path):
    manifest = export_jsonl(tmp_path / "qa", seed=1, n=6)
    dataset = open_dataset(manifest)
    world = World(1)
    expected = [(i, q) for i in range(6) for q in questions(world.scene(i))]
    assert len(dataset) == len(expected)
    for example, (i, q) in zip(dataset, expected):
        assert (example.prompt, example.label, example.meta["qtype"]) == (q.question, q.answer, q.qtype)
        assert example.meta["scene"] == i and example.meta["object"] == q.object
        assert example.meta["facts"] == json.loads(json.dumps(world.scene(i).to_json()))
    first = open_dataset(manifest)[0]
    assert np.array_equal(np.asarray(Image.open(first.path).convert("RGB")), world.scene(0).image)
    some = open_dataset(export_jsonl(tmp_path / "some", seed=1, n=6, per_image=3, qtypes=("count", "presence")))
    assert len(some) == 18 and {e.meta["qtype"] for e in some} <= {"count", "presence"}


def rle_decode(rle: dict) -> np.ndarray:
    """COCO uncompressed RLE -> HxW bool (runs alternate 0/1 starting with 0, column-major)."""
    h, w = rle["size"]
    flat = np.zeros(h * w, dtype=bool)
    position, value = 0, False
    for count in rle["counts"]:
        flat[position:position + count] = value
        position += count
        value = not value
    assert position == h * w
    return flat.reshape((h, w), order="F")


def test_coco_export_decodes_to_the_instance_masks(tmp_path):
    path = export_coco(tmp_path / "coco", seed=4, n=5, config=WorldConfig(image_size=(72, 96)))
    data = json.loads(path.read_text())
    world = World(4, image_size=(72, 96))
    categories = {c["id"]: c for c in data["categories"]}
    assert [categories[k + 1]["name"] for k in range(len(SHAPES))] == list(SHAPES)
    by_image: dict[int, list] = {}
    for ann in data["annotations"]:
        by_image.setdefault(ann["image_id"], []).append(ann)
    assert len({a["id"] for a in data["annotations"]}) == len(data["annotations"])
    for image in data["images"]:
        scene = world.scene(image["id"] - 1)
        assert (image["height"], image["width"]) == (72, 96)
        anns = by_image[image["id"]]
        assert len(anns) == len(scene.objects)
        for ann, obj in zip(anns, scene.objects):
            mask = rle_decode(ann["segmentation"])
            assert np.array_equal(mask, obj.mask)
            assert ann["area"] == int(mask.sum())
            x, y, w, h = ann["bbox"]
            rows, cols = np.nonzero(mask)
            assert (x, y, x + w, y + h) == (cols.min(), rows.min(), cols.max() + 1, rows.max() + 1)
            category = categories[ann["category_id"]]
            assert category["name"] == obj.shape
            assert len(ann["keypoints"]) == 3 * len(category["keypoints"])
            triples = np.array(ann["keypoints"]).reshape(-1, 3)
            for (kx, ky, v), name, p in zip(triples, category["keypoints"], obj.keypoints):
                assert name == p.name and v == p.coco_v
                assert (kx, ky) == pytest.approx(p.xy, abs=1e-3)
            assert ann["num_keypoints"] == int((triples[:, 2] > 0).sum())


def test_pairs_export_round_trips(tmp_path):
    path = export_pairs(tmp_path / "pairs", seed=0, n=4, affine=True)
    data = json.loads(path.read_text())
    assert len(data["pairs"]) == 4
    for entry in data["pairs"]:
        pair = World(0).pair(entry["pair_id"], affine=True)
        assert entry["category"] == pair.category
        transform = np.array(entry["transform"])
        src, trg = np.array(entry["src_kps"]), np.array(entry["trg_kps"])
        assert len(src) == len(trg) == len(entry["kps_names"]) > 0
        assert np.abs(affine_apply(transform, src) - trg).max() <= 1.0
        assert entry["trg_bndbox"] == list(pair.target.objects[pair.target_index].box)
        image = np.asarray(Image.open(path.parent / entry["trg_imname"]).convert("RGB"))
        assert np.array_equal(image, pair.target.image)


def test_davis_export_annotations_equal_the_instance_masks(tmp_path):
    root = export_davis(tmp_path / "davis", seed=3, n_clips=2, n_frames=8, config=WorldConfig(n_objects=3))
    names = (root / "ImageSets" / "val.txt").read_text().split()
    assert names == ["clip0000", "clip0001"]
    for i, name in enumerate(names):
        clip = World(3, n_objects=3).clip(i, n_frames=8)
        frames = sorted((root / "JPEGImages" / name).iterdir())
        annotations = sorted((root / "Annotations" / name).iterdir())
        assert [f.name for f in frames] == [f"{t:05d}.jpg" for t in range(8)]
        assert [a.name for a in annotations] == [f"{t:05d}.png" for t in range(8)]
        for t, (frame_path, ann_path) in enumerate(zip(frames, annotations)):
            with Image.open(ann_path) as ann:
                assert ann.mode == "P"
                assert np.array_equal(np.asarray(ann), clip.frames[t].instance_mask)
            decoded = np.asarray(Image.open(frame_path).convert("RGB")).astype(int)
            assert np.abs(decoded - clip.frames[t].image).mean() < 4  # JPEG, quality 95
    facts = json.loads((root / "clips.json").read_text())
    assert facts["clips"]["clip0001"]["n_frames"] == 8


# ---------------------------------------------------------------------------------------------
# configuration and mistakes


def test_config_round_trips_and_mistakes_are_user_errors():
    config = WorldConfig(image_size=(80, 120), n_objects=2, style="striped", shapes=("star", "heart"))
    assert WorldConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    scene = render_scene(0, config)
    assert scene.size_hw == (80, 120) and {o.shape for o in scene.objects} <= {"star", "heart"}
    for bad in (dict(style="cubist"), dict(shapes=("blob",)), dict(image_size=8), dict(min_visible=0),
                dict(count_probs=(0.5, 0.4)), dict(n_objects=0)):
        with pytest.raises(UserError):
            WorldConfig(**bad)
    with pytest.raises(UserError, match="seed"):
        render_scene(-1)
    with pytest.raises(UserError, match="colour"):
        ObjectSpec("star", "mauve", "small", (1, 1))
    crowded = WorldConfig(image_size=32, n_objects=8, sizes=("large",), min_visible=1.0)
    with pytest.raises(UserError, match="cannot place"):
        sample_objects(np.random.default_rng(0), crowded, max_restarts=3)
    with pytest.raises(UserError, match="pair mode"):
        render_pair(0, mode="mirror")
    with pytest.raises(UserError, match="unknown world setting"):
        World(0, colour_count=3)
    with pytest.raises(UserError, match="differ"):
        render_scene(0, n_objects=3, shapes=("star",), colours=("red", "blue"), allow_duplicates=False)


def test_recorded_pose_rebuilds_the_geometry():
    for seed in range(20):
        for obj in render_scene(seed).objects:
            assert np.allclose(placement(obj.centre, obj.radius, obj.rotation, obj.flip), obj.affine)


def test_placement_convention_is_counter_clockwise_on_screen():
    # turning an upright triangle 90 degrees counter-clockwise points its tip to the left
    tip = affine_apply(placement((50, 50), 10, 90.0), np.array([[0.0, 1.0]]))[0]
    assert tip == pytest.approx((40, 50))
    flipped = affine_apply(placement((50, 50), 10, 0.0, flip=True), np.array([[1.0, 0.0]]))[0]
    assert flipped == pytest.approx((40, 50))
