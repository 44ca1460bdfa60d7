"""GroundedConversationDataset validation: one test per kind of bad record, and skip mode."""

import copy
import json
import logging

import numpy as np
import pytest
from mmengine.logging import MMLogger
from PIL import Image
from pycocotools import mask as mask_utils

from groma_px.data import GroundedConversationDataset, RecordError


def _rle(height, width, box):
    m = np.zeros((height, width), dtype=np.uint8)
    x0, y0, x1, y1 = box
    m[y0:y1, x0:x1] = 1
    rle = mask_utils.encode(np.asfortranarray(m))
    return {"size": [height, width], "counts": rle["counts"].decode()}


def _good_record(i=0):
    return {
        "id": f"toy/{i}",
        "image": "images/a.png",
        "height": 30,
        "width": 40,
        "task": "rec",
        "source": "toy",
        "regions": [
            {"box": [2, 3, 12, 13], "category": "square", "mask": _rle(30, 40, (2, 3, 12, 13))},
            {"box": [20, 5, 40, 30], "category": "circle"},
        ],
        "conversations": [
            {"from": "human", "value": "<image>\n[grounding] Where is the circle?"},
            {"from": "gpt", "value": "<p>the circle</p><roi><ground_box></roi>", "regions": [1]},
        ],
        "meta": {"target": [1]},
    }


@pytest.fixture
def root(tmp_path):
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), (90, 90, 90)).save(tmp_path / "images" / "a.png")
    return tmp_path


def _write(root, records, raw_lines=()):
    lines = [json.dumps(r) for r in records] + list(raw_lines)
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    return root / "data.jsonl"


def _load(root, **kwargs):
    return GroundedConversationDataset(ann_file="data.jsonl", data_root=str(root), **kwargs)


def test_good_records_load_unchanged(root):
    records = [_good_record(0), _good_record(1)]
    _write(root, records)
    ds = _load(root)
    assert len(ds) == 2
    item = ds.get_data_info(1)
    for key, value in records[1].items():
        assert item[key] == value
    assert item["img_path"] == str(root / "images" / "a.png")


def _bad(mutate):
    record = _good_record(1)
    mutate(record)
    return record


BAD_CASES = {
    "missing_image": (lambda r: r.update(image="images/missing.png"), "image", "file not found"),
    "box_out_of_bounds": (
        lambda r: r["regions"][1].update(box=[20, 5, 41, 30]),
        "regions[1].box",
        "outside the image",
    ),
    "zero_area_box": (
        lambda r: r["regions"][0].update(box=[2, 3, 2, 13]),
        "regions[0].box",
        "degenerate",
    ),
    "placeholder_mismatch": (
        lambda r: r["conversations"][1].update(regions=[1, 0]),
        "conversations[1].regions",
        "1 placeholders in the text but 2 cited regions",
    ),
    "citation_out_of_range": (
        lambda r: r["conversations"][1].update(regions=[5]),
        "conversations[1].regions",
        "cites regions [5]",
    ),
    "unknown_task": (lambda r: r.update(task="vqa_magic"), "task", "unknown task 'vqa_magic'"),
    "missing_field": (lambda r: r.pop("regions"), "regions", "required field is missing"),
    "unknown_field": (lambda r: r.update(extra=1), "extra", "unknown field"),
    "size_mismatch": (lambda r: r.update(width=41), "width/height", "record says 41x30"),
    "mask_size": (
        lambda r: r["regions"][0].update(mask=_rle(31, 40, (2, 3, 12, 13))),
        "regions[0].mask",
        "size [31, 40]",
    ),
    "mask_undecodable": (
        lambda r: r["regions"][0]["mask"].update(counts="zzzz"),
        "regions[0].mask",
        "outside the RLE alphabet",
    ),
    "mask_runs_short": (
        lambda r: r["regions"][0]["mask"].update(counts=_rle(30, 39, (2, 3, 12, 13))["counts"]),
        "regions[0].mask",
        "counts cover 1170 pixels, not height * width = 1200",
    ),
    "mask_empty": (
        lambda r: r["regions"][0].update(mask=_rle(30, 40, (0, 0, 0, 0))),
        "regions[0].mask",
        "empty mask",
    ),
    "mask_uncompressed": (
        lambda r: r["regions"][0]["mask"].update(counts=[1200]),
        "regions[0].mask",
        "compressed RLE string",
    ),
    "prompt_kind": (
        lambda r: r["regions"][0].update(prompt="scribble"),
        "regions[0].prompt",
        "must be one of",
    ),
    "point_outside": (
        lambda r: r["regions"][1].update(prompt="point", point=[45.0, 3.0]),
        "regions[1].point",
        "outside the image",
    ),
    "point_missing": (
        lambda r: r["regions"][1].update(prompt="point"),
        "regions[1].point",
        "must be [x, y]",
    ),
    "mask_prompt_without_mask": (
        lambda r: r["regions"][1].update(prompt="mask"),
        "regions[1].prompt",
        "needs the region's 'mask'",
    ),
    "role_order": (
        lambda r: r["conversations"][0].update({"from": "gpt"}),
        "conversations[0].from",
        "expected 'human'",
    ),
    "no_image_token": (
        lambda r: r["conversations"][0].update(value="Where is the circle?"),
        "conversations",
        "exactly one <image>",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_record_raises_with_file_line_field(root, case):
    mutate, field, message = BAD_CASES[case]
    path = _write(root, [_good_record(0), _bad(mutate)])
    with pytest.raises(RecordError) as info:
        _load(root)
    err = info.value
    assert (err.file, err.line, err.field) == (str(path), 2, field)
    assert message in err.message
    assert str(err).startswith(f"{path}:2: {field}: ")


def test_corrupt_image_bytes(root):
    (root / "images" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    path = _write(root, [_bad(lambda r: r.update(image="images/bad.png"))])
    with pytest.raises(RecordError, match=rf"{path}:1: image: cannot decode"):
        _load(root)


def test_truncated_json_line(root):
    line = json.dumps(_good_record(1))[:-25]
    path = _write(root, [_good_record(0)], raw_lines=[line])
    with pytest.raises(RecordError, match=rf"{path}:2: <json>: invalid JSON"):
        _load(root)


def test_duplicate_id(root):
    _write(root, [_good_record(0), _good_record(0)])
    with pytest.raises(RecordError, match="duplicate id 'toy/0' \\(first on line 1\\)"):
        _load(root)


def test_skip_mode_counts_logs_and_keeps_good_records(root):
    bad_lines = [json.dumps(_good_record(9))[:-3]]
    records = [_good_record(0), _bad(BAD_CASES["unknown_task"][0]), _good_record(2)]
    _write(root, records, raw_lines=bad_lines)
    logger = MMLogger.get_current_instance()
    messages = []
    handler = logging.Handler(level=logging.WARNING)
    handler.emit = lambda rec: messages.append(rec.getMessage())
    logger.addHandler(handler)
    try:
        ds = _load(root, on_bad_record="skip")
    finally:
        logger.removeHandler(handler)
    assert any("skipped 2 bad records (task: 1, <json>: 1)" in m for m in messages), messages
    assert [ds.get_data_info(i)["id"] for i in range(len(ds))] == ["toy/0", "toy/2"]
    assert [(e.line, e.field) for e in ds.bad_records] == [(2, "task"), (4, "<json>")]


def test_task_filter_and_policy_errors(root):
    other = _good_record(1)
    other["task"] = "counting"
    _write(root, [_good_record(0), other])
    assert len(_load(root, tasks=["counting"])) == 1
    with pytest.raises(ValueError, match="on_bad_record must be one of"):
        _load(root, on_bad_record="ignore")
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        GroundedConversationDataset(ann_file="nope.jsonl", data_root=str(root))


def test_skip_does_not_mutate_input_records(root):
    record = _good_record(0)
    snapshot = copy.deepcopy(record)
    _write(root, [record])
    ds = _load(root)
    stored = {k: v for k, v in ds.get_data_info(0).items() if k in snapshot}
    assert stored == snapshot


def test_validate_data_cli_names_file_line_and_mask_field(root, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "tools" / "validate_data.py"
    spec = importlib.util.spec_from_file_location("validate_data", script)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    bad = _bad(lambda r: r["regions"][0].update(mask=_rle(31, 40, (2, 3, 12, 13))))
    path = _write(root, [_good_record(0), bad])
    assert cli.main([str(path)]) == 1
    out = capsys.readouterr().out
    assert f"{path}:2: regions[0].mask: size [31, 40] != image [height, width] [30, 40]" in out
    assert "1 good records (rec: 1), 1 bad" in out
