"""Build a small byte-level BPE tokenizer with the grounding tokens from grounded-conversation text.

The embedded default experiment has no hub access, so its tokenizer is trained here with
``tokenizers`` on the conversation turns of the JSONL records (``groma_px.data.schema``) and saved
in the Hugging Face format, so that ``AutoTokenizer.from_pretrained(dir)`` loads it like a real
LLM's tokenizer.

Layout of the ids: ``<unk> <s> </s> <pad>`` (0-3), the 256 byte symbols, the learned merges (the
base vocabulary, at most ``vocab_size`` ids), then the ``GroundingVocab`` tokens appended by
``GroundingVocab.add_to_tokenizer``: the same code path and id layout as adding the grounding tokens
to a pretrained LLM's tokenizer.

Determinism: ``BpeTrainer`` picks each merge by (pair count, pair ids), the counts do not depend on
the corpus order or on the trainer's thread count, and the ids of the initial symbols come from the
sorted byte alphabet, so one corpus (as a multiset of texts) gives a byte-identical
``tokenizer.json``, also across processes and text orders (tested).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from groma_px.llm.vocab import GroundingVocab

UNK_TOKEN = "<unk>"
BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
#: Special tokens trained into the base vocabulary; they get ids 0-3 in this order.
BASE_SPECIAL_TOKENS: tuple[str, ...] = (UNK_TOKEN, BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
#: Smallest useful ``vocab_size``: the base special tokens and the 256 byte symbols.
MIN_VOCAB_SIZE = len(BASE_SPECIAL_TOKENS) + len(pre_tokenizers.ByteLevel.alphabet())
DEFAULT_VOCAB_SIZE = 2048


def iter_corpus(jsonl_paths: Iterable[str | Path]) -> Iterator[str]:
    """Yield the text of every conversation turn of every record, file by file, line by line.

    Args:
        jsonl_paths: JSONL files in the record format of ``groma_px.data.schema``.

    Yields:
        Each turn's ``"value"``, unchanged (placeholders included; ``build_tokenizer`` keeps special
        tokens out of the merges).

    Raises:
        ValueError: If a line is not JSON or lacks ``conversations``/``value``; the message gives
            the file and line.
    """
    for path in jsonl_paths:
        with open(path, encoding="utf-8") as lines:
            for line_no, line in enumerate(lines, start=1):
                if line.strip():
                    yield from _turn_texts(line, f"{path}:{line_no}")


def _turn_texts(line: str, where: str) -> list[str]:
    """The turn texts of one JSONL line; ``where`` (file:line) prefixes any error."""
    try:
        record = json.loads(line)
        return [str(turn["value"]) for turn in record["conversations"]]
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON: {err}") from err
    except (KeyError, TypeError) as err:
        raise ValueError(
            f"{where}: a record needs 'conversations', a list of turns with a 'value': {err!r}"
        ) from err


def split_on_tokens(texts: Iterable[str], tokens: Iterable[str]) -> Iterator[str]:
    """Yield the non-empty pieces of each text between occurrences of ``tokens``.

    When text is encoded, added tokens are cut out first and each piece between them is BPE-encoded
    on its own, so training on these pieces gives exactly the merges encoding will use, and no
    merge can span or spell a special token.

    Args:
        texts: Corpus texts.
        tokens: Strings to cut out (matched longest first).

    Yields:
        The pieces, in order.
    """
    alternatives = sorted(set(tokens), key=lambda t: (-len(t), t))
    if not alternatives:
        yield from (text for text in texts if text)
        return
    pattern = re.compile("|".join(re.escape(t) for t in alternatives))
    for text in texts:
        yield from (piece for piece in pattern.split(text) if piece)


def build_tokenizer(
    corpus: Iterable[str],
    *,
    vocab: GroundingVocab,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``corpus`` and add the base and grounding special tokens.

    Args:
        corpus: Texts to learn merges from, e.g. ``iter_corpus(paths)``; consumed once.
        vocab: The grounding tokens to append after the base vocabulary.
        vocab_size: Most ids of the base vocabulary (special tokens, 256 bytes and merges); fewer
            when the corpus has fewer pairs of ``min_frequency``. The grounding tokens come on top.
            Defaults to 2048.
        min_frequency: Fewest occurrences of a pair for it to become a merge. Defaults to 2.

    Returns:
        The tokenizer: ``len(tokenizer) == tokenizer.vocab_size + len(vocab.special_tokens)``.
        It adds no bos/eos when encoding (``add_special_tokens=True`` is a no-op); sample
        builders place ``<s>``/``</s>`` themselves.

    Raises:
        ValueError: If ``vocab_size < MIN_VOCAB_SIZE`` or ``min_frequency < 1``.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"vocab_size must be >= {MIN_VOCAB_SIZE} (4 special tokens + 256 bytes), "
            f"got {vocab_size}"
        )
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    backend = _train_byte_level_bpe(
        split_on_tokens(corpus, BASE_SPECIAL_TOKENS + vocab.special_tokens),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        # transformers' clean-up deletes spaces before punctuation, so decode would not round-trip.
        clean_up_tokenization_spaces=False,
    )
    vocab.add_to_tokenizer(tokenizer)
    return tokenizer


def _train_byte_level_bpe(
    pieces: Iterable[str], *, vocab_size: int, min_frequency: int
) -> Tokenizer:
    """Train the ``tokenizers`` backend: ByteLevel pre-tokenizer and decoder, BPE model."""
    # add_prefix_space=False: a leading space would be invented at the start of every text and
    # after every special token, and decode would not reproduce the input.
    backend = Tokenizer(models.BPE(unk_token=UNK_TOKEN))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(BASE_SPECIAL_TOKENS),
        # All 256 bytes, so any text encodes without <unk> even if the corpus lacks some bytes.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(pieces, trainer=trainer)
    return backend


def build_tokenizer_from_jsonl(
    paths: Iterable[str | Path],
    out_dir: str | Path,
    *,
    vocab: GroundingVocab | None = None,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    min_frequency: int = 2,
) -> PreTrainedTokenizerFast:
    """Train on the conversation turns of JSONL records and save with ``save_pretrained``.

    Args:
        paths: JSONL files in the record format of ``groma_px.data.schema``.
        out_dir: Directory to save to (created if needed); ``AutoTokenizer.from_pretrained``
            loads it.
        vocab: The grounding tokens. Defaults to ``GroundingVocab()`` (K = 100).
        vocab_size: See ``build_tokenizer``. Defaults to 2048.
        min_frequency: See ``build_tokenizer``. Defaults to 2.

    Returns:
        The tokenizer that was saved.
    """
    tokenizer = build_tokenizer(
        iter_corpus(paths),
        vocab=vocab if vocab is not None else GroundingVocab(),
        vocab_size=vocab_size,
        min_frequency=min_frequency,
    )
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """Loads a tokenizer from a local directory (never the hub); the error names the path.

    Any Hugging Face tokenizer directory works (ours, or a real LLM's after
    ``GroundingVocab.add_to_tokenizer`` and ``save_pretrained``).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"tokenizer directory not found: {directory} (build one with tools/build_tokenizer.py)"
        )
    return AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
