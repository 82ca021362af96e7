"""sightline.data.perception: every benchmark layout, written by its synthetic exporter, loads back into
units whose masks, keypoints and texts equal the synthetic world's ground truth; episodes are
seeded and never use the query as a support; every mistake is one UserError line."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from sightline.data.perception import (
    coco_segmentation_mask,
    load_task,
    polygons_to_mask,
    rle_decode,
    rle_from_string,
)
from sightline.data.synthetic import (
    PAIR_MODES,
    PASCAL_SHAPE_CLASS,
    SHAPES,
    VOC_CLASSES,
    World,
    WorldConfig,
    derive_seed,
    export_davis,
    export_imagenet_s,
    export_msrc,
    export_pascal5i,
    export_refcoco,
    export_spair,
    mask_to_rle,
    render_clip,
    render_pair,
    render_scene,
    resolve,
    scene_with_shape,
)
from sightline.errors import UserError
from sightline.data.tasks import IGNORE, load_image, load_mask

CONFIG = WorldConfig(image_size=64)


def borders(label: np.ndarray) -> np.ndarray:
    """Reference VOC-style border: an object pixel whose 4-neighbour (inside the image) differs."""
    h, w = label.shape
    out = np.zeros((h, w), dtype=bool)
    for r in range(h):
        for c in range(w):
            if label[r, c] == 0:
                continue
            for dr, dc in ((1, 0), (-1, 0), (0, 1), (0, -1)):
                rr, cc = r + dr, c + dc
                if 0 <= rr < h and 0 <= cc < w and label[rr, cc] != label[r, c]:
                    out[r, c] = True
    return out


def expected_binary(scene, shape: str, ignore_borders: bool) -> np.ndarray:
    want = (scene.class_mask == SHAPES.index(shape) + 1).astype(np.uint8)
    if ignore_borders:
        want[borders(scene.instance_mask)] = IGNORE
    return want


def close_images(image, pixels: np.ndarray, tolerance: float = 4.0) -> bool:
    """JPEG at quality 95 stays within a few grey levels on average."""
    return np.abs(np.asarray(load_image(image), dtype=int) - pixels.astype(int)).mean() < tolerance


# ---------------------------------------------------------------------------------------------
# Pascal-5i


@pytest.fixture(scope="module")
def pascal_root(tmp_path_factory):
    return export_pascal5i(tmp_path_factory.mktemp("voc") / "VOC2012", seed=0, n=16, config=CONFIG)


def pascal_scene(name: str):
    i = int(name.rsplit("_", 1)[1])
    return scene_with_shape(derive_seed(0, "pascal5i", i), CONFIG, CONFIG.shapes[i % len(CONFIG.shapes)])


def test_pascal5i_episodes_follow_hsnet_and_masks_equal_the_world(pascal_root):
    shape_of = {cls: shape for shape, cls in PASCAL_SHAPE_CLASS.items()}
    data = load_task("fgseg", "pascal5i", str(pascal_root), fold=1, shots=2, episodes=12, seed=3)
    lines = (pascal_root / "splits" / "pascal" / "val" / "fold1.txt").read_text().split()
    assert data.categories == VOC_CLASSES[5:10] and len(data.units) == 12
    for index, episode in enumerate(data.units):
        name, cls = lines[index % len(lines)].split("__")
        assert episode.query.id == name and episode.query.meta["class_id"] == int(cls)  # the list, in order
        assert episode.query.id not in {s.id for s in episode.support}
        assert episode.category == VOC_CLASSES[int(cls) - 1] and len(episode.support) == 2
        for sample in (episode.query, *episode.support):
            scene = pascal_scene(sample.id)
            assert np.array_equal(load_mask(sample.mask), expected_binary(scene, shape_of[int(cls)], True))
            assert close_images(sample.image, scene.image)
    again = load_task("fgseg", "pascal5i", str(pascal_root), fold=1, shots=2, episodes=12, seed=3)
    assert [[s.id for s in e.support] for e in again.units] == [[s.id for s in e.support] for e in data.units]
    other = load_task("fgseg", "pascal5i", str(pascal_root), fold=1, shots=2, episodes=12, seed=4)
    assert [[s.id for s in e.support] for e in other.units] != [[s.id for s in e.support] for e in data.units]
    assert len(load_task("fgseg", "pascal5i", str(pascal_root), fold=1, shots=2, limit=5).units) == 5


def test_pascal5i_pairs_derive_from_the_masks_without_fold_lists(pascal_root, tmp_path):
    copy = tmp_path / "VOC2012"
    shutil.copytree(pascal_root, copy)
    shutil.rmtree(copy / "splits")
    listed = (pascal_root / "splits" / "pascal" / "val" / "fold2.txt").read_text().split()
    data = load_task("fgseg", "pascal5i", str(copy), fold=2, shots=1, episodes=len(listed))
    derived = {f"{e.query.id}__{e.query.meta['class_id']:02d}" for e in data.units}
    assert derived == set(listed)
    assert "derived" in data.source


# ---------------------------------------------------------------------------------------------
# MSRC co-segmentation


def test_msrc_sets_equal_the_world_in_both_layouts(tmp_path):
    config = WorldConfig(image_size=64, shapes=("circle", "star", "heart"))
    root = export_msrc(tmp_path / "msrc", seed=0, n_per_class=3, config=config)
    data = load_task("coseg", "msrc", str(root))
    assert [s.name for s in data.units] == sorted(config.shapes)
    for coset in data.units:
        assert len(coset.samples) == 3
        for j, sample in enumerate(coset.samples):
            scene = scene_with_shape(derive_seed(0, "msrc", coset.name, j), config, coset.name, exclusive=True)
            mask = load_mask(sample.mask)
            assert np.array_equal(mask, (scene.class_mask == SHAPES.index(coset.name) + 1).astype(np.uint8))
            assert sum(o.shape == coset.name for o in scene.objects) == 1
            assert np.array_equal(np.asarray(load_image(sample.image)), scene.image)  # BMP: lossless
    # the processed variant: images/<class>/ and GT/<class>/
    flat = tmp_path / "processed"
    for coset in data.units:
        shutil.copytree(root / coset.name, flat / "images" / coset.name, ignore=shutil.ignore_patterns("GroundTruth"))
        shutil.copytree(root / coset.name / "GroundTruth", flat / "GT" / coset.name)
    again = load_task("coseg", "msrc", str(flat), limit=2)
    assert [s.name for s in again.units] == sorted(config.shapes)[:2]
    assert np.array_equal(load_mask(again.units[0].samples[1].mask), load_mask(data.units[0].samples[1].mask))


# ---------------------------------------------------------------------------------------------
# ImageNet-S


def test_imagenet_s_items_equal_the_world_and_calibration_is_held_out(tmp_path):
    root = export_imagenet_s(tmp_path / "ins", seed=0, n=8, config=CONFIG)
    data = load_task("textseg", "imagenet-s", str(root), seed=1, calibration_fraction=0.25)
    assert data.categories == SHAPES
    unit_images = {u.image for u in data.units}
    cal_images = {u.image for u in data.calibration}
    assert len(cal_images) == 2 and len(unit_images) == 6 and not unit_images & cal_images
    for sample in list(data.units) + list(data.calibration):
        i = int(sample.id.split("/")[1].split(":")[0].rsplit("_", 1)[1]) - 1
        scene = scene_with_shape(derive_seed(0, "imagenet-s", i), CONFIG, CONFIG.shapes[i % len(CONFIG.shapes)])
        shape = SHAPES[sample.meta["class_id"] - 1]
        assert sample.text == shape and shape in {o.shape for o in scene.objects}
        assert np.array_equal(load_mask(sample.mask), expected_binary(scene, shape, True))
    counted = sum(len({o.shape for o in scene_with_shape(derive_seed(0, "imagenet-s", i), CONFIG,
                                                         CONFIG.shapes[i % 8]).objects if o.area}) for i in range(8))
    assert len(data.units) + len(data.calibration) == counted  # one item per (image, class present)
    again = load_task("textseg", "imagenet-s", str(root), seed=1, calibration_fraction=0.25)
    assert [u.id for u in again.calibration] == [u.id for u in data.calibration]
    (root / "LOC_synset_mapping.txt").unlink()
    with pytest.raises(UserError, match="LOC_synset_mapping"):
        load_task("textseg", "imagenet-s", str(root))


# ---------------------------------------------------------------------------------------------
# RefCOCO


def check_ref_units(units, world: World) -> None:
    for sample in units:
        scene = world.scene(int(sample.meta.get("image_id", 0)) - 1) if "image_id" in sample.meta else None
        if scene is None:  # parquet rows carry the file name
            scene = world.scene(int(sample.meta["image_key"].rsplit("_", 1)[1].split(".")[0]) - 1)
        (index,) = resolve(scene, sample.text)
        assert np.array_equal(load_mask(sample.mask), scene.objects[index].mask.astype(np.uint8))


def test_refcoco_json_and_parquet_give_each_sentence_its_objects_mask(tmp_path):
    world = World(0, CONFIG)
    root = export_refcoco(tmp_path / "ref", seed=0, n=6, config=CONFIG)
    data = load_task("refseg", "refcoco", str(root), seed=2)
    assert data.units and all(u.meta["split"] == "val" for u in data.units)
    assert data.calibration and all(u.meta["split"] == "train" for u in data.calibration)
    refs = json.loads((root / "refcoco" / "refs(unc).json").read_text())
    assert len(data.units) == sum(len(r["sentences"]) for r in refs if r["split"] == "val")
    check_ref_units(list(data.units) + list(data.calibration), world)
    assert close_images(data.units[0].image, world.scene(data.units[0].meta["image_id"] - 1).image)
    only_val = load_task("refseg", "refcoco", str(root), split="train", limit=3)
    assert len(only_val.units) == 3 and all(u.meta["split"] == "val" for u in only_val.calibration)

    pq_root = export_refcoco(tmp_path / "refpq", seed=0, n=6, config=CONFIG, fmt="parquet")
    parquet = load_task("refseg", "refcoco", str(pq_root), seed=2)
    assert [u.text for u in parquet.units] == [u.text for u in data.units]
    check_ref_units(parquet.units, world)


def test_refcoco_holds_out_images_of_the_only_split(tmp_path):
    root = export_refcoco(tmp_path / "ref", seed=0, n=6, config=CONFIG, val_fraction=1.0)
    data = load_task("refseg", "refcoco", str(root), calibration_fraction=0.4)
    units = {u.meta["image_id"] for u in data.units}
    held = {u.meta["image_id"] for u in data.calibration}
    assert held and units and not units & held and len(held) == round(0.4 * len(units | held))


def test_lmms_style_flat_polygon_is_filled_like_a_point_in_polygon_test(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    image = Image.new("RGB", (40, 30), (10, 20, 30))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    polygon = [5.0, 4.0, 30.0, 6.0, 22.0, 25.0]
    (tmp_path / "data").mkdir()
    pq.write_table(pa.table({"question_id": ["7"], "image": [{"bytes": buffer.getvalue(), "path": "a.png"}],
                             "question": ["?"], "answer": [["the triangle", "that shape"]],
                             "segmentation": [polygon], "bbox": [[5.0, 4.0, 25.0, 21.0]]}),
                   tmp_path / "data" / "val-00000-of-00001.parquet")
    data = load_task("refseg", "refcoco", str(tmp_path), calibration_fraction=0.0)
    assert [u.text for u in data.units] == ["the triangle", "that shape"] and not data.calibration
    mask = load_mask(data.units[0].mask)
    assert mask.shape == (30, 40)
    assert np.array_equal(np.asarray(load_image(data.units[0].image)), np.asarray(image))
    ys, xs = np.mgrid[0:30, 0:40] + 0.5
    inside, distance = point_in_triangle(xs, ys, np.array(polygon).reshape(3, 2))
    assert mask[inside & (distance > 1.0)].all() and not mask[~inside & (distance > 1.0)].any()


def point_in_triangle(xs, ys, tri):
    """Brute-force reference: pixel centres inside the triangle, and their distance to its edges."""
    signs, distances = [], []
    for k in range(3):
        (x0, y0), (x1, y1) = tri[k], tri[(k + 1) % 3]
        cross = (x1 - x0) * (ys - y0) - (y1 - y0) * (xs - x0)
        signs.append(cross)
        distances.append(np.abs(cross) / np.hypot(x1 - x0, y1 - y0))
    signs = np.stack(signs)
    inside = (signs > 0).all(0) | (signs < 0).all(0)
    return inside, np.min(distances, 0)


def rle_to_string(counts: list[int]) -> str:
    """COCO's compressed RLE encoding (maskApi.c rleToString), written from the C source's rules."""
    out = []
    for i, value in enumerate(counts):
        x = value - counts[i - 2] if i > 2 else value
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def test_rle_decoding_inverts_the_coco_encodings():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 30, size=2)
        mask = rng.random((h, w)) < rng.uniform(0.1, 0.9)
        rle = mask_to_rle(mask)
        assert np.array_equal(rle_decode(rle), mask.astype(np.uint8))
        compressed = {"size": rle["size"], "counts": rle_to_string(rle["counts"])}
        assert rle_from_string(compressed["counts"]) == rle["counts"]
        assert np.array_equal(coco_segmentation_mask(json.dumps(compressed), h, w), mask.astype(np.uint8))
    # a square polygon covers the pixels whose centres lie inside it
    square = polygons_to_mask([[2, 2, 8, 2, 8, 6, 2, 6]], 10, 12)
    assert square[3:6, 3:8].all() and square.sum() <= 7 * 5 and not square[:, 10:].any()


# ---------------------------------------------------------------------------------------------
# SPair-71k and DAVIS-2017


def test_spair_pairs_equal_the_worlds_correspondences(tmp_path):
    root = export_spair(tmp_path / "SPair-71k", seed=0, n=6, config=CONFIG)
    data = load_task("semcorr", "spair", str(root))
    assert len(data.units) == 6
    for i, pair_unit in enumerate(data.units):
        pair = World(0, CONFIG).pair(i, mode=PAIR_MODES[i % len(PAIR_MODES)])
        visible = [c for c in pair.correspondences if c.visible]
        assert pair_unit.category == pair.category and len(visible) == len(pair_unit.source_xy) > 0
        assert np.allclose(pair_unit.source_xy, [c.source_xy for c in visible], atol=1e-3)
        assert np.allclose(pair_unit.target_xy, [c.target_xy for c in visible], atol=1e-3)
        assert pair_unit.target_bbox == tuple(float(v) for v in pair.target.objects[pair.target_index].box)
        assert close_images(pair_unit.target, pair.target.image)
    assert len(load_task("semcorr", "spair", str(root), limit=2).units) == 2


@pytest.mark.parametrize("resolution", ["480p", None])
def test_davis_clips_equal_the_instance_masks(tmp_path, resolution):
    root = export_davis(tmp_path / "DAVIS", seed=3, n_clips=2, n_frames=4, config=CONFIG, resolution=resolution)
    data = load_task("tempcorr", "davis", str(root))
    assert [c.name for c in data.units] == ["clip0000", "clip0001"]
    for i, clip_unit in enumerate(data.units):
        clip = World(3, CONFIG).clip(i, n_frames=4)
        assert len(clip_unit.frames) == len(clip_unit.masks) == 4
        for t in range(4):
            assert np.array_equal(load_mask(clip_unit.masks[t]), clip.frames[t].instance_mask)
            assert close_images(clip_unit.frames[t], clip.frames[t].image)


# ---------------------------------------------------------------------------------------------
# the synthetic world


def test_synthetic_units_equal_the_world_for_every_task():
    options = {"n": 6, "image_size": 48}
    config = WorldConfig(image_size=48)
    fg = load_task("fgseg", "synthetic", None, shots=3, synthetic=options)
    assert len(fg.units) == 6
    for episode in fg.units:
        seeds = [s.meta["scene_seed"] for s in episode.support]
        assert episode.query.meta["scene_seed"] not in seeds and len(set(seeds)) == 3
        for sample in (episode.query, *episode.support):
            scene = scene_with_shape(sample.meta["scene_seed"], config, episode.category)
            assert np.array_equal(load_mask(sample.mask), expected_binary(scene, episode.category, False))
            assert load_mask(sample.mask).any()
            assert np.array_equal(np.asarray(load_image(sample.image)), scene.image)
    again = load_task("fgseg", "synthetic", None, shots=3, synthetic=options)
    assert np.array_equal(load_mask(again.units[2].support[1].mask), load_mask(fg.units[2].support[1].mask))

    co = load_task("coseg", "synthetic", None, synthetic={**options, "set_size": 3})
    for coset in co.units:
        shapes = {s.category for s in coset.samples}
        assert len(shapes) == 1 and len(coset.samples) == 3
        for sample in coset.samples:
            scene = scene_with_shape(sample.meta["scene_seed"], config, sample.category, exclusive=True)
            owners = [o for o in scene.objects if o.shape == sample.category]
            assert len(owners) == 1 and np.array_equal(load_mask(sample.mask), owners[0].mask.astype(np.uint8))

    text = load_task("textseg", "synthetic", None, synthetic=options)
    assert len(text.calibration) == 2 and not {u.meta["scene_seed"] for u in text.units} & {
        u.meta["scene_seed"] for u in text.calibration}
    for sample in text.units:
        scene = scene_with_shape(sample.meta["scene_seed"], config, sample.text)
        assert np.array_equal(load_mask(sample.mask), expected_binary(scene, sample.text, False))

    ref = load_task("refseg", "synthetic", None, synthetic=options)
    for sample in list(ref.units) + list(ref.calibration):
        scene = render_scene(sample.meta["scene_seed"], config)
        assert resolve(scene, sample.text) == [sample.meta["object"]]
        assert np.array_equal(load_mask(sample.mask), scene.objects[sample.meta["object"]].mask.astype(np.uint8))

    corr = load_task("semcorr", "synthetic", None, synthetic=options)
    assert [p.meta["mode"] for p in corr.units] == ["scene"] * 6  # the default: two scenes sharing a shape
    both = load_task("semcorr", "synthetic", None, synthetic={**options, "modes": PAIR_MODES})
    assert [p.meta["mode"] for p in both.units] == [PAIR_MODES[i % 2] for i in range(6)]
    for pair_unit in [*corr.units, *both.units]:
        pair = render_pair(pair_unit.meta["pair_seed"], config, mode=pair_unit.meta["mode"])
        target = pair.target.objects[pair.target_index]
        for x, y in pair_unit.target_xy:  # every target keypoint shows the target object
            assert pair.target.instance_mask[int(y), int(x)] == target.index + 1
        assert pair_unit.target_bbox == tuple(float(v) for v in target.box)

    clips = load_task("tempcorr", "synthetic", None, synthetic={**options, "n_frames": 3}, limit=2)
    assert len(clips.units) == 2
    for i, clip_unit in enumerate(clips.units):
        clip = render_clip(derive_seed(0, "perception", "tempcorr", i), config, n_frames=3)
        assert np.array_equal(load_mask(clip_unit.masks[2]), clip.frames[2].instance_mask)


# ---------------------------------------------------------------------------------------------
# mistakes


def test_each_mistake_is_one_user_error_line(tmp_path, pascal_root):
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "refs(unc).p").write_bytes(b"not read")
    bad_fold = tmp_path / "badfold"
    shutil.copytree(pascal_root, bad_fold)
    (bad_fold / "splits" / "pascal" / "val" / "fold0.txt").write_text("synth_000000_01\n")
    no_lists = tmp_path / "nolists"
    (no_lists / "JPEGImages").mkdir(parents=True)
    (no_lists / "SegmentationClassAug").mkdir()
    spair = tmp_path / "spair"
    (spair / "PairAnnotation" / "test").mkdir(parents=True)
    (spair / "PairAnnotation" / "test" / "x.json").write_text(json.dumps({"category": "cat", "src_kps": [[1, 2]]}))
    davis = tmp_path / "davis"
    (davis / "JPEGImages").mkdir(parents=True)
    cases = [
        (lambda: load_task("fgseg", "pascal5i", str(tmp_path / "absent")), "not a folder"),
        (lambda: load_task("fgseg", "pascal5i", None), "pass its root"),
        (lambda: load_task("fgseg", "msrc", str(tmp_path)), "does not serve"),
        (lambda: load_task("fgseg", "voc", str(tmp_path)), "unknown dataset format"),
        (lambda: load_task("depth", "synthetic", None), "unknown perception task"),
        (lambda: load_task("fgseg", "pascal5i", str(no_lists)), "split list"),
        (lambda: load_task("fgseg", "pascal5i", str(bad_fold)), "malformed line 1"),
        (lambda: load_task("fgseg", "pascal5i", str(pascal_root), fold=4), "fold must be"),
        (lambda: load_task("refseg", "refcoco", str(tmp_path / "refs")), "convert it once to JSON"),
        (lambda: load_task("refseg", "refcoco", str(tmp_path / "nolists")), "no RefCOCO annotations"),
        (lambda: load_task("semcorr", "spair", str(spair)), "malformed SPair-71k pair file"),
        (lambda: load_task("semcorr", "spair", str(spair), split="val"), "no SPair-71k pair folder"),
        (lambda: load_task("tempcorr", "davis", str(davis)), "no DAVIS sequence list"),
        (lambda: load_task("textseg", "imagenet-s", str(davis)), "validation-segmentation"),
        (lambda: load_task("coseg", "msrc", str(davis)), "no co-segmentation classes"),
        (lambda: load_task("fgseg", "synthetic", None, synthetic={"episodes": 3}), "unknown synthetic option"),
        (lambda: load_task("fgseg", "synthetic", None, limit=0), "limit must be"),
        (lambda: load_task("fgseg", "pascal5i", str(pascal_root), synthetic={"n": 2}), "only with fmt='synthetic'"),
    ]
    for call, words in cases:
        with pytest.raises(UserError) as info:
            call()
        message = str(info.value)
        assert words in message and "\n" not in message, message
