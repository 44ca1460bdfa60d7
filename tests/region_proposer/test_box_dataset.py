"""CocoBoxDataset: class-agnostic boxes from COCO JSON, with clear errors for bad boxes."""

import json

import numpy as np
import pytest
from mmengine.registry import DefaultScope
from PIL import Image

from region_proposer.pretrain import CocoBoxDataset


def _write_coco(root, annotations, images=None):
    images = images or [
        {"id": 1, "file_name": "a.png", "height": 20, "width": 30},
        {"id": 2, "file_name": "b.png", "height": 20, "width": 30},
    ]
    for info in images:
        Image.new("RGB", (info["width"], info["height"])).save(root / info["file_name"])
    coco = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "circle"}, {"id": 2, "name": "square"}],
    }
    (root / "ann.json").write_text(json.dumps(coco))


def _ann(ann_id, bbox, image_id=1, category_id=1, iscrowd=0):
    return {
        "id": ann_id,
        "image_id": image_id,
        "category_id": category_id,
        "bbox": bbox,
        "area": bbox[2] * bbox[3],
        "iscrowd": iscrowd,
    }


def test_loads_boxes_of_all_categories_as_xyxy(tmp_path):
    _write_coco(
        tmp_path,
        [
            _ann(1, [1, 2, 10, 5]),
            _ann(2, [0, 0, 30, 20], category_id=2),
            _ann(3, [5, 5, 2, 2], iscrowd=1),
        ],
    )
    ds = CocoBoxDataset(ann_file="ann.json", data_root=str(tmp_path), source="toy")
    assert len(ds) == 2
    first = ds.get_data_info(0)
    np.testing.assert_array_equal(first["gt_bboxes"], [[1, 2, 11, 7], [0, 0, 30, 20]])
    assert first["sample_id"] == "toy/1" and first["img_path"] == str(tmp_path / "a.png")
    assert ds.get_data_info(1)["gt_bboxes"].shape == (0, 4)  # image without objects kept
    assert len(CocoBoxDataset(ann_file="ann.json", data_root=str(tmp_path), filter_empty=True)) == 1


@pytest.mark.parametrize(
    "bbox, message",
    [
        ([1, 2, 0, 5], "degenerate bbox"),
        ([1, 2, 10, -1], "degenerate bbox"),
        ([25, 2, 10, 5], r"bbox \[25, 2, 10, 5\] lies outside the 30x20 image"),
    ],
)
def test_bad_boxes_raise_naming_annotation(tmp_path, bbox, message):
    _write_coco(tmp_path, [_ann(1, [1, 2, 10, 5]), _ann(7, bbox)])
    with pytest.raises(ValueError, match=f"ann.json: annotation id 7: {message}"):
        CocoBoxDataset(ann_file="ann.json", data_root=str(tmp_path))
    ds = CocoBoxDataset(ann_file="ann.json", data_root=str(tmp_path), on_bad_box="skip")
    assert ds.num_bad_boxes == 1 and len(ds.get_data_info(0)["gt_bboxes"]) == 1


def test_pipeline_runs_on_synthetic_annotations(tmp_path):
    from groma_px.data.synthetic import generate_dataset

    generate_dataset(tmp_path, 3, 0, 0, seed=1)
    with DefaultScope.overwrite_default_scope("region_proposer"):  # as the Runner sets it
        ds = CocoBoxDataset(
            ann_file="annotations/instances_train_agnostic.json",
            data_root=str(tmp_path),
            source="synthetic",
            pipeline=[
                dict(type="LoadImage"),
                dict(type="Resize", max_size=64),
                dict(type="PackProposerInputs"),
            ],
        )
    item = ds[0]
    assert max(item["inputs"].shape[1:]) == 64
    assert len(item["data_samples"].gt_instances.bboxes) >= 1
