"""Turns a synthetic scene into grounded-conversation records (``groma_px.data.schema``).

Tasks: ``rec`` (one unambiguous referring expression -> one box), ``multi_grounding`` (a plural
phrase -> all the boxes it names), ``region_caption`` (a cited box -> its description),
``grounded_caption`` (an image description citing every object), ``counting`` and ``res``
(referring segmentation: an unambiguous expression -> the region whose exact mask is the answer).
Every record of an image carries all its objects as ``regions`` (box and exact visible mask), in
scene (z-) order; a turn's ``regions`` lists the region each placeholder cites, in order. Random
choices (templates, which objects) come from the image's random streams, so records are as
reproducible as the pixels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from ..schema import ASSISTANT, GROUND_BOX, HUMAN, IMAGE_PLACEHOLDER, REFER_BOX
from .expressions import Description, find_unique_expression, with_article
from .scene import COLORS, SHAPES, Scene, SceneObject

SOURCE = "synthetic"
SYNTHETIC_TASKS = (
    "rec",
    "multi_grounding",
    "region_caption",
    "grounded_caption",
    "counting",
    "res",
)
#: The tasks of generator 1.0, which draw in this order from the stream that sampled the scene.
#: Each later task draws from a stream of its own (``build_records(task_rngs=...)``), so adding
#: a task leaves the records of the others byte-identical.
SHARED_STREAM_TASKS = SYNTHETIC_TASKS[:5]
#: Objects less visible than this are "partly hidden" in captions and ``occluded`` in attributes.
OCCLUDED_BELOW = 0.9
MAX_MULTI_GROUNDING = 2
MAX_REGION_CAPTIONS = 2
MAX_RES = 2
ZERO_COUNT_PROB = 0.3

REC_QUESTIONS = ("Where is {}?", "Locate {} in the image.", "Find {}.", "Point out {}.")
MULTI_QUESTIONS = ("Find {}.", "Where are {}?", "Locate {} in the image.", "Point out {}.")
REGION_QUESTIONS = (
    "What is in {}?",
    "Describe {} briefly.",
    "What object is shown in {}?",
    "What do you see in {}?",
)
CAPTION_QUESTIONS = ("Describe the image.", "Describe the image briefly.", "What does it show?")
RES_QUESTIONS = (
    "Segment {}.",
    "Give the mask of {}.",
    "Segment {} in the image.",
    "Show the segmentation mask of {}.",
    "Outline {}.",
)
COUNT_QUESTIONS = ("How many {} are there?", "How many {} are in the image?", "Count the {}.")
BACKGROUND_WORDS = {
    "noise": "noisy",
    "gradient": "shaded",
    "stripes": "striped",
    "checker": "checkered",
    "blobs": "blotchy",
}

Conversation = tuple[list[dict[str, Any]], dict[str, Any]]  # (turns, meta)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def _ground(phrase: str, num_boxes: int = 1) -> str:
    """ "<p>phrase</p><roi><ground_box>...</roi>" citing ``num_boxes`` regions."""
    return f"<p>{phrase}</p><roi>{GROUND_BOX * num_boxes}</roi>"


def _turns(question: str, answer: str, *, asked: list[int], answered: list[int]) -> list[dict]:
    """One human turn (with the image) and one assistant turn, each listing its cited regions."""
    return [
        {"from": HUMAN, "value": f"{IMAGE_PLACEHOLDER}\n{question}", "regions": asked},
        {"from": ASSISTANT, "value": answer, "regions": answered},
    ]


def object_phrase(obj: SceneObject) -> str:
    """Full description with article: "a small red circle", "an orange star"."""
    return with_article(Description(obj.shape, obj.color, obj.size).render())


def scene_regions(scene: Scene, rles: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Record ``regions``: one per object in scene order, with box, shape category and RLE mask.

    Args:
        scene: The scene.
        rles: Per object, its visible mask as COCO RLE with str counts.

    Returns:
        Region dicts of the schema; attributes hold colour, size and whether it is occluded.
    """
    return [
        {
            "box": list(obj.box),
            "category": obj.shape,
            "mask": rle,
            "attributes": {
                "color": obj.color,
                "size": obj.size,
                "occluded": obj.visible_fraction < OCCLUDED_BELOW,
            },
        }
        for obj, rle in zip(scene.objects, rles, strict=True)
    ]


def rec_conversations(scene: Scene, rng: np.random.Generator) -> list[Conversation]:
    """One referring-expression conversation per object that has an unambiguous expression."""
    found = (_referring(scene, t, rng, REC_QUESTIONS) for t in range(len(scene.objects)))
    return [conversation for conversation in found if conversation is not None]


def _referring(
    scene: Scene, target: int, rng: np.random.Generator, questions: tuple[str, ...]
) -> Conversation | None:
    """A grounded question about ``target`` by its unique expression, or None if it has none."""
    expression = find_unique_expression(scene, target, rng)
    if expression is None:
        return None
    text = expression.render()
    question = "[grounding] " + _pick(rng, questions).format(text)
    meta = {"target": [target], "expression": text, "relational": expression.anchor is not None}
    return _turns(question, _ground(text), asked=[], answered=[target]), meta


def res_conversations(scene: Scene, rng: np.random.Generator) -> list[Conversation]:
    """Referring segmentation ("Segment the blue star."), for up to 2 objects.

    Targets are taken in random order among the objects that have an unambiguous expression
    (:func:`find_unique_expression`, as for ``rec``); the answer cites the target's region, whose
    exact visible mask the record holds.
    """
    out = []
    for k in rng.permutation(len(scene.objects)):
        conversation = _referring(scene, int(k), rng, RES_QUESTIONS)
        if conversation is None:
            continue
        out.append(conversation)
        if len(out) == MAX_RES:
            break
    return out


def _group_descriptions(scene: Scene) -> dict[tuple[int, ...], Description]:
    """Per set of >= 2 objects that some 1- or 2-attribute description names, its shortest one."""
    groups: dict[tuple[int, ...], Description] = {}
    for obj in scene.objects:
        candidates = [
            Description(shape=obj.shape),
            Description(color=obj.color),
            Description(size=obj.size),
            Description(obj.shape, obj.color),
            Description(obj.shape, size=obj.size),
            Description(color=obj.color, size=obj.size),
        ]
        for description in candidates:
            matched = tuple(description.matches(scene))
            if len(matched) >= 2 and matched not in groups:
                groups[matched] = description  # candidates go from fewer words to more
    return groups


def multi_grounding_conversations(scene: Scene, rng: np.random.Generator) -> list[Conversation]:
    """Plural phrases ("all the triangles") citing every object they name, for up to 2 groups."""
    groups = list(_group_descriptions(scene).items())
    out = []
    for k in rng.permutation(len(groups))[:MAX_MULTI_GROUNDING]:
        members, description = groups[int(k)]
        phrase = "all the " + description.render(plural=True)
        question = "[grounding] " + _pick(rng, MULTI_QUESTIONS).format(phrase)
        answer = _ground(phrase, len(members))
        meta = {"target": list(members), "expression": phrase}
        out.append((_turns(question, answer, asked=[], answered=list(members)), meta))
    return out


def region_caption_conversations(scene: Scene, rng: np.random.Generator) -> list[Conversation]:
    """Describe a cited region ("a small red circle, partly hidden"), for up to 2 objects."""
    out = []
    for k in rng.permutation(len(scene.objects))[:MAX_REGION_CAPTIONS]:
        target = int(k)
        obj = scene.objects[target]
        answer = object_phrase(obj)
        if obj.visible_fraction < OCCLUDED_BELOW:
            answer += ", partly hidden"
        question = _pick(rng, REGION_QUESTIONS).format(f"<roi>{REFER_BOX}</roi>")
        meta = {"target": [target]}
        out.append((_turns(question, answer, asked=[target], answered=[]), meta))
    return out


def _join(items: list[str]) -> str:
    """ "a", "a and b", "a, b and c"."""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def grounded_caption_conversations(scene: Scene, rng: np.random.Generator) -> list[Conversation]:
    """One sentence citing every object, left to right by box centre, and naming the background."""
    order = sorted(range(len(scene.objects)), key=lambda i: (sum(scene.objects[i].box[0::2]), i))
    phrases = _join([_ground(object_phrase(scene.objects[i])) for i in order])
    background = f"on a {BACKGROUND_WORDS[scene.background]} background"
    if rng.random() < 0.5:
        answer = f"The image shows {phrases} {background}."
    else:
        verb = "is" if len(order) == 1 else "are"
        answer = f"There {verb} {phrases} {background}."
    question = "[grounding] " + _pick(rng, CAPTION_QUESTIONS)
    meta = {"target": order, "background": scene.background}
    return [(_turns(question, answer, asked=[], answered=order), meta)]


def _count_description(kind: str, value: str) -> Description:
    return Description(shape=value) if kind == "category" else Description(color=value)


def counting_conversations(scene: Scene, rng: np.random.Generator) -> list[Conversation]:
    """How many objects of a shape or colour: one present kind, then a zero count or another."""
    present: dict[tuple[str, str], None] = {}
    for obj in scene.objects:
        present[("category", obj.shape)] = None
        present[("color", obj.color)] = None
    absent = [
        q
        for q in [("category", s) for s in SHAPES] + [("color", c) for c in COLORS]
        if q not in present
    ]
    queries = [list(present)[int(rng.integers(len(present)))]]
    others = [q for q in present if q != queries[0]]
    if absent and (rng.random() < ZERO_COUNT_PROB or not others):
        queries.append(absent[int(rng.integers(len(absent)))])
    elif others:
        queries.append(others[int(rng.integers(len(others)))])
    out = []
    for kind, value in queries:
        description = _count_description(kind, value)
        matched = description.matches(scene)
        count = len(matched)
        question = _pick(rng, COUNT_QUESTIONS).format(description.render(plural=True))
        if count == 1:
            answer = f"There is 1 {description.render()}."
        else:
            answer = f"There are {count} {description.render(plural=True)}."
        meta = {"count": count, kind: value, "target": matched}
        out.append((_turns(question, answer, asked=[], answered=[]), meta))
    return out


TASK_BUILDERS = {
    "rec": rec_conversations,
    "multi_grounding": multi_grounding_conversations,
    "region_caption": region_caption_conversations,
    "grounded_caption": grounded_caption_conversations,
    "counting": counting_conversations,
    "res": res_conversations,
}


def build_records(
    scene: Scene,
    regions: list[dict[str, Any]],
    rng: np.random.Generator,
    *,
    task_rngs: Mapping[str, np.random.Generator],
    record_prefix: str,
    image_path: str,
) -> list[dict[str, Any]]:
    """All records of one image, tasks in ``SYNTHETIC_TASKS`` order.

    Args:
        scene: The scene.
        regions: Its record regions (:func:`scene_regions`).
        rng: The image's random stream (continued after sampling the scene), which the
            ``SHARED_STREAM_TASKS`` draw from in turn.
        task_rngs: Per task not in ``SHARED_STREAM_TASKS``, its own random stream.
        record_prefix: Record ids are ``{record_prefix}/{task}/{k}``.
        image_path: The image path relative to the data root.

    Returns:
        Schema records; every turn's placeholder count equals ``len(turn["regions"])``.
    """
    missing = [t for t in SYNTHETIC_TASKS if t not in SHARED_STREAM_TASKS and t not in task_rngs]
    if missing:
        raise KeyError(f"build_records needs task_rngs for tasks {missing}")
    records = []
    for task in SYNTHETIC_TASKS:
        task_rng = rng if task in SHARED_STREAM_TASKS else task_rngs[task]
        for k, (turns, meta) in enumerate(TASK_BUILDERS[task](scene, task_rng)):
            records.append(
                {
                    "id": f"{record_prefix}/{task}/{k}",
                    "image": image_path,
                    "height": scene.height,
                    "width": scene.width,
                    "task": task,
                    "source": SOURCE,
                    "regions": regions,
                    "conversations": turns,
                    "meta": meta,
                }
            )
    return records
