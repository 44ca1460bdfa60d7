"""Ask a trained groma-px model about an image; prints the grounded answer as JSON.

python tools/chat.py --checkpoint DIR --image IMG --query "Where is the red star?" \
    [--box x0 y0 x1 y1 ...] [--point x y ...] [--mask mask.png ...] [--out answer.png]

DIR is an exported model directory (the quickstart writes one to WORK_DIR/model). User regions
(visual prompts) are boxes, points or masks (a PNG of the image's size, non-zero = object), in
that order; the query cites them with <refer_box>. The PNG shows the regions the answer cites,
labelled by the phrase that cites them, with their masks when the model has a mask head.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from groma_px.inference import GroundedChat
from groma_px.visualization import add_caption, draw_response


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="exported model directory")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument(
        "--query", required=True, action="append", help="question (repeat for turns)"
    )
    parser.add_argument(
        "--box",
        nargs=4,
        type=float,
        action="append",
        metavar=("X0", "Y0", "X1", "Y1"),
        help="a user region in image pixels (repeatable; cite with <refer_box> in the query)",
    )
    parser.add_argument(
        "--point",
        nargs=2,
        type=float,
        action="append",
        metavar=("X", "Y"),
        help="a user region given by one point in image pixels (repeatable)",
    )
    parser.add_argument(
        "--mask", action="append", help="a user region given by a mask PNG (repeatable)"
    )
    parser.add_argument("--out", help="PNG with the cited regions drawn (default: no picture)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    chat = GroundedChat.from_pretrained(args.checkpoint)
    regions = [{"box": box} for box in args.box or []]
    regions += [{"point": point} for point in args.point or []]
    regions += [{"mask": np.asarray(Image.open(path).convert("L")) > 0} for path in args.mask or []]
    conversation = chat.start(args.image, regions)
    answers = [chat.chat(conversation, query).to_dict() for query in args.query]
    result = {"image": args.image, "queries": args.query, "answers": answers}
    print(json.dumps(result if len(answers) > 1 else {**result, **answers[0]}, indent=2))
    if args.out:
        response = conversation.responses[-1]
        picture = draw_response(Image.open(args.image).convert("RGB"), response)
        picture = add_caption(picture, [f"Q: {args.query[-1]}", f"A: {response.text}"])
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        picture.save(args.out)
        print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
