"""Turn a decoded grounded answer (``<p>…</p><roi><ri>…</roi>`` markup) into a GroundedResponse.

Grammar: ``<p>phrase</p><roi><ri>…</roi>`` cites kept regions ``i`` for ``phrase``. The parser
never raises on model output; what it cannot interpret is reported in ``warnings``:

- Markup (``<p>``, ``</p>``, ``<roi>``, ``</roi>``) never reaches the clean text, balanced or not.
- Every closed phrase becomes a span, trimmed of surrounding whitespace, whose regions are the
  valid ``<ri>`` of the ``<roi>`` that follows it (only whitespace may come between); a phrase
  with no ``<roi>``, or whose ``<roi>`` has no valid index, is a span with no regions (warned).
  Phrases may nest; spans are listed in the order their phrase is grounded or abandoned.
- A ``<roi>`` with no phrase before it cites its regions with an empty span at its position; a
  valid ``<ri>`` outside ``<roi>`` cites for the phrase just closed, else for an empty span.
- An unclosed ``<p>`` keeps its text but gives no span; an unclosed ``<roi>`` keeps its regions.
- ``<ri>`` with ``i >= len(regions)`` (or beyond the vocabulary, or spelt ``<r03>``) stays in
  the text literally; text inside ``<roi>`` is kept, whitespace there is dropped.
- Other grounding tokens (``<image>``, ``<region>``, ``[grounding]``, placeholders) are removed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

from groma_px.llm.vocab import (
    FIXED_TOKENS,
    PHRASE_END,
    PHRASE_START,
    ROI_END,
    ROI_START,
    GroundingVocab,
)
from groma_px.structures import GroundedRegion, GroundedResponse, GroundedSpan

_MARKUP = (PHRASE_START, PHRASE_END, ROI_START, ROI_END)
#: Grounding tokens that carry no meaning in an answer: removed from the text, with a warning.
_STRAY_TOKENS = tuple(t for t in FIXED_TOKENS if t not in _MARKUP)
_CANDIDATE_REGION = re.compile(r"<r[0-9]+>")
# Longest first, so that no token is cut by a shorter one that is its prefix.
_TOKEN_PATTERN = re.compile(
    "("
    + "|".join(re.escape(t) for t in sorted(FIXED_TOKENS, key=len, reverse=True))
    + "|"
    + _CANDIDATE_REGION.pattern
    + ")"
)


@dataclass
class _Phrase:
    """A phrase of the clean text: ``[start, end)``; ``end`` is None while it is open."""

    start: int
    end: int | None = None


@dataclass
class _ParseState:
    """Everything the parser has produced so far; one instance per call."""

    regions: Sequence[GroundedRegion]
    vocab: GroundingVocab
    pieces: list[str] = field(default_factory=list)
    length: int = 0
    open_phrases: list[_Phrase] = field(default_factory=list)
    pending: _Phrase | None = None  # closed phrase waiting for its <roi>
    roi_phrase: _Phrase | None = None  # phrase that the open <roi> grounds
    roi_cited: list[int] | None = None  # kept-region indices of the open <roi>
    spans: list[tuple[_Phrase, list[int]]] = field(default_factory=list)
    cited_order: dict[int, int] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def emit(self, text: str) -> None:
        """Append ``text`` to the clean text."""
        self.pieces.append(text)
        self.length += len(text)

    def warn(self, where: int, message: str) -> None:
        """Record a warning about the raw text at character ``where``."""
        self.warnings.append(f"char {where}: {message}")

    def finish_span(self, phrase: _Phrase, cited: list[int]) -> None:
        """Record ``phrase`` with its kept-region indices (deduplicated, order kept)."""
        unique = list(dict.fromkeys(cited))
        for index in unique:
            self.cited_order.setdefault(index, len(self.cited_order))
        self.spans.append((phrase, unique))

    def drop_pending(self, where: int) -> None:
        """The waiting phrase gets no ``<roi>``: it becomes a span without regions."""
        if self.pending is not None:
            self.warn(where, f"phrase {self.phrase_text(self.pending)!r} has no <roi>")
            self.finish_span(self.pending, [])
            self.pending = None

    def phrase_text(self, phrase: _Phrase) -> str:
        """The clean text of a closed phrase."""
        return "".join(self.pieces)[phrase.start : phrase.end]


def parse_grounded_text(
    raw_text: str, regions: Sequence[GroundedRegion], *, vocab: GroundingVocab
) -> GroundedResponse:
    """Parse a decoded grounded answer; never raises on malformed model output.

    Args:
        raw_text: The model's answer decoded with special tokens kept (eos/pad removed), e.g.
            ``"The image shows <p>a red star</p><roi><r3></roi>."``.
        regions: The sample's kept regions; ``regions[i]`` is the target of ``<ri>``.
        vocab: The grounding vocabulary the model was trained with.

    Returns:
        The response: ``text`` without markup, one span per phrase (character offsets into
        ``text``), ``regions`` = the cited kept regions, deduplicated, in order of first citation
        (``span.region_ids`` index this tuple), ``raw_text`` and the ``warnings``.

    Raises:
        TypeError: If ``raw_text`` is not a string (a caller bug, not a model output).
    """
    if not isinstance(raw_text, str):
        raise TypeError(f"raw_text must be a str, got {type(raw_text).__name__}")
    state = _ParseState(regions=regions, vocab=vocab)
    where = 0
    for piece in _TOKEN_PATTERN.split(raw_text):
        if piece:
            _consume(state, piece, where)
        where += len(piece)
    _finish(state, where)
    return _response(state, raw_text)


def _consume(state: _ParseState, piece: str, where: int) -> None:
    """Handle one token or stretch of text that starts at raw character ``where``."""
    if piece == PHRASE_START:
        _close_roi(state, where, implicit=True)
        state.drop_pending(where)
        state.open_phrases.append(_Phrase(start=state.length))
    elif piece == PHRASE_END:
        _close_roi(state, where, implicit=True)
        state.drop_pending(where)
        if state.open_phrases:
            phrase = state.open_phrases.pop()
            phrase.end = state.length
            state.pending = phrase
        else:
            state.warn(where, "</p> without <p>; dropped")
    elif piece == ROI_START:
        _open_roi(state, where)
    elif piece == ROI_END:
        if state.roi_cited is None:
            state.warn(where, "</roi> without <roi>; dropped")
        else:
            _close_roi(state, where, implicit=False)
    elif piece in _STRAY_TOKENS:
        state.warn(where, f"unexpected {piece} in an answer; removed")
    elif _CANDIDATE_REGION.fullmatch(piece):
        _region_token(state, piece, where)
    else:
        _text(state, piece, where)


def _open_roi(state: _ParseState, where: int) -> None:
    """Start citing regions for the waiting phrase (or for an empty span here)."""
    if state.roi_cited is not None:
        state.warn(where, "<roi> inside <roi>; dropped")
        return
    if state.pending is None:
        state.warn(where, "<roi> without a phrase before it; cited with an empty span")
        state.roi_phrase = _Phrase(start=state.length, end=state.length)
    else:
        state.roi_phrase, state.pending = state.pending, None
    state.roi_cited = []


def _close_roi(state: _ParseState, where: int, *, implicit: bool) -> None:
    """End the open ``<roi>`` (if any) and record its span; ``implicit`` warns of no ``</roi>``."""
    if state.roi_cited is None or state.roi_phrase is None:
        return
    if implicit:
        state.warn(where, "<roi> not closed before this point; closed here")
    if not state.roi_cited:
        state.warn(where, "<roi> cites no valid region")
    state.finish_span(state.roi_phrase, state.roi_cited)
    state.roi_phrase, state.roi_cited = None, None


def _region_token(state: _ParseState, piece: str, where: int) -> None:
    """``<ri>``: a citation inside ``<roi>`` when ``i`` is a kept region, else literal text."""
    index = state.vocab.parse_region_index(piece)
    if index is None or index >= len(state.regions):
        reason = (
            f"not a region token of this vocabulary (K={state.vocab.num_region_tokens})"
            if index is None
            else f"only {len(state.regions)} regions are kept"
        )
        state.warn(where, f"{piece}: {reason}; kept as text")
        if state.roi_cited is None:
            _text(state, piece, where)
        else:
            state.emit(piece)
        return
    if state.roi_cited is None:
        # A bare citation right after a phrase most likely lost its <roi> markers.
        phrase = state.pending or _Phrase(start=state.length, end=state.length)
        target = "the phrase before it" if state.pending else "an empty span"
        state.warn(where, f"{piece} outside <roi>; cited for {target}")
        state.pending = None
        state.finish_span(phrase, [index])
        return
    state.roi_cited.append(index)


def _text(state: _ParseState, piece: str, where: int) -> None:
    """Plain text: kept; whitespace inside ``<roi>`` is dropped, other text there is warned."""
    if state.roi_cited is not None:
        if not piece.strip():
            return
        state.warn(where, f"text {piece!r} inside <roi>; kept")
    elif state.pending is not None and piece.strip():
        state.drop_pending(where)
    state.emit(piece)


def _finish(state: _ParseState, where: int) -> None:
    """Close what the end of the text leaves open (a truncated answer)."""
    _close_roi(state, where, implicit=True)
    state.drop_pending(where)
    for phrase in state.open_phrases:
        text = "".join(state.pieces)[phrase.start :]
        state.warn(where, f"<p> not closed (phrase {text!r}); no span")
    state.open_phrases.clear()


def _response(state: _ParseState, raw_text: str) -> GroundedResponse:
    """Assemble the response: trimmed spans, cited regions in order of first citation."""
    text = "".join(state.pieces)
    spans = []
    for phrase, cited in state.spans:
        start, end = phrase.start, phrase.end if phrase.end is not None else phrase.start
        # Trim whitespace that a tokenizer may decode around the markup.
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        spans.append(GroundedSpan(start, end, tuple(state.cited_order[i] for i in cited)))
    kept = sorted(state.cited_order, key=state.cited_order.__getitem__)
    return GroundedResponse(
        text=text,
        spans=tuple(spans),
        regions=tuple(state.regions[i] for i in kept),
        raw_text=raw_text,
        warnings=tuple(state.warnings),
    )


def first_cited_box(response: GroundedResponse) -> tuple[float, float, float, float] | None:
    """The box of the first region cited by the first span that cites any (REC answers).

    Args:
        response: A parsed answer.

    Returns:
        Absolute xyxy in original-image pixels, or None when no span cites a region.
    """
    for span in response.spans:
        if span.region_ids:
            return response.regions[span.region_ids[0]].box
    return None
