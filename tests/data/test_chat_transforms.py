"""LoadGroundedRecord + PackGroundedChatInputs on GroundedConversationDataset records."""

import copy
import json

import numpy as np
import pytest
import torch
from mmengine.structures import BaseDataElement
from PIL import Image

from groma_px.data import GroundedConversationDataset
from groma_px.data.chat_transforms import LoadGroundedRecord, PackGroundedChatInputs
from groma_px.llm.tokenizer import build_tokenizer
from groma_px.llm.vocab import GroundingVocab
from groma_px.registry import TRANSFORMS
from region_proposer.pretrain.transforms import LoadImage, Resize, to_original_boxes

VOCAB = GroundingVocab(8)
WIDTH, HEIGHT = 41, 30  # odd, non-square
BOXES = [[2.0, 3.0, 12.0, 13.0], [20.0, 5.0, 41.0, 30.0]]
CAPTION = {
    "id": "toy/0/region_caption",
    "task": "region_caption",
    "conversations": [
        {"from": "human", "value": "<image>\nWhat is in <roi><refer_box></roi>?", "regions": [1]},
        {"from": "gpt", "value": "a large red circle"},
    ],
}
REC = {
    "id": "toy/0/rec",
    "task": "rec",
    "conversations": [
        {"from": "human", "value": "<image>\n[grounding] Where is the blue square?"},
        {"from": "gpt", "value": "<p>the blue square</p><roi><ground_box></roi>", "regions": [0]},
    ],
    "meta": {"target": [0]},
}


def make_record(partial):
    common = {"image": "images/a.png", "height": HEIGHT, "width": WIDTH, "source": "toy"}
    regions = [{"box": box} for box in BOXES]
    return {**common, "regions": regions, **copy.deepcopy(partial)}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("chat")
    (root / "images").mkdir()
    Image.new("RGB", (WIDTH, HEIGHT), (90, 120, 150)).save(root / "images" / "a.png")
    lines = [json.dumps(make_record(r)) for r in (CAPTION, REC)]
    (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    corpus = [t["value"] for r in (CAPTION, REC) for t in r["conversations"]] * 4
    build_tokenizer(corpus, vocab=VOCAB, vocab_size=300).save_pretrained(str(root / "tok"))
    return root


def pack(root, **kwargs):
    kwargs.setdefault("template", "plain")
    return PackGroundedChatInputs(tokenizer=str(root / "tok"), **kwargs)


def pipeline(root, **kwargs):
    return [LoadGroundedRecord(), LoadImage(), Resize(max_size=64), pack(root, **kwargs)]


def dataset(root, **kwargs):
    return GroundedConversationDataset(
        ann_file="data.jsonl", data_root=str(root), pipeline=pipeline(root, **kwargs)
    )


def run(root, record, **kwargs):
    """The pipeline on one record dict (bypassing the dataset's validation)."""
    results = {**make_record(record), "img_path": str(root / "images" / "a.png")}
    for transform in pipeline(root, **kwargs):
        results = transform(results)
    return results


def test_pack_shapes_and_metainfo(root):
    out = dataset(root)[1]
    sample = out["data_samples"]
    assert isinstance(sample, BaseDataElement)
    h, w = sample.img_shape
    assert out["inputs"].shape == (3, h, w) and out["inputs"].dtype == torch.uint8
    assert max(h, w) == 64 and sample.ori_shape == (HEIGHT, WIDTH)
    assert sample.input_ids.dtype == torch.long and sample.label_mask.dtype == torch.bool
    assert sample.input_ids.shape == sample.label_mask.shape
    assert sample.sample_id == REC["id"] and sample.task == "rec" and sample.source == "toy"
    assert sample.meta == REC["meta"] and sample.flip is False
    assert sample.answer == REC["conversations"][1]["value"] and sample.answer_regions == [0]


def test_gt_boxes_follow_resize_and_affine_maps_back(root):
    sample = dataset(root)[0]["data_samples"]
    h, w = sample.img_shape
    scale = torch.tensor([w / WIDTH, h / HEIGHT, w / WIDTH, h / HEIGHT])
    expected = torch.tensor(BOXES) * scale
    assert sample.gt_boxes.dtype == torch.float32
    torch.testing.assert_close(sample.gt_boxes, expected)
    torch.testing.assert_close(
        to_original_boxes(sample.gt_boxes, sample.metainfo), torch.tensor(BOXES)
    )


def test_label_mask_covers_the_answer_and_eos(root):
    tok = pack(root).tokenizer
    sample = dataset(root)[1]["data_samples"]
    supervised = sample.input_ids[sample.label_mask].tolist()
    assert tok.decode(supervised) == f" {REC['conversations'][1]['value']}</s>"
    assert sample.input_ids[0] == tok.bos_token_id
    assert (sample.input_ids == VOCAB.token_ids(tok).image).sum() == 1


@pytest.mark.parametrize(
    ("index", "ref_regions", "ref_is_user"), [(0, [1], [True]), (1, [0], [False])]
)
def test_ref_regions_and_ref_is_user(root, index, ref_regions, ref_is_user):
    sample = dataset(root)[index]["data_samples"]
    ids = VOCAB.token_ids(pack(root).tokenizer)
    placeholder = ids.refer_box if ref_is_user[0] else ids.ground_box
    assert (sample.input_ids == placeholder).sum() == 1
    assert sample.ref_regions.tolist() == ref_regions and sample.ref_regions.dtype == torch.long
    assert sample.ref_is_user.tolist() == ref_is_user and sample.ref_is_user.dtype == torch.bool


def test_predict_drops_the_last_answer(root):
    train = dataset(root)[1]["data_samples"]
    predict = dataset(root, mode="predict")[1]["data_samples"]
    n = predict.input_ids.numel()
    assert torch.equal(predict.input_ids, train.input_ids[:n]) and n < train.input_ids.numel()
    assert not predict.label_mask.any()
    assert predict.ref_regions.numel() == 0 and predict.ref_is_user.numel() == 0
    assert predict.answer == REC["conversations"][1]["value"] and predict.answer_regions == [0]
    assert predict.question == REC["conversations"][0]["value"]
    # A user box of a human turn stays in the prompt.
    assert dataset(root, mode="predict")[0]["data_samples"].ref_regions.tolist() == [1]


def test_auto_mode_reads_test_mode(root):
    transform = pack(root, mode="auto")
    results = run(root, REC)["data_samples"]
    base = {**make_record(REC), "img_path": str(root / "images" / "a.png")}
    loaded = Resize(max_size=64)(LoadImage()(LoadGroundedRecord()(base)))
    predict = transform({**loaded, "test_mode": True})["data_samples"]
    train = transform({**loaded, "test_mode": False})["data_samples"]
    assert torch.equal(train.input_ids, results.input_ids)
    assert predict.input_ids.numel() < train.input_ids.numel()
    with pytest.raises(KeyError, match="test_mode"):
        transform(loaded)


def test_registered_and_groma_template(root):
    transform = TRANSFORMS.build(
        dict(type="PackGroundedChatInputs", tokenizer=str(root / "tok"), num_region_tokens=8)
    )
    assert isinstance(transform, PackGroundedChatInputs)
    assert transform.tokenizer is pack(root).tokenizer  # loaded once per process
    base = {**make_record(CAPTION), "img_path": str(root / "images" / "a.png")}
    sample = transform(LoadImage()(LoadGroundedRecord()(base)))["data_samples"]
    assert transform.tokenizer.decode(sample.input_ids).startswith("<s>A chat between")


def test_load_record_without_regions():
    results = LoadGroundedRecord()({**make_record(REC), "regions": []})
    assert results["gt_bboxes"].shape == (0, 4) and results["gt_bboxes"].dtype == np.float32
    assert results["sample_id"] == REC["id"]


def test_bad_turn_order_names_the_sample(root):
    record = copy.deepcopy(REC)
    record["conversations"].reverse()
    with pytest.raises(ValueError, match=r"sample 'toy/0/rec': conversations\[0\]"):
        run(root, record)


@pytest.mark.parametrize("regions", [[], [0, 1]])
def test_placeholder_mismatch_names_the_sample_and_turn(root, regions):
    record = copy.deepcopy(CAPTION)
    record["conversations"][0]["regions"] = regions
    with pytest.raises(ValueError, match=r"sample 'toy/0/region_caption': conversations\[0\]"):
        run(root, record)


def test_citation_out_of_range_names_the_sample(root):
    record = copy.deepcopy(REC)
    record["conversations"][1]["regions"] = [5]
    with pytest.raises(ValueError, match=r"'toy/0/rec': conversations\[1\] cites regions \[5\]"):
        run(root, record)


def test_max_length_raises_instead_of_truncating(root):
    length = dataset(root)[1]["data_samples"].input_ids.numel()
    assert dataset(root, max_length=length)[1]["data_samples"].input_ids.numel() == length
    with pytest.raises(ValueError, match=rf"sample 'toy/0/rec': {length} tokens exceed"):
        dataset(root, max_length=length - 1)[1]


def test_tokenizer_vocabulary_is_checked(root):
    with pytest.raises(KeyError, match="<r8>"):
        run(root, REC, num_region_tokens=16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "eval"}, "mode"),
        ({"max_length": 0}, "max_length"),
        ({"template": "vicuna_v9"}, "known"),
    ],
)
def test_bad_arguments_raise(root, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pack(root, **kwargs)


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory"):
        _ = PackGroundedChatInputs(tokenizer=str(tmp_path / "none")).tokenizer


# ------------------------------------------------------------------------------ masks
def _rect_rle(box, height=HEIGHT, width=WIDTH):
    from groma_px.data.masks import encode_mask

    mask = np.zeros((height, width), dtype=bool)
    x0, y0, x1, y1 = (int(v) for v in box)
    mask[y0:y1, x0:x1] = True
    return encode_mask(mask)


def _masked(record, masks=None):
    """``record`` with region 0's exact rectangle mask (or ``masks``); region 1 has none."""
    out = make_record(record)
    masks = masks if masks is not None else [_rect_rle(BOXES[0]), None]
    for region, rle in zip(out["regions"], masks, strict=True):
        if rle is not None:
            region["mask"] = rle
    return out


def _run_masked(root, results, **kwargs):
    transforms = [LoadGroundedRecord(with_mask=True), LoadImage(), Resize(max_size=64)]
    results = {**results, "img_path": str(root / "images" / "a.png")}
    for transform in [*transforms, pack(root, **kwargs)]:
        results = transform(results)
    return results["data_samples"]


def test_load_record_decodes_masks():
    record = _masked(REC)
    out = LoadGroundedRecord(with_mask=True)(copy.deepcopy(record))
    assert out["gt_masks"].shape == (2, HEIGHT, WIDTH) and out["gt_masks"].dtype == np.uint8
    ys, xs = np.nonzero(out["gt_masks"][0])
    assert [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1] == BOXES[0]
    assert not out["gt_masks"][1].any()  # no mask: an all-zero row, marked invalid
    assert out["gt_mask_valid"].tolist() == [True, False]
    assert "gt_masks" not in LoadGroundedRecord()(copy.deepcopy(record))
    assert repr(LoadGroundedRecord(with_mask=True)) == "LoadGroundedRecord(with_mask=True)"
    empty = LoadGroundedRecord(with_mask=True)({**make_record(REC), "regions": []})
    assert empty["gt_masks"].shape == (0, HEIGHT, WIDTH) and empty["gt_mask_valid"].shape == (0,)


@pytest.mark.parametrize(
    ("rle", "match"),
    [
        (_rect_rle(BOXES[1], HEIGHT + 1, WIDTH), r"size \[31, 41\] != image"),
        ({"size": [HEIGHT, WIDTH], "counts": "zzzz"}, "counts holds characters outside"),
        ({"size": [HEIGHT, WIDTH], "counts": "51"}, "counts cover 6 pixels"),
        ({"size": [HEIGHT, WIDTH]}, "must be a COCO RLE object with 'size' and 'counts'"),
    ],
)
def test_bad_mask_names_the_record_and_region(rle, match):
    record = _masked(REC, [_rect_rle(BOXES[0]), rle])
    with pytest.raises(ValueError, match=rf"record 'toy/0/rec': regions\[1\]\.mask: {match}"):
        LoadGroundedRecord(with_mask=True)(record)


def test_pack_masks_follow_the_resized_image(root):
    record = _masked(REC)
    sample = _run_masked(root, copy.deepcopy(record))
    h, w = sample.img_shape
    assert sample.gt_masks.shape == (2, h, w) and sample.gt_masks.dtype == torch.bool
    assert sample.gt_mask_valid.tolist() == [True, False]
    ys, xs = torch.nonzero(sample.gt_masks[0], as_tuple=True)
    tight = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
    assert (tight - sample.gt_boxes[0]).abs().max() <= 0.5  # nearest resize: half a pixel
    assert not sample.gt_masks[1].any()
    # The original RLEs travel as metainfo, for metrics at the original resolution.
    assert sample.gt_masks_rle == [record["regions"][0]["mask"], None]
    predict = _run_masked(root, copy.deepcopy(record), mode="predict")
    assert torch.equal(predict.gt_masks, sample.gt_masks)


def test_pack_without_masks_keeps_the_rles_only(root):
    results = {**_masked(REC), "img_path": str(root / "images" / "a.png")}
    for transform in pipeline(root):
        results = transform(results)
    sample = results["data_samples"]
    assert "gt_masks" not in sample and "gt_mask_valid" not in sample
    assert sample.gt_masks_rle[0]["size"] == [HEIGHT, WIDTH] and sample.gt_masks_rle[1] is None


def test_pack_rejects_masks_not_matching_the_image(root):
    base = {**_masked(REC), "img_path": str(root / "images" / "a.png")}
    loaded = LoadImage()(LoadGroundedRecord(with_mask=True)(base))
    loaded["gt_masks"] = loaded["gt_masks"][:, :, :-1]
    with pytest.raises(ValueError, match=r"sample 'toy/0/rec': gt_masks of shape \(2, 30, 40\)"):
        pack(root)(loaded)


def _caption_with_masks():
    return _masked(CAPTION, [_rect_rle(BOXES[0]), _rect_rle(BOXES[1])])


@pytest.mark.parametrize(
    ("point_prob", "mask_prob", "kind"), [(1.0, 0.0, "point"), (0.0, 1.0, "mask")]
)
def test_random_visual_prompts_turn_cited_boxes_into_points_or_masks(point_prob, mask_prob, kind):
    from groma_px.data.chat_transforms import RandomVisualPrompts

    np.random.seed(0)
    results = LoadGroundedRecord(with_mask=True)(_caption_with_masks())
    assert results["region_prompts"] == [None, None]  # boxes by default
    out = RandomVisualPrompts(point_prob=point_prob, mask_prob=mask_prob)(results)
    assert out["region_prompts"][0] is None  # region 0 is not cited by a human turn
    prompt = out["region_prompts"][1]
    assert prompt["kind"] == kind
    if kind == "point":
        x, y = prompt["point"]
        assert out["gt_masks"][1][int(y), int(x)]  # drawn from the region's own mask
    keep = RandomVisualPrompts(point_prob=0.0, mask_prob=0.0)(
        LoadGroundedRecord(with_mask=True)(_caption_with_masks())
    )
    assert keep["region_prompts"] == [None, None]


def test_random_visual_prompts_need_masks_and_valid_probabilities():
    from groma_px.data.chat_transforms import RandomVisualPrompts

    with pytest.raises(ValueError, match="with_mask=True"):
        RandomVisualPrompts()(LoadGroundedRecord()(make_record(CAPTION)))
    with pytest.raises(ValueError, match="sum <= 1"):
        RandomVisualPrompts(point_prob=0.7, mask_prob=0.5)


def test_record_prompts_reach_the_metainfo(root):
    record = _caption_with_masks()
    record["regions"][1].update(prompt="point", point=[30.0, 10.0])
    sample = _run_masked(root, record)
    assert sample.region_prompts == [None, {"kind": "point", "point": [30.0, 10.0]}]
