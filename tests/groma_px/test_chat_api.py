"""Inference API: export_pretrained / GroundedChat.from_pretrained, GroundedChat conversations,
and tools/chat.py, on the tiny config (configs/tiny/groma-px_tiny.py)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.registry import DefaultScope
from PIL import Image

from groma_px.inference import GroundedChat
from groma_px.inference.export import export_pretrained, load_state_dict_strict
from groma_px.registry import MODELS
from groma_px.structures import GroundedResponse, RegionSource

ROOT = Path(__file__).resolve().parents[2]
# Test image 0 of the tiny dataset is 179 x 149 pixels with one object at [37, 44, 106, 114].
IMAGE = "images/test/000000.png"
BOX = [37.0, 44.0, 106.0, 114.0]

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def exported(make_tiny_cfg, tmp_path_factory):
    """A tiny GromaPX (seed 0) and the directory it was exported to."""
    root = tmp_path_factory.mktemp("export")
    cfg = make_tiny_cfg(root / "work")
    torch.manual_seed(0)
    with DefaultScope.overwrite_default_scope("groma_px"):
        model = MODELS.build(cfg.model).eval()
    return model, export_pretrained(model, cfg, root / "model")


@pytest.fixture(scope="module")
def chat(exported):
    return GroundedChat.from_pretrained(exported[1])


@pytest.fixture
def image_path(tiny_data):
    return tiny_data["data_root"] / IMAGE


# ------------------------------------------------------------------------------ export
def test_export_round_trip(exported, chat):
    model, directory = exported
    assert {p.name for p in directory.iterdir()} == {"config.py", "model.safetensors", "tokenizer"}
    assert not list(directory.parent.glob(".model.*"))  # no staging directory left behind
    original, loaded = model.state_dict(), chat.model.state_dict()
    assert original.keys() == loaded.keys()
    different = [k for k in original if not torch.equal(original[k], loaded[k])]
    assert not different
    assert not chat.model.training
    assert chat.model.tokenizer.get_vocab() == model.tokenizer.get_vocab()
    # The exported config points into the export directory, wherever it was written from.
    assert "{export_dir}/tokenizer" in (directory / "config.py").read_text()


@pytest.mark.parametrize("name", ["config.py", "model.safetensors", "tokenizer"])
def test_load_names_missing_file(exported, tmp_path, name):
    copy = shutil.copytree(exported[1], tmp_path / "model")
    target = copy / name
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=rf"{name} is missing"):
        GroundedChat.from_pretrained(copy)


def test_load_state_dict_strict_names_keys(exported):
    model = exported[0]
    state = dict(model.state_dict())
    dropped = "image_tokenizer.proj.0.weight"
    del state[dropped]
    state["region_encoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError) as info:
        load_state_dict_strict(model, state, source="weights.safetensors")
    message = str(info.value)
    assert "weights.safetensors" in message
    assert f"missing keys ['{dropped}'] (1)" in message
    assert "unexpected keys ['region_encoder.extra.weight'] (1)" in message
    load_state_dict_strict(model, dict(model.state_dict()), source="same")  # exact: loads


# ------------------------------------------------------------------------------ GroundedChat
def test_chat_on_an_array_returns_grounded_response(chat, image_path):
    image = np.asarray(Image.open(image_path).convert("RGB"))
    response = chat.chat(image, "[grounding] Where is the circle?")
    assert isinstance(response, GroundedResponse)
    assert isinstance(response.raw_text, str)
    for region in response.regions:  # cited regions, if any, lie in the image
        x0, y0, x1, y1 = region.box
        assert 0 <= x0 <= x1 <= image.shape[1] and 0 <= y0 <= y1 <= image.shape[0]


def test_each_array_image_gets_its_own_file(chat):
    # Array images are written to files for the pipeline; a conversation's file must never be
    # reused by a later image (ids of freed objects are, so they cannot name the files).
    convs = [chat.start(np.full((20, 30, 3), i, np.uint8)) for i in range(3)]
    paths = [chat.start(np.full((20, 30, 3), 100 + i, np.uint8)).image_path for i in range(20)]
    assert len(set(paths) | {c.image_path for c in convs}) == 23
    for i, conv in enumerate(convs):
        with Image.open(conv.image_path) as image:
            assert (np.asarray(image) == i).all() and (conv.width, conv.height) == (30, 20)


def test_box_prompt_is_kept_as_user_region(chat, image_path, monkeypatch):
    selections = []
    select = type(chat.model.selector).__call__

    def spy(self, *args, **kwargs):
        selections.append(select(self, *args, **kwargs))
        return selections[-1]

    monkeypatch.setattr(type(chat.model.selector), "__call__", spy)
    conv = chat.start(image_path, regions=[{"box": BOX}])
    assert isinstance(chat.chat(conv, "What object is shown?"), GroundedResponse)
    # No placeholder in the text: the region is appended to the first turn and cited there.
    assert conv.turns[0]["value"].endswith("<roi><refer_box></roi>")
    assert conv.turns[0]["regions"] == [0]
    torch.testing.assert_close(conv.kept_boxes[0], torch.tensor(BOX), atol=1e-3, rtol=0)
    (selection,) = selections
    assert int(selection.source[0]) == RegionSource.USER and float(selection.scores[0]) == 1.0
    assert (selection.source[1:] == RegionSource.PROPOSER).all()


def test_multi_turn_keeps_the_region_set(chat, image_path):
    conv = chat.start(image_path, regions=[{"box": [10, 20, 60, 90]}])
    chat.chat(conv, "What is in <refer_box>?")
    first = conv.kept_boxes.clone()
    chat.chat(conv, "And what colour is it?")
    assert torch.equal(conv.kept_boxes, first)
    assert len(conv.turns) == 4 and len(conv.responses) == 2
    assert [t["from"] for t in conv.turns] == ["human", "gpt", "human", "gpt"]
    # The answer goes back verbatim, less tokens only the prompt builder may place.
    raw = conv.responses[0].raw_text
    for token in ("<image>", "<region>", "<refer_box>", "<ground_box>", "<refer_feat>"):
        raw = raw.replace(token, "")
    assert conv.turns[1]["value"] == raw


@pytest.mark.parametrize(
    "box",
    [
        [0, 0, 180, 10],  # x1 beyond the 179-pixel width
        [0, 0, 10, 150],  # y1 beyond the 149-pixel height
        [-1, 0, 10, 10],
        [10, 5, 10, 20],  # x0 == x1
        [30, 5, 10, 20],  # x0 > x1
        [10, 20, 30, 20],  # y0 == y1
        [0, 0, float("nan"), 10],
        [0, 0, 10],
    ],
)
def test_bad_boxes_raise(chat, image_path, box):
    with pytest.raises(ValueError, match=r"regions\[0\]\.box"):
        chat.chat(image_path, "What is in <refer_box>?", regions=[{"box": box}])


def test_region_count_and_fixed_region_set(chat, image_path):
    top_k = chat.model.selector.top_k
    boxes = [{"box": [i, i, i + 20, i + 20]} for i in range(top_k + 1)]
    with pytest.raises(
        ValueError, match=f"{top_k + 1} user regions but the model has only {top_k}"
    ):
        chat.start(image_path, regions=boxes)
    with pytest.raises(ValueError, match=r"regions\[1\] must be a dict with exactly one of 'box'"):
        chat.start(image_path, regions=[{"box": BOX}, [1, 2, 3, 4]])
    conv = chat.start(image_path)
    with pytest.raises(ValueError, match="regions are fixed"):
        chat.chat(conv, "What is this?", regions=[{"box": BOX}])
    # Citing more regions than the conversation holds is refused before the model runs.
    with pytest.raises(ValueError, match="cites 1 regions with placeholders but .* has 0"):
        chat.chat(conv, "What is in <refer_box>?")
    with pytest.raises(FileNotFoundError, match="image not found"):
        chat.start(image_path.with_name("missing.png"))


# ------------------------------------------------------------------------------ tools/chat.py
def _chat_tool():
    spec = importlib.util.spec_from_file_location("chat_tool", ROOT / "tools" / "chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_chat_tool_prints_json_and_writes_png(exported, image_path, tmp_path, capsys):
    tool = _chat_tool()
    out = tmp_path / "pictures" / "answer.png"
    base = ["--checkpoint", str(exported[1]), "--image", str(image_path)]
    tool.main(
        [*base, "--query", "What is in <refer_box>?", "--box", *map(str, BOX), "--out", str(out)]
    )
    printed = capsys.readouterr().out
    assert printed.rstrip().endswith(f"wrote {out}")
    result = json.loads(printed[: printed.rindex("wrote ")])
    assert {"spans", "regions", "text", "raw_text", "image", "queries"} <= set(result)
    with Image.open(out) as picture, Image.open(image_path) as image:
        assert picture.width >= image.width and picture.height > image.height  # plus caption
    # Two turns: one answer per query, no picture.
    tool.main([*base, "--query", "Describe the image.", "--query", "Anything else?"])
    result = json.loads(capsys.readouterr().out)
    assert len(result["answers"]) == 2 and all("spans" in a for a in result["answers"])
    # Point and mask prompts from the command line: both become user regions (score 1).
    mask_png = tmp_path / "mask.png"
    with Image.open(image_path) as image:
        mask = np.zeros((image.height, image.width), dtype=np.uint8)
    mask[44:114, 37:106] = 255
    Image.fromarray(mask).save(mask_png)
    query = "What is in <refer_box> and <refer_box>?"
    tool.main([*base, "--query", query, "--point", "70", "80", "--mask", str(mask_png)])
    result = json.loads(capsys.readouterr().out)
    assert "spans" in result


def test_replayed_answers_keep_citations_and_drop_prompt_only_tokens():
    from groma_px.inference.chat import _replayable

    raw = "<p>a star</p><roi><r1></roi> and <image><region><ground_box>"
    assert _replayable(raw) == "<p>a star</p><roi><r1></roi> and "


# ------------------------------------------------------------------------------ visual prompts
def _rect_mask(height, width, box):
    mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    return mask


def test_point_and_mask_prompts_become_the_intended_region(chat, image_path, monkeypatch):
    width, height = Image.open(image_path).size
    seen = {}
    original = type(chat.model.region_encoder).forward

    def spy(self, pyramid, boxes, image=None, masks=None):
        seen["masks"] = masks
        return original(self, pyramid, boxes, image=image, masks=masks)

    monkeypatch.setattr(type(chat.model.region_encoder), "forward", spy)
    # A point inside the object: the user region is a proposal that contains it (in pixels).
    point = (70.0, 80.0)
    conv = chat.start(image_path, regions=[{"point": point}])
    chat.chat(conv, "What object is shown?")
    x0, y0, x1, y1 = conv.kept_boxes[0].tolist()
    assert x0 <= point[0] <= x1 and y0 <= point[1] <= y1 and (x1 - x0) * (y1 - y0) > 1
    assert seen["masks"] is None
    # A mask: its tight box is the user region, and the region is mask-pooled.
    mask = _rect_mask(height, width, BOX)
    mask[60:70, 50:60] = False  # a hole: the tight box stays BOX
    conv = chat.start(image_path, regions=[{"mask": mask}])
    chat.chat(conv, "What object is shown?")
    torch.testing.assert_close(conv.kept_boxes[0], torch.tensor(BOX), atol=1e-3, rtol=0)
    (per_image,) = seen["masks"]
    (row, pooled) = next(iter(per_image.items()))
    assert row == 0 and pooled.dtype == torch.bool and pooled.any()
    # The same mask as COCO RLE gives the same answer.
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    a = chat.chat(image_path, "What object is shown?", regions=[{"mask": mask}])
    b = chat.chat(image_path, "What object is shown?", regions=[{"mask": rle}])
    assert a.raw_text == b.raw_text


@pytest.mark.parametrize(
    ("region", "match"),
    [
        ({"point": (500.0, 10.0)}, r"regions\[0\]\.point .* lies outside the 179x149 image"),
        ({"point": (1.0,)}, r"regions\[0\]\.point must be 2 finite numbers"),
        ({"mask": np.ones((10, 10), dtype=bool)}, r"regions\[0\]\.mask has shape \(10, 10\)"),
        ({"mask": np.zeros((149, 179), dtype=bool)}, r"regions\[0\]\.mask is empty"),
        ({"mask": {"size": [149, 178], "counts": "abc"}}, r"RLE has size \[149, 178\]"),
        ({"box": BOX, "point": (1.0, 1.0)}, "exactly one of 'box'"),
    ],
)
def test_bad_visual_prompts_raise_clear_errors(chat, image_path, region, match):
    with pytest.raises(ValueError, match=match):
        chat.chat(image_path, "What is it?", regions=[region])


def test_more_prompts_than_region_tokens_is_an_error(chat, image_path):
    top_k = chat.model.selector.top_k
    prompts = [{"point": (10.0 + i, 10.0)} for i in range(top_k + 1)]
    with pytest.raises(ValueError, match=f"{top_k + 1} user regions but the model has only"):
        chat.start(image_path, regions=prompts)


def test_prompt_caption_accuracy_asks_each_record_with_every_prompt_kind(chat, tiny_data):
    from groma_px.engine.stages import prompt_caption_accuracy

    asked = []
    original = chat.chat

    def spy(image, text, regions=None):
        asked.append(next(iter(regions[0])))
        return original(image, text, regions=regions)

    chat.chat = spy
    try:
        out = prompt_caption_accuracy(chat, tiny_data["data_root"], limit=2)
    finally:
        del chat.chat
    assert out["prompt/count"] == 2
    assert asked == ["box", "point", "mask"] * 2
    assert all(0.0 <= out[f"prompt/{k}_acc"] <= 1.0 for k in ("box", "point", "mask"))
