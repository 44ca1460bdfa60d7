"""Synthetic scenes: determinism, exact masks, unambiguous expressions, tasks, COCO, CLI."""

import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from groma_px.data import RecordValidator
from groma_px.data.schema import IMAGE_PLACEHOLDER, count_region_placeholders
from groma_px.data.synthetic import (
    COLORS,
    RELATIONS,
    SHAPES,
    SIZES,
    SPLITS,
    Description,
    ObjectSpec,
    ReferringExpression,
    Scene,
    SceneObject,
    compose_scene,
    encode_mask,
    find_unique_expression,
    generate_dataset,
    image_rng,
    is_unambiguous,
    rasterize,
    relation_holds,
    render_scene,
    sample_scene,
)
from groma_px.data.synthetic.expressions import RELATION_PHRASES
from groma_px.data.synthetic.scene import PIXEL_NOISE
from groma_px.data.synthetic.tasks import RES_QUESTIONS

REPO = Path(__file__).resolve().parents[2]
SIZES_NUM = (6, 3, 3)
_WORD = {"size": "|".join(SIZES), "color": "|".join(COLORS), "shape": "|".join([*SHAPES, "object"])}
_DESC = rf"(?:({_WORD['size']}) )?(?:({_WORD['color']}) )?({_WORD['shape']})"
_EXPR = re.compile(rf"the {_DESC}(?: ({'|'.join(RELATION_PHRASES.values())}) the {_DESC})?")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    generate_dataset(out, *SIZES_NUM, seed=0, workers=1)
    records = {s: [json.loads(line) for line in open(out / f"{s}.jsonl")] for s in SPLITS}
    return out, records


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _description(size, color, shape) -> Description:
    return Description(None if shape == "object" else shape, color, size)


def _parse(text: str) -> ReferringExpression:
    match = _EXPR.fullmatch(text)
    assert match, text
    size, color, shape, phrase, a_size, a_color, a_shape = match.groups()
    if phrase is None:
        return ReferringExpression(_description(size, color, shape))
    relation = next(r for r, p in RELATION_PHRASES.items() if p == phrase)
    return ReferringExpression(
        _description(size, color, shape), relation, _description(a_size, a_color, a_shape)
    )


def _scene_from_record(record) -> Scene:
    """Rebuilds the expression-relevant scene (attributes + visible boxes) from a record on disk."""
    objects = tuple(
        SceneObject(
            ObjectSpec(
                r["category"], r["attributes"]["color"], r["attributes"]["size"], 0.0, 0.0, 0.0
            ),
            tuple(r["box"]),
            1.0,
        )
        for r in record["regions"]
    )
    return Scene(record["height"], record["width"], "noise", 0, objects)


def _all_records(dataset):
    return [r for split in SPLITS for r in dataset[1][split]]


def test_same_seed_identical_files_any_workers(dataset, tmp_path):
    out, _ = dataset
    generate_dataset(tmp_path / "w2", *SIZES_NUM, seed=0, workers=2, chunksize=2)
    reference = _hashes(out)
    assert len(reference) == sum(SIZES_NUM) + 3 + 6 + 1  # images, jsonl, coco, meta
    assert _hashes(tmp_path / "w2") == reference


def test_different_seed_differs_and_splits_disjoint(dataset, tmp_path):
    out, _ = dataset
    generate_dataset(tmp_path / "s1", *SIZES_NUM, seed=1)
    reference, other = _hashes(out), _hashes(tmp_path / "s1")
    assert reference.keys() == other.keys()
    assert all(reference[k] != other[k] for k in reference if k.endswith((".png", ".jsonl")))
    images = {k: v for k, v in reference.items() if k.endswith(".png")}
    assert len(set(images.values())) == len(images)  # no image repeats within or across splits


def test_masks_exact_and_boxes_tight(dataset):
    out, records = dataset
    for record in {r["image"]: r for r in _all_records((None, records))}.values():
        image = np.asarray(Image.open(out / record["image"])).astype(int)
        assert image.shape == (record["height"], record["width"], 3)
        union = np.zeros(image.shape[:2], dtype=bool)
        for region in record["regions"]:
            rle = {"size": region["mask"]["size"], "counts": region["mask"]["counts"].encode()}
            mask = mask_utils.decode(rle).astype(bool)
            assert not (mask & union).any()  # visible masks are disjoint
            union |= mask
            color = np.array(COLORS[region["attributes"]["color"]])
            assert np.abs(image[mask] - color).max() <= PIXEL_NOISE
            ys, xs = np.nonzero(mask)
            tight = [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
            x, y, w, h = mask_utils.toBbox(rle)
            assert region["box"] == tight == [x, y, x + w, y + h]
        # No object-coloured pixel outside the masks: masks are not eroded or missing pixels.
        for color in COLORS.values():
            near = np.abs(image - np.array(color)).max(axis=-1) <= PIXEL_NOISE
            assert not (near & ~union).any()


def test_render_masks_match_rasterised_geometry():
    scene = sample_scene(image_rng(3, 0, 7))
    image, masks = render_scene(scene)
    covered = np.zeros(image.shape[:2], dtype=bool)
    for i in reversed(range(len(scene.objects))):
        full = rasterize(scene.objects[i].spec, scene.height, scene.width)
        np.testing.assert_array_equal(masks[i], full & ~covered)
        covered |= full
    again, masks_again = render_scene(scene)
    np.testing.assert_array_equal(image, again)


def _hand_scene() -> Scene:
    """Small red circle (left), large red circle (right), medium blue square (bottom middle)."""
    return compose_scene(
        200,
        300,
        [
            ObjectSpec("circle", "red", "small", 40.0, 60.0, 14.0),
            ObjectSpec("circle", "red", "large", 220.0, 60.0, 45.0),
            ObjectSpec("square", "blue", "medium", 140.0, 160.0, 25.0),
        ],
    )


def test_attribute_expressions_checked_for_uniqueness():
    scene = _hand_scene()
    red_circle = ReferringExpression(Description("circle", "red"))
    assert red_circle.render() == "the red circle"
    assert red_circle.matches(scene) == [0, 1] and not is_unambiguous(red_circle, scene)
    small_red_circle = ReferringExpression(Description("circle", "red", "small"))
    assert small_red_circle.render() == "the small red circle"
    assert small_red_circle.matches(scene) == [0] and is_unambiguous(small_red_circle, scene)
    rngs = [np.random.default_rng(s) for s in range(20)]
    chosen = {find_unique_expression(scene, 0, rng).render() for rng in rngs}
    assert chosen == {"the small circle", "the small object"}  # the shortest, ties randomised
    assert find_unique_expression(scene, 2, np.random.default_rng(0)).render() == "the square"


def test_relation_needs_unique_anchor():
    specs = [
        ObjectSpec("square", "blue", "small", 20.0, 100.0, 12.0),
        ObjectSpec("star", "green", "medium", 80.0, 100.0, 25.0),
        ObjectSpec("star", "green", "medium", 220.0, 100.0, 25.0),
        ObjectSpec("square", "blue", "small", 280.0, 100.0, 12.0),
    ]
    scene = compose_scene(200, 300, specs)
    ambiguous_anchor = ReferringExpression(Description("square"), "left", Description("star"))
    assert ambiguous_anchor.render() == "the square to the left of the star"
    assert ambiguous_anchor.matches(scene) == [0]  # names one object, but which star?
    assert not is_unambiguous(ambiguous_anchor, scene)
    assert find_unique_expression(scene, 0, np.random.default_rng(0)) is None  # no unique anchor
    with_anchor = compose_scene(
        200, 300, [*specs, ObjectSpec("triangle", "red", "small", 150.0, 40.0, 12.0)]
    )
    expression = find_unique_expression(with_anchor, 0, np.random.default_rng(0))
    assert expression.anchor is not None and expression.matches(with_anchor) == [0]
    assert len(expression.anchor.matches(with_anchor)) == 1


@pytest.mark.parametrize(
    "relation, box_b, holds",
    [
        ("left", (5, 0, 9, 9), False),
        ("left", (6, 0, 9, 9), True),
        ("right", (0, 0, 5, 9), False),
        ("right", (0, 0, 4, 9), True),
        ("above", (0, 5, 9, 9), False),
        ("above", (0, 6, 9, 9), True),
        ("below", (0, 0, 9, 5), False),
        ("below", (0, 0, 9, 4), True),
    ],
)
def test_relation_boundaries(relation, box_b, holds):
    assert relation in RELATIONS
    assert relation_holds(relation, (0, 0, 10, 10), box_b) is holds  # A's centre is (5, 5)


def test_generated_rec_expressions_recheck(dataset):
    for record in (r for r in _all_records(dataset) if r["task"] in ("rec", "res")):
        expression = _parse(record["meta"]["expression"])
        scene = _scene_from_record(record)
        assert expression.matches(scene) == record["meta"]["target"]
        assert is_unambiguous(expression, scene)
        assert record["conversations"][1]["regions"] == record["meta"]["target"]
    relational = 0
    for i in range(40):
        scene = sample_scene(image_rng(5, 0, i))
        for target in range(len(scene.objects)):
            expression = find_unique_expression(scene, target, np.random.default_rng(i))
            if expression is not None:
                assert _parse(expression.render()) == expression
                assert expression.matches(scene) == [target] and is_unambiguous(expression, scene)
                relational += expression.anchor is not None
    assert relational > 0


def test_counting_and_multi_grounding_answers(dataset):
    tasks_seen = set()
    zero_counts = 0
    for record in _all_records(dataset):
        tasks_seen.add(record["task"])
        attrs = [
            (r["category"], r["attributes"]["color"], r["attributes"]["size"])
            for r in record["regions"]
        ]
        answer = record["conversations"][1]["value"]
        if record["task"] == "counting":
            meta = record["meta"]
            true = [i for i, a in enumerate(attrs) if meta.get("category", meta.get("color")) in a]
            assert meta["count"] == len(true) == len(meta["target"])
            grammar = "There is 1 " if len(true) == 1 else f"There are {len(true)} "
            assert answer.startswith(grammar)
            zero_counts += len(true) == 0
        elif record["task"] == "multi_grounding":
            phrase = re.fullmatch(r"<p>all the (.+)</p><roi>(?:<ground_box>)+</roi>", answer)[1]
            words = phrase.split()
            words[-1] = words[-1][:-2] if words[-1] == "crosses" else words[-1][:-1]
            true = [i for i, a in enumerate(attrs) if all(w in a for w in words if w != "object")]
            assert len(true) >= 2
            assert record["conversations"][1]["regions"] == true == record["meta"]["target"]
    assert tasks_seen == {
        "rec",
        "multi_grounding",
        "region_caption",
        "grounded_caption",
        "counting",
        "res",
    }
    assert zero_counts > 0


def test_records_valid_and_placeholders_match(dataset):
    out, _ = dataset
    validator = RecordValidator(out)
    for record in _all_records(dataset):
        validator(record)
        turns = record["conversations"]
        assert turns[0]["value"].count(IMAGE_PLACEHOLDER) == 1
        assert sum(t["value"].count(IMAGE_PLACEHOLDER) for t in turns) == 1
        for turn in turns:
            assert count_region_placeholders(turn["value"]) == len(turn["regions"])
        if record["task"] == "grounded_caption":
            assert sorted(turns[1]["regions"]) == list(range(len(record["regions"])))
        if record["task"] == "region_caption":
            region = record["regions"][turns[0]["regions"][0]]
            words = f"{region['attributes']['size']} {region['attributes']['color']}"
            assert re.fullmatch(
                rf"an? {words} {region['category']}(, partly hidden)?", turns[1]["value"]
            )


def test_res_records_cite_the_target_mask(dataset):
    out, _ = dataset
    res = [r for r in _all_records(dataset) if r["task"] == "res"]
    assert res and all(isinstance(r["meta"]["relational"], bool) for r in res)
    per_image, templates = {}, set()
    for record in res:
        per_image[record["image"]] = per_image.get(record["image"], 0) + 1
        question, answer = (t["value"] for t in record["conversations"])
        expression = record["meta"]["expression"]
        (target,) = record["meta"]["target"]
        (template,) = (
            q
            for q in RES_QUESTIONS
            if question == f"{IMAGE_PLACEHOLDER}\n[grounding] " + q.format(expression)
        )
        templates.add(template)
        assert answer == f"<p>{expression}</p><roi><ground_box></roi>"
        assert record["conversations"][1]["regions"] == [target]
        assert record["conversations"][0]["regions"] == []
        assert _parse(expression).matches(_scene_from_record(record)) == [target]
        assert record["meta"]["relational"] == (_parse(expression).anchor is not None)
        # The cited region's mask is the target's exact pixels: the object's colour, non-empty.
        image = np.asarray(Image.open(out / record["image"])).astype(int)
        region = record["regions"][target]
        mask = mask_utils.decode({**region["mask"], "counts": region["mask"]["counts"].encode()})
        color = np.array(COLORS[region["attributes"]["color"]])
        assert mask.any() and np.abs(image[mask.astype(bool)] - color).max() <= PIXEL_NOISE
    assert max(per_image.values()) <= 2
    assert len(templates) > 2  # several phrasings, each question one of them


def test_new_tasks_leave_the_records_of_older_tasks_unchanged(dataset):
    """res draws from its own stream: without it, the records are generator 1.0's."""
    from groma_px.data.synthetic import build_records, scene_regions
    from groma_px.data.synthetic.tasks import SHARED_STREAM_TASKS, SOURCE

    _, records = dataset
    index = 1
    rng = image_rng(0, 0, index)
    scene = sample_scene(rng)
    _, masks = render_scene(scene)
    regions = scene_regions(scene, [encode_mask(m) for m in masks])
    image = f"images/train/{index:06d}.png"
    prefix = f"{SOURCE}/train/{index:06d}"
    on_disk = [r for r in records["train"] if r["image"] == image]
    rebuilt = build_records(
        scene,
        regions,
        rng,
        task_rngs={"res": np.random.default_rng(99)},
        record_prefix=prefix,
        image_path=image,
    )
    older = [r for r in rebuilt if r["task"] in SHARED_STREAM_TASKS]
    assert older == [r for r in on_disk if r["task"] in SHARED_STREAM_TASKS]
    assert [r["task"] for r in on_disk] == [r["task"] for r in older] + ["res"] * (
        len(on_disk) - len(older)
    )
    with pytest.raises(KeyError, match="task_rngs"):
        build_records(scene, regions, rng, task_rngs={}, record_prefix=prefix, image_path=image)


def test_coco_files_load(dataset):
    out, records = dataset
    for split in SPLITS:
        per_image = {r["image"]: r["regions"] for r in records[split]}
        coco = COCO(str(out / "annotations" / f"instances_{split}.json"))
        agnostic = COCO(str(out / "annotations" / f"instances_{split}_agnostic.json"))
        assert len(coco.getImgIds()) == len(per_image) == len(agnostic.getImgIds())
        num_objects = sum(map(len, per_image.values()))
        assert len(coco.getAnnIds()) == num_objects == len(agnostic.getAnnIds())
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SHAPES)
        assert [c["name"] for c in agnostic.loadCats(agnostic.getCatIds())] == ["object"]
        for image in coco.loadImgs(coco.getImgIds()):
            anns = coco.loadAnns(coco.getAnnIds(imgIds=image["id"]))
            for ann, region in zip(anns, per_image[image["file_name"]], strict=True):
                x0, y0, x1, y1 = region["box"]
                assert ann["bbox"] == [x0, y0, x1 - x0, y1 - y0]
                assert ann["area"] == coco.annToMask(ann).sum() and ann["iscrowd"] == 0
                assert coco.cats[ann["category_id"]]["name"] == region["category"]
                assert ann["color"] == region["attributes"]["color"]


def test_scene_statistics_over_50_images():
    scenes = [sample_scene(image_rng(11, 0, i)) for i in range(50)]
    shapes = {o.shape for s in scenes for o in s.objects}
    colors = {o.color for s in scenes for o in s.objects}
    assert len(shapes) >= 5 and colors == set(COLORS) and len(COLORS) == 6
    assert any(s.height != s.width for s in scenes)
    assert len({(s.height, s.width) for s in scenes}) > 10
    assert all(1 <= len(s.objects) <= 8 for s in scenes)
    assert len({len(s.objects) for s in scenes}) > 4
    visible = [o.visible_fraction for s in scenes for o in s.objects]
    assert min(visible) >= 0.6 and sum(v < 1.0 for v in visible) > 5  # occlusion, bounded
    bounds = sorted(SIZES.values())
    assert all(a[1] < b[0] for a, b in itertools.pairwise(bounds))  # sizes do not overlap
    for scene in scenes:
        for obj in scene.objects:
            low, high = SIZES[obj.size]
            assert low <= obj.spec.radius / min(scene.height, scene.width) <= high + 1e-3
            full = rasterize(obj.spec, scene.height, scene.width)
            border = np.concatenate([full[0], full[-1], full[:, 0], full[:, -1]])
            assert not border.any()  # the whole shape lies inside the image


def test_same_colour_objects_never_touch():
    for i in range(30):
        scene = sample_scene(image_rng(13, 0, i))
        _, masks = render_scene(scene)
        for a in range(len(masks)):
            grown = np.zeros_like(masks[a])
            ys, xs = np.nonzero(masks[a])
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    grown[
                        np.clip(ys + dy, 0, scene.height - 1), np.clip(xs + dx, 0, scene.width - 1)
                    ] = True
            for b in range(a + 1, len(masks)):
                if scene.objects[a].color == scene.objects[b].color:
                    assert not (grown & masks[b]).any()


def test_cli_prints_summary(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "make_synthetic.py"),
            "--out",
            str(tmp_path),
            "--num-train",
            "3",
            "--num-val",
            "1",
            "--num-test",
            "1",
            "--seed",
            "2",
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=120,
    )
    assert re.search(r"^\s*train\s+3\s+\d+", result.stdout, re.M), result.stdout
    assert "images/s" in result.stdout and "rec" in result.stdout
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert meta["seed"] == 2 and meta["splits"]["val"]["images"] == 1
    assert len(list((tmp_path / "images" / "train").glob("*.png"))) == 3
