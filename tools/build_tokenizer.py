"""Train the byte-level BPE tokenizer with the grounding tokens on JSONL records and save it.

Example::

    python tools/build_tokenizer.py --jsonl data/synthetic/train.jsonl --out work_dirs/tokenizer
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from groma_px.llm.tokenizer import DEFAULT_VOCAB_SIZE, build_tokenizer_from_jsonl
from groma_px.llm.vocab import PHRASE_END, PHRASE_START, ROI_END, ROI_START, GroundingVocab


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jsonl", nargs="+", required=True, help="JSONL record files (corpus)")
    parser.add_argument("--out", required=True, help="directory to save the tokenizer to")
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=DEFAULT_VOCAB_SIZE,
        help="most ids of the base vocabulary, before the grounding tokens",
    )
    parser.add_argument(
        "--min-frequency",
        type=int,
        default=2,
        help="fewest occurrences of a pair for it to become a merge",
    )
    parser.add_argument(
        "--num-region-tokens",
        type=int,
        default=GroundingVocab.num_region_tokens,
        help="K: the region-index tokens <r0> ... <r{K-1}>",
    )
    parser.add_argument("--sample", default=None, help="text to show encoded (default: an answer)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    """Build, save, and print the vocabulary size and one sample encoding."""
    args = parse_args(argv)
    vocab = GroundingVocab(num_region_tokens=args.num_region_tokens)
    tokenizer = build_tokenizer_from_jsonl(
        args.jsonl,
        args.out,
        vocab=vocab,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
    )
    sample = args.sample
    if sample is None:
        region = vocab.region_token(0)
        sample = f"{PHRASE_START}the red circle{PHRASE_END}{ROI_START}{region}{ROI_END}"
    ids = tokenizer.encode(sample, add_special_tokens=False)
    print(f"saved to {args.out}")
    print(
        f"vocab size: {len(tokenizer)} ({tokenizer.vocab_size} base + "
        f"{len(tokenizer) - tokenizer.vocab_size} added)"
    )
    print(f"sample: {sample!r}")
    print(f"tokens: {tokenizer.convert_ids_to_tokens(ids)}")
    print(f"ids: {ids}")


if __name__ == "__main__":
    main()
