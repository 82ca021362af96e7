"""Key blocking on a multiple-choice benchmark: the CV-Bench and plain JSONL loaders on a fixture, the unblocked
answers equal to the organism's own greedy answers, a zero-key block changing nothing, and the run folder; BLINK's
layout with a three-image subtask beside a single-image one, end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sightline.data.cvbench import (
    cvbench_items,
    load_bench,
    load_cvbench,
    load_mc_jsonl,
    write_cvbench_fixture,
)
from sightline.errors import UserError

SIZE = 64


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory):
    return write_cvbench_fixture(tmp_path_factory.mktemp("cvbench") / "cv", seed=3, n=6, image_size=SIZE)


def test_fixture_parquet_and_jsonl_read_the_same(fixture_root):
    from sightline.data.synthetic import NUMBERS, WorldConfig, derive_seed, render_scene

    pq = load_cvbench(fixture_root)  # the folder: test.parquet
    js = load_cvbench(fixture_root / "test_2d.jsonl")  # the JSONL with img/
    assert set(pq) == set(js) == {"Count", "Relation"}
    for task in pq:
        assert [(q.id, q.choices, q.answer, q.prompt) for q in pq[task]] == \
               [(q.id, q.choices, q.answer, q.prompt) for q in js[task]]
        for a, b in zip(pq[task], js[task]):
            assert np.array_equal(np.asarray(a.images()[0]), np.asarray(b.images()[0]))
    # the truth, recounted from the scenes: "How many objects are there?" names the visible objects
    items = cvbench_items(3, 6, SIZE)
    totals = [q for q in pq["Count"] if q.question == "How many objects are there?"]
    assert len(totals) == 6
    for i, q in enumerate(totals):
        scene = render_scene(derive_seed(3, "cvbench", i), WorldConfig(image_size=SIZE))
        assert q.choices[q.answer] == NUMBERS[sum(o.area > 0 for o in scene.objects)]
        assert len(set(q.choices)) == 4 and q.prompt.splitlines()[-1].startswith("(D) ")
        assert np.array_equal(np.asarray(q.images()[0]), np.asarray(scene.to_pil()))
    assert len(items) == sum(len(v) for v in pq.values())
    assert [q.id for q in load_cvbench(fixture_root, limit=2)["Count"]] == [q.id for q in pq["Count"][:2]]


def test_plain_jsonl(fixture_root, tmp_path):
    lines = [{"image": str(fixture_root / "img/2D/count/synthetic_0.png"), "question": "How many?",
              "choices": ["one", "two"], "answer": "two", "task": "Count"},
             {"image": "../" + fixture_root.name + "/img/2D/count/synthetic_0.png", "question": "Which?",
              "choices": ["a", "b", "c"], "answer": "(C)"},
             {"image": str(fixture_root / "img/2D/count/synthetic_0.png"), "prompt": "Idx?", "choices": ["x", "y"],
              "answer": 0, "qtype": "Count"},
             {"images": [str(fixture_root / "img/2D/count/synthetic_0.png"),
                         "../" + fixture_root.name + "/img/2D/count/synthetic_0.png"],
              "question": "Same?", "choices": ["yes", "no"], "answer": "B", "task": "Pair"}]
    sub = fixture_root.parent / "plain"
    sub.mkdir(exist_ok=True)
    path = sub / "mc.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines))
    got = load_bench(path, "jsonl")
    assert {t: [q.answer for q in qs] for t, qs in got.items()} == {"Count": [1, 0], "all": [2], "Pair": [1]}
    assert [im.size for im in got["Pair"][0].images()] == [(SIZE, SIZE)] * 2  # "images": several, in order
    assert got["all"][0].images()[0].size == (SIZE, SIZE)  # relative to the file's folder
    assert got["all"][0].prompt.endswith("(C) c")


def test_loader_errors_are_one_line(fixture_root, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    cases = []
    cases.append((lambda: load_cvbench(tmp_path / "nowhere"), "does not exist"))
    (tmp_path / "empty").mkdir()
    cases.append((lambda: load_cvbench(tmp_path / "empty"), "no CV-Bench file"))
    pq.write_table(pa.table({"question": ["q"], "answer": ["(A)"]}), tmp_path / "bad.parquet")
    cases.append((lambda: load_cvbench(tmp_path / "bad.parquet"), "no column choices"))
    (tmp_path / "noimages.jsonl").write_text('{"images": [], "question": "q", "choices": ["a"], "answer": "a"}\n')
    cases.append((lambda: load_mc_jsonl(tmp_path / "noimages.jsonl"), "non-empty list of image paths"))
    (tmp_path / "bad.jsonl").write_text('{"image": "x.png", "question": "q", "choices": ["a"], "answer": "z"}\n')
    cases.append((lambda: load_mc_jsonl(tmp_path / "bad.jsonl"), "neither one of the choices"))
    (tmp_path / "notjson.jsonl").write_text("{nope\n")
    cases.append((lambda: load_mc_jsonl(tmp_path / "notjson.jsonl"), "line 1 is not JSON"))
    cases.append((lambda: load_bench(fixture_root, "mmmu"), "bench-format"))
    for call, text in cases:
        with pytest.raises(UserError, match=text) as err:
            call()
        assert len(str(err.value).splitlines()) == 1


@pytest.fixture(scope="module")
def organism_bench(organism, tmp_path_factory):
    size = organism.config.vision_config.image_size
    root = write_cvbench_fixture(tmp_path_factory.mktemp("cvo") / "cv", seed=5, n=6, image_size=size)
    return root, load_cvbench(root)


def test_unblocked_answers_equal_plain_generation_and_zero_keys_change_nothing(organism, organism_bench):
    from sightline.kv.bench import bench_study
    from sightline.organism.evaluate import answer

    _, bench = organism_bench
    n_pos = organism.prepare([bench["Count"][0].images()[0]], [organism.render_prompt("")]).layouts[0] \
        .grid_positions(0, 0).size
    blocks = {"none": {}, "zero": {(2, 0): [], (3, 1): np.array([], int)}, "some": {(3, 0): np.arange(0, n_pos, 2)}}
    res = bench_study(organism, bench, blocks, n_positions=n_pos, prompt="question", batch_size=16)
    qs = [q for t in bench for q in bench[t]]
    ref = []
    for s in range(0, len(qs), 16):  # the same batches, no edit at all
        chunk = qs[s:s + 16]
        ref += answer(organism, [q.images()[0] for q in chunk], [q.question for q in chunk], max_new_tokens=12)
    items = res["items"]
    assert [it["generated"]["none"].lower() for it in items] == ref
    assert [it["generated"]["zero"] for it in items] == [it["generated"]["none"] for it in items]
    assert res["tasks"]["all"]["zero"]["changed"] == 0
    # accuracies and changes recounted from the items
    for task, per in res["tasks"].items():
        rows = [(q, it) for q, it in zip(qs, items) if task in ("all", q.subtask)]
        for c, e in per.items():
            right = sum(it["parsed"][c] == q.answer for q, it in rows)
            assert (e["n"], e["right"]) == (len(rows), right) and e["ci"][0] <= e["accuracy"] <= e["ci"][1]
            assert e["changed"] == sum(it["parsed"][c] != it["parsed"]["none"] for _, it in rows)
    # the organism answers counts in words: well above chance (1/4) unblocked
    assert res["tasks"]["Count"]["none"]["accuracy"] > 0.4


def test_run_folder_holds_the_benchmark(organism, organism_bench, tmp_path):
    from sightline.kv.run import KeysConfig, run_keys

    root, _ = organism_bench
    cfg = KeysConfig(out=str(tmp_path / "run"), n_images=6, layers="2-3", block_top_k=2, eval_scenes=0,
                     readout_scenes=0, bench=str(root), bench_prompt="question", bench_n=8, progress=False)
    res = run_keys(cfg, adapter=organism)
    assert KeysConfig.from_dict(json.loads((res.path / "config.json").read_text())) == cfg
    b = res.results["bench"]
    assert b["conditions"] == ["none", "agnostic", "random"]
    assert set(b["tasks"]) == {"Count", "Relation", "all"} and b["tasks"]["Count"]["none"]["n"] == 8
    assert res.summary["bench"]["changed"]["none"] == 0
    assert set(res.summary["bench"]["accuracy"]["random"]) == {"Count", "Relation", "all"}
    assert (res.path / "figures/bench_accuracy.png").exists()
    assert "Benchmark accuracy per task" in (res.path / "index.html").read_text()


def test_tiny_qwen_grid_follows_image_size(tiny_adapter, fixture_root):
    """A model whose token grid follows the image size: the benchmark images are resized to the scan's size, and
    an image of another size is refused in one line."""
    from sightline.kv.bench import bench_study

    ad = tiny_adapter("qwen2_5_vl")
    bench = {"Count": load_cvbench(fixture_root, limit=2)["Count"]}
    im = bench["Count"][0].images()[0].resize((112, 112))
    n_pos = ad.prepare([im], [ad.render_prompt("")]).layouts[0].grid_positions(0, 0).size
    res = bench_study(ad, bench, {"none": {}, "zero": {(1, 0): []}}, n_positions=n_pos, image_size=112)
    assert [it["generated"]["zero"] for it in res["items"]] == [it["generated"]["none"] for it in res["items"]]
    with pytest.raises(UserError, match="give --image-size") as err:
        bench_study(ad, bench, {"none": {}}, n_positions=n_pos)  # the fixture's 64-pixel images: another grid
    assert len(str(err.value).splitlines()) == 1


# ------------------------------------------------------------------ BLINK: several images per question
def write_blink_counting(root, seed: int, n: int, image_size: int):
    """A single-image subtask in BLINK's layout beside the style fixture: ROOT/Counting/val-*.parquet holding the
    first n count questions of `cvbench_items` (the organism answers them in words)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from sightline.data.blink import IMAGE_COLUMNS, LETTERS, lettered_prompt

    items = [it for it in cvbench_items(seed, n, image_size) if it["task"] == "Count"][:n]
    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    cols = {"idx": [], "question": [], "sub_task": [], **{c: [] for c in IMAGE_COLUMNS}, "choices": [], "answer": [],
            "prompt": []}
    for i, it in enumerate(items):
        buf = io.BytesIO()
        it["image"].save(buf, format="PNG")
        cols["idx"].append(f"val_Counting_{i + 1}")
        cols["question"].append(it["question"])
        cols["sub_task"].append("Counting")
        cols["image_1"].append({"bytes": buf.getvalue(), "path": f"c{i}.png"})
        for c in IMAGE_COLUMNS[1:]:
            cols[c].append(None)
        cols["choices"].append(it["choices"])
        cols["answer"].append(f"({LETTERS[it['answer']]})")
        cols["prompt"].append(lettered_prompt(it["question"], it["choices"]))
    schema = pa.schema([("idx", pa.string()), ("question", pa.string()), ("sub_task", pa.string()),
                        *[(c, image) for c in IMAGE_COLUMNS], ("choices", pa.list_(pa.string())),
                        ("answer", pa.string()), ("prompt", pa.string())])
    (root / "Counting").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols, schema=schema), root / "Counting" / "val-00000-of-00001.parquet")
    return root


@pytest.fixture(scope="module")
def blink_root(organism, tmp_path_factory):
    """Art_Style (three images a question) and Counting (one) in BLINK's layout, at the organism's image size."""
    from sightline.data.blink import write_style_fixture

    size = organism.config.vision_config.image_size
    root = write_style_fixture(tmp_path_factory.mktemp("blink") / "b", seed=2, n=4, image_size=size)
    return write_blink_counting(root, seed=5, n=8, image_size=size)


def _plain_generation(ad, questions, batch_size, max_new_tokens=12):
    """The greedy answers with no edit from the processor's own left-padded batch: each question's images in order,
    then its bare question, in the chat template."""
    from sightline.kv.surfacing import multi_image_prompt

    out = []
    for s in range(0, len(questions), batch_size):
        chunk = questions[s:s + batch_size]
        texts = [ad.render_prompt(q.question) if q.n_images == 1 else multi_image_prompt(ad, q.n_images, q.question)
                 for q in chunk]
        inputs = ad.processor(images=[im for q in chunk for im in q.images()], text=texts, return_tensors="pt",
                              padding=True, padding_side="left")
        gen = ad.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        out += [t.strip() for t in ad.tokenizer.batch_decode(gen[:, inputs["input_ids"].shape[1]:],
                                                             skip_special_tokens=True)]
    return out


def test_blink_multi_image_unblocked_is_plain_generation_and_the_block_reaches_every_image(organism, blink_root):
    from sightline.data.blink import load_blink
    from sightline.kv.bench import bench_study

    bench = load_blink(blink_root)
    assert {t: [q.n_images for q in qs] for t, qs in bench.items()} == {"Art_Style": [3] * 4, "Counting": [1] * 8}
    n_pos = 64
    # every: every key of the grid at every layer and head, so every key of every image when the block reaches them all
    blocks = {"none": {}, "zero": {(2, 0): [], (3, 1): np.array([], int)},
              "every": {(L, h): np.arange(n_pos) for L in range(organism.n_layers) for h in (0, 1)}}
    res = bench_study(organism, bench, blocks, n_positions=n_pos, prompt="question", batch_size=12)
    qs = [q for t in bench for q in bench[t]]
    items = res["items"]
    assert [it["generated"]["none"] for it in items] == _plain_generation(organism, qs, 12)  # one mixed batch
    assert [it["generated"]["zero"] for it in items] == [it["generated"]["none"] for it in items]
    assert res["tasks"]["all"]["zero"]["changed"] == 0 and [it["n_images"] for it in items] == [3] * 4 + [1] * 8
    # the answers to the three-image prompts (one question text) differ with their images; with every key of every
    # image blocked from the text, they cannot (the organism's template puts no text between the images)
    style = [it["generated"] for it in items if it["task"] == "Art_Style"]
    assert len({g["none"] for g in style}) > 1 and len({g["every"] for g in style}) == 1


def test_keys_cli_on_blink_with_a_three_image_subtask(blink_root, tmp_path, capsys):
    from sightline.cli import main

    out = tmp_path / "run"
    assert main(["keys", "--bench", str(blink_root), "--bench-format", "blink", "--bench-prompt", "question",
                 "--n-images", "6", "--layers", "2-3", "--block-top-k", "2", "--eval-scenes", "0",
                 "--readout-scenes", "0", "--out", str(out), "--no-progress"]) == 0
    res = json.loads((out / "results.json").read_text())
    s, b = res["summary"], res["bench"]
    assert s["bench"]["n_questions"] == 12 and not s["warnings"]
    assert b["conditions"] == ["none", "agnostic", "random"]
    for task, n in (("Art_Style", 4), ("Counting", 8), ("all", 12)):
        assert {c: b["tasks"][task][c]["n"] for c in b["conditions"]} == dict.fromkeys(b["conditions"], n)
        for c in b["conditions"]:  # the summary's accuracy, recounted from the items
            rows = [it for it in b["items"] if task in ("all", it["task"])]
            assert s["bench"]["accuracy"][c][task] == sum(it["parsed"][c] == it["answer"] for it in rows) / n
    assert sorted({it["n_images"] for it in b["items"]}) == [1, 3]
    assert s["bench"]["changed"]["none"] == 0
    # the organism counts in words: well above chance (1/4) unblocked
    assert s["bench"]["accuracy"]["none"]["Counting"] > 0.4
    page = (out / "index.html").read_text()
    assert "Benchmark accuracy per task" in page and "Art_Style" in page


def test_a_model_without_multi_image_layouts_leaves_those_subtasks_out(tiny_adapter, blink_root):
    """LLaVA-OneVision lays out one image per prompt: its multi-image subtasks are left out with a warning, or
    refused in one line when named (before any scan)."""
    from sightline.kv.run import KeysConfig, _load_bench

    ad = tiny_adapter("llava_onevision")
    warnings: list[str] = []
    cfg = KeysConfig(bench=str(blink_root), bench_format="blink")
    assert set(_load_bench(cfg, ad, warnings)) == {"Counting"}
    assert len(warnings) == 1 and "Art_Style" in warnings[0]
    with pytest.raises(UserError, match="--bench-subtasks Art_Style shows several images") as err:
        _load_bench(KeysConfig(bench=str(blink_root), bench_format="blink", bench_subtasks="Art_Style"), ad, [])
    assert len(str(err.value).splitlines()) == 1
