"""Deterministic synthetic grounded scenes: the framework's embedded default dataset.

Coloured shapes of several sizes on muted textures, with occlusion, exact masks, provably
unambiguous referring expressions (boxes and segmentation), region captions, grounded captions and
counting questions, written in the record format of ``groma_px.data.schema`` plus COCO instances
JSON.

In memory::

    rng = image_rng(seed=0, split_index=0, image_index=0)
    scene = sample_scene(rng)
    image, masks = render_scene(scene)   # (H, W, 3) uint8, [(H, W) bool] per object

On disk: ``generate_dataset(out_dir, num_train, num_val, num_test, seed, workers=2)``.
"""

from .expressions import (
    RELATIONS,
    Description,
    ReferringExpression,
    find_unique_expression,
    is_unambiguous,
    relation_holds,
)
from .scene import (
    BACKGROUNDS,
    COLORS,
    SHAPES,
    SIZES,
    ObjectSpec,
    Scene,
    SceneObject,
    compose_scene,
    rasterize,
    render_scene,
    sample_scene,
)
from .tasks import SYNTHETIC_TASKS, build_records, scene_regions
from .writer import GENERATOR_VERSION, SPLITS, encode_mask, generate_dataset, image_rng

__all__ = [
    "BACKGROUNDS",
    "COLORS",
    "GENERATOR_VERSION",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "SYNTHETIC_TASKS",
    "Description",
    "ObjectSpec",
    "ReferringExpression",
    "Scene",
    "SceneObject",
    "build_records",
    "compose_scene",
    "encode_mask",
    "find_unique_expression",
    "generate_dataset",
    "image_rng",
    "is_unambiguous",
    "rasterize",
    "relation_holds",
    "render_scene",
    "sample_scene",
    "scene_regions",
]
