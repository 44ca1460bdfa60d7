"""The one registry of the grounding special tokens (region indices, markers, placeholders).

Every other module gets these strings and ids from here: ids come from
``tokenizer.convert_tokens_to_ids`` on the registered strings, never from tokenising text, so a
tokenizer that would split a token is caught here instead of silently training on wrong ids.
"""

from __future__ import annotations

import numbers
import re
from dataclasses import dataclass, field

from tokenizers import AddedToken
from transformers import PreTrainedTokenizerBase

from groma_px.data.schema import GROUND_BOX, IMAGE_PLACEHOLDER, REFER_BOX, REFER_FEAT

#: Slot whose input embedding is replaced by a region feature (Groma's ``<region>``).
REGION_SLOT = "<region>"
ROI_START = "<roi>"
ROI_END = "</roi>"
PHRASE_START = "<p>"
PHRASE_END = "</p>"
#: Task marker that asks for a grounded answer (Groma's ``[grounding]``).
GROUNDING = "[grounding]"

#: Tokens whose meaning does not depend on K, in id order (after appending): image, markers,
#: then the data-only placeholders that are resolved to ``<rK>`` when a sample is built.
FIXED_TOKENS: tuple[str, ...] = (
    IMAGE_PLACEHOLDER,
    REGION_SLOT,
    ROI_START,
    ROI_END,
    PHRASE_START,
    PHRASE_END,
    GROUNDING,
    REFER_BOX,
    GROUND_BOX,
    REFER_FEAT,
)

_REGION_TOKEN_PATTERN = re.compile(r"<r(0|[1-9][0-9]*)>")


def _added_token(content: str) -> AddedToken:
    """An unsplittable special token that matches only itself and keeps the spaces around it.

    ``lstrip``/``rstrip`` stay False so that neighbouring spaces remain ordinary text and
    ``decode(encode(text))`` reproduces ``text`` exactly; ``normalized=False`` matches the raw text.
    """
    return AddedToken(
        content, single_word=False, lstrip=False, rstrip=False, normalized=False, special=True
    )


@dataclass(frozen=True)
class GroundingTokenIds:
    """Ids of the grounding tokens in one tokenizer, obtained by ``GroundingVocab.token_ids``.

    Attributes:
        image: Id of ``<image>``.
        region: Id of ``<region>`` (the region-feature slot).
        roi_start: Id of ``<roi>``.
        roi_end: Id of ``</roi>``.
        phrase_start: Id of ``<p>``.
        phrase_end: Id of ``</p>``.
        grounding: Id of ``[grounding]``.
        refer_box: Id of ``<refer_box>`` (data-only placeholder).
        ground_box: Id of ``<ground_box>`` (data-only placeholder).
        refer_feat: Id of ``<refer_feat>`` (data-only placeholder).
        regions: Ids of ``<r0>`` ... ``<r{K-1}>``; ``regions[i]`` is the id of ``<ri>``.
    """

    image: int
    region: int
    roi_start: int
    roi_end: int
    phrase_start: int
    phrase_end: int
    grounding: int
    refer_box: int
    ground_box: int
    refer_feat: int
    regions: tuple[int, ...]
    _index_of: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index_of", {tid: i for i, tid in enumerate(self.regions)})

    @property
    def num_region_tokens(self) -> int:
        """K, the number of region-index tokens."""
        return len(self.regions)

    @property
    def fixed(self) -> tuple[int, ...]:
        """Ids of the K-independent tokens, in the order of ``FIXED_TOKENS``."""
        return (
            self.image,
            self.region,
            self.roi_start,
            self.roi_end,
            self.phrase_start,
            self.phrase_end,
            self.grounding,
            self.refer_box,
            self.ground_box,
            self.refer_feat,
        )

    @property
    def all_ids(self) -> tuple[int, ...]:
        """Ids of every grounding token, in the order of ``GroundingVocab.special_tokens``."""
        return self.fixed + self.regions

    def region_index(self, token_id: int) -> int | None:
        """The region index ``i`` if ``token_id`` is the id of ``<ri>``, else None."""
        return self._index_of.get(int(token_id))


@dataclass(frozen=True)
class GroundingVocab:
    """The grounding special tokens for K region-index tokens ``<r0>`` ... ``<r{K-1}>``.

    Args:
        num_region_tokens: K, the number of region-index tokens (the most regions one sample can
            cite). Defaults to 100.
    """

    num_region_tokens: int = 100

    def __post_init__(self) -> None:
        k = self.num_region_tokens
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"num_region_tokens must be an int >= 1, got {k!r}")

    @classmethod
    def from_tokenizer(cls, tokenizer: PreTrainedTokenizerBase) -> GroundingVocab:
        """The vocabulary a tokenizer was built with: K = the number of ``<ri>`` added tokens.

        Raises:
            KeyError: If the tokenizer has no ``<r0>`` or the region tokens are not ``<r0>`` ...
                ``<r{K-1}>`` without gaps.
        """
        added = tokenizer.get_added_vocab()
        indices = sorted(
            int(m.group(1)) for t in added if (m := _REGION_TOKEN_PATTERN.fullmatch(t))
        )
        if not indices:
            raise KeyError(
                "the tokenizer has no region tokens <r0>...; build it with GroundingVocab"
            )
        if indices != list(range(len(indices))):
            raise KeyError(
                f"the tokenizer's region tokens have gaps: <r{indices[-1]}> is the last "
                f"of {len(indices)}"
            )
        return cls(len(indices))

    def region_token(self, index: int) -> str:
        """The token ``<r{index}>`` that cites row ``index`` of the region tokens.

        Args:
            index: Region index in ``[0, num_region_tokens)``.

        Returns:
            The token string, e.g. ``"<r3>"``.

        Raises:
            TypeError: If ``index`` is not an integer.
            IndexError: If ``index`` is outside ``[0, num_region_tokens)``.
        """
        if isinstance(index, bool) or not isinstance(index, numbers.Integral):
            raise TypeError(f"region index must be an int, got {index!r}")
        if not 0 <= index < self.num_region_tokens:
            raise IndexError(
                f"region index {index!r} out of range: this vocabulary has "
                f"num_region_tokens={self.num_region_tokens} (<r0> ... "
                f"<r{self.num_region_tokens - 1}>)"
            )
        return f"<r{int(index)}>"

    @property
    def region_tokens(self) -> tuple[str, ...]:
        """``("<r0>", ..., "<r{K-1}>")``."""
        return tuple(f"<r{i}>" for i in range(self.num_region_tokens))

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Every grounding token in a stable order: ``FIXED_TOKENS`` then the region tokens.

        The fixed tokens come first so that their ids do not depend on K when appended.
        """
        return FIXED_TOKENS + self.region_tokens

    def parse_region_index(self, token: str) -> int | None:
        """The index ``i`` if ``token`` is ``<ri>`` and ``i < num_region_tokens``, else None.

        Non-canonical spellings such as ``<r03>`` are not region tokens and give None.
        """
        match = _REGION_TOKEN_PATTERN.fullmatch(token)
        if match is None:
            return None
        index = int(match.group(1))
        return index if index < self.num_region_tokens else None

    def add_to_tokenizer(self, tokenizer: PreTrainedTokenizerBase) -> int:
        """Register the grounding tokens that ``tokenizer`` lacks as extra special tokens.

        Tokens already registered as added tokens are left as they are; existing extra special
        tokens are kept (``replace_extra_special_tokens=False``). A token that exists only inside
        the base vocabulary is registered too, so that it is never split, and keeps its id.

        Args:
            tokenizer: A Hugging Face tokenizer; modified in place.

        Returns:
            The number of new ids, i.e. the growth of ``len(tokenizer)``: the rows to add to the
            embedding table. 0 when called again.
        """
        registered = tokenizer.get_added_vocab()
        missing = [_added_token(t) for t in self.special_tokens if t not in registered]
        if not missing:
            return 0
        before = len(tokenizer)
        tokenizer.add_special_tokens(
            {"extra_special_tokens": missing}, replace_extra_special_tokens=False
        )
        return len(tokenizer) - before

    def token_ids(self, tokenizer: PreTrainedTokenizerBase) -> GroundingTokenIds:
        """Look up every grounding token with ``tokenizer.convert_tokens_to_ids``.

        Args:
            tokenizer: A tokenizer on which ``add_to_tokenizer`` has been called.

        Returns:
            The ids, one per token.

        Raises:
            KeyError: If a token is unknown to ``tokenizer`` (no id, or the unknown-token id) or is
                not registered as an added token (it would be split when text is tokenised); the
                message names the token.
            ValueError: If two tokens share an id.
        """
        registered = tokenizer.get_added_vocab()
        unk_id = tokenizer.unk_token_id
        ids: list[int] = []
        for token in self.special_tokens:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is None or (token_id == unk_id and token != tokenizer.unk_token):
                raise KeyError(
                    f"grounding token {token!r} is missing from the tokenizer; call "
                    "GroundingVocab.add_to_tokenizer(tokenizer) first"
                )
            if token not in registered:
                raise KeyError(
                    f"grounding token {token!r} is in the base vocabulary but not an "
                    "added token, so text would split it; call add_to_tokenizer"
                )
            ids.append(int(token_id))
        _check_distinct(self.special_tokens, ids)
        num_fixed = len(FIXED_TOKENS)
        return GroundingTokenIds(*ids[:num_fixed], regions=tuple(ids[num_fixed:]))


def _check_distinct(tokens: tuple[str, ...], ids: list[int]) -> None:
    """Raise if two grounding tokens share an id (a corrupt or hand-edited tokenizer)."""
    first_token: dict[int, str] = {}
    for token, token_id in zip(tokens, ids, strict=True):
        if token_id in first_token:
            raise ValueError(
                f"grounding tokens {first_token[token_id]!r} and {token!r} share id {token_id}"
            )
        first_token[token_id] = token
