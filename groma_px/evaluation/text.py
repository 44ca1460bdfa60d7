"""Text normalisation for chat metrics: markup removal, caption tokens and count parsing."""

from __future__ import annotations

import re

from ..data.schema import PLACEHOLDER_PATTERN

# A whole "<roi>...</roi>" block (placeholders or region tokens inside) is a citation, not text.
_ROI_BLOCK = re.compile(r"<roi>.*?</roi>", flags=re.DOTALL)
_PHRASE_TAG = re.compile(r"</?p>")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_NON_WORD = re.compile(r"[^\w\s]")
_NUMBER_WORDS = {
    word: value
    for value, word in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen twenty".split()
    )
}
_FIRST_NUMBER = re.compile(
    r"\b(\d+|" + "|".join(_NUMBER_WORDS) + r")\b",
    flags=re.IGNORECASE,
)


def strip_markup(text: str) -> str:
    """Removes grounding markup from a reference answer, leaving its plain text.

    Drops ``<p>``/``</p>`` tags, whole ``<roi>…</roi>`` blocks and bare region placeholders,
    then collapses whitespace (also before punctuation) so that
    ``"The <p>red star</p><roi><ground_box></roi> ."`` becomes ``"The red star."``.

    Args:
        text: Answer text in the record format (``groma_px.data.schema``).

    Returns:
        The plain text, stripped.
    """
    text = _ROI_BLOCK.sub(" ", text)
    text = PLACEHOLDER_PATTERN.sub(" ", text)
    text = _PHRASE_TAG.sub("", text)
    text = " ".join(text.split())
    return _SPACE_BEFORE_PUNCT.sub(r"\1", text)


def caption_tokens(text: str) -> str:
    """Lower-cased, punctuation-free, space-joined words: what the caption scorers compare.

    A pure-Python stand-in for pycocoevalcap's ``PTBTokenizer`` (which needs Java).

    Args:
        text: Plain text (markup already removed).

    Returns:
        The words joined by single spaces (``"a red star"``).
    """
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def parse_count(text: str) -> int | None:
    """The first integer in ``text``: digits or an English number word from zero to twenty.

    Args:
        text: An answer such as ``"There are three stars."``.

    Returns:
        The number, or None if the text names none.
    """
    match = _FIRST_NUMBER.search(text)
    if match is None:
        return None
    token = match.group(1).lower()
    return int(token) if token.isdigit() else _NUMBER_WORDS[token]
