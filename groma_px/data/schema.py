"""The unified grounded-conversation record format (one JSONL line = one training sample).

Every dataset converter (COCO, RefCOCO, Flickr30k Entities, the synthetic scenes, ...) writes this
format and ``GroundedConversationDataset`` reads it. A record::

    {
      "id": "synthetic/train/000012/rec/0",     # unique within the file
      "image": "images/train/000012.png",       # relative to the dataset's data root
      "height": 240, "width": 320,              # of the image file, in pixels
      "task": "rec",                            # one of TASKS
      "source": "synthetic",                    # dataset name, free text
      "regions": [                              # every annotated object of the image
        {"box": [x0, y0, x1, y1],               # absolute xyxy, pixel edges: 0 <= x0 < x1 <= width
         "category": "circle",                  # optional
         "mask": {"size": [h, w], "counts": "..."},  # optional COCO RLE (pycocotools, str counts)
                                                # of the visible pixels, non-empty; left out for
                                                # a region with none (fully occluded)
         "attributes": {"color": "red"},        # optional, free-form
         "prompt": "box"}                       # optional: how a human turn that cites the
                                                # region shows it, "box" (default), "point"
                                                # (with "point": [x, y]) or "mask" (its mask)
      ],
      "conversations": [                        # alternating turns, human first
        {"from": "human", "value": "<image>\\n[grounding] Where is the small red circle?"},
        {"from": "gpt", "value": "<p>the small red circle</p><roi><ground_box></roi>",
         "regions": [0]}                        # one index into "regions" per placeholder, in order
      ],
      "meta": {"count": 3}                      # optional, task-specific answers for evaluation
    }

Placeholders (``<refer_box>``, ``<ground_box>``, ``<refer_feat>``) are resolved to region-index
tokens (``<rK>``) when a sample is built; a turn's ``regions`` list says, in order of appearance,
which record region each placeholder cites, so one region may be cited several times.

One record holds one conversation about one image; an image with several tasks appears in several
records (DESIGN.md says "one record per image": we key by sample instead so that every record has
exactly one ``task``).
"""

from __future__ import annotations

import re

IMAGE_PLACEHOLDER = "<image>"
REFER_BOX = "<refer_box>"
GROUND_BOX = "<ground_box>"
REFER_FEAT = "<refer_feat>"
#: Placeholders that cite a record region; each one consumes an entry of the turn's "regions".
REGION_PLACEHOLDERS = (REFER_BOX, GROUND_BOX, REFER_FEAT)
PLACEHOLDER_PATTERN = re.compile("|".join(re.escape(p) for p in REGION_PLACEHOLDERS))

HUMAN = "human"
ASSISTANT = "gpt"
ROLES = (HUMAN, ASSISTANT)

#: Known tasks. ``rec``: referring expression -> one region; ``multi_grounding``: phrase -> all the
#: regions it names; ``region_caption``: given region -> description; ``grounded_caption``:
#: description citing several regions; ``counting``: how many; ``res``: referring segmentation;
#: ``conversation``: free-form grounded chat; ``detection``: list every object.
TASKS = (
    "rec",
    "multi_grounding",
    "region_caption",
    "grounded_caption",
    "counting",
    "res",
    "conversation",
    "detection",
)

REQUIRED_FIELDS = ("id", "image", "height", "width", "task", "source", "regions", "conversations")


def count_region_placeholders(text: str) -> int:
    """Number of region-citing placeholders in ``text``."""
    return len(PLACEHOLDER_PATTERN.findall(text))
