"""``GroundedCausalLM``: a Hugging Face causal LM plus a table and head for the grounding tokens."""

from __future__ import annotations

import copy
import importlib.util
import json
import warnings
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from groma_px.registry import MODELS

#: Files that ``save_pretrained`` writes next to the base model's own files.
GROUNDING_WEIGHTS_NAME = "grounding_tokens.safetensors"
GROUNDING_CONFIG_NAME = "grounding_tokens.json"

ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LMOutput(NamedTuple):
    """What ``GroundedCausalLM.forward`` returns.

    Attributes:
        logits: ``(B, L', V)`` with ``V = first_new_id + num_new_tokens``; ``L' = L`` unless
            ``logits_to_keep`` asked for the last positions only.
        hidden_states: ``(B, L, D)`` last-layer hidden states (after the final norm): the states
            the logits are read from.
        past_key_values: The HF cache to pass to the next call, or None when ``use_cache=False``.
    """

    logits: Tensor
    hidden_states: Tensor
    past_key_values: Any


@MODELS.register_module()
class GroundedCausalLM(nn.Module):
    """A Hugging Face causal LM whose grounding tokens live in the adapter, not in the LLM.

    The grounding tokens take the ids ``[first_new_id, first_new_id + num_new_tokens)``. The LLM's
    embedding table and LM head are never resized: ids below ``first_new_id`` look up the LLM's
    table, ids in the block look up ``new_embed``, and the logits are
    ``cat(base_logits[..., :first_new_id], new_head(hidden))`` (docs/groma_px.md, "Token ids"). Base
    rows at or above ``first_new_id`` (e.g. a vocabulary padded to a multiple of 64) are unused.
    So the new tokens train with the LLM frozen, and the LLM checkpoint stays loadable as is.

    ``new_embed`` rows are drawn from ``N(mean, std)`` of the base input-embedding rows
    ``[0, first_new_id)`` (per dimension), ``new_head`` rows likewise from the LM head's rows, so
    a new token starts out looking like a typical base token rather than like noise of another
    scale (cf. ``mean_resizing`` in transformers' ``resize_token_embeddings``).

    Args:
        first_new_id: Id of the first grounding token: the size of the tokenizer's base
            vocabulary. Must be ``<=`` the LLM's ``config.vocab_size``.
        num_new_tokens: Number of grounding tokens.
        config: Build a randomly initialised LLM from this dict: ``model_type`` (e.g.
            ``"llama"``) plus that model's config fields. Exactly one of ``config`` and
            ``pretrained``.
        pretrained: Load the LLM from this local directory (``save_pretrained`` layout; never the
            hub). If it holds ``grounding_tokens.safetensors`` (written by ``save_pretrained``),
            the new tables are loaded from it too.
        attn_implementation: ``"sdpa"``, ``"eager"`` or ``"flash_attention_2"``. Flash attention
            falls back to ``"sdpa"`` with a warning when ``flash_attn`` is not installed or CUDA
            is unavailable. Defaults to ``"sdpa"``.
        dtype: ``"float32"``, ``"bfloat16"`` or ``"float16"``; None keeps transformers' default
            (float32 for ``config``, the checkpoint's dtype for ``pretrained``). The new tables
            take the dtype of the base embedding. Defaults to None.
        freeze_base: Freeze every parameter of the LLM; only the new tables train. Implied by
            ``lora``. Defaults to False.
        lora: ``peft.LoraConfig`` kwargs, e.g. ``dict(r=8, lora_alpha=16,
            target_modules=["q_proj", "v_proj"], lora_dropout=0.0)``. Wraps the LLM with LoRA:
            its weights are frozen, the adapters and the new tables train. Defaults to None.
        gradient_checkpointing: Enable activation checkpointing in the LLM (non-reentrant, so
            it works with a frozen base). Defaults to False.
        tie_new_embeddings: Share one table between ``new_embed`` and ``new_head`` (weight
            tying, Press & Wolf 2017): citing ``<ri>`` then scores the hidden state against the
            very embedding that marked region i in the prompt, a pointer-like inductive bias
            that a small LLM learns from far fewer samples. Defaults to False.
        length_groups: Training forwards (no cache) of a right-padded batch run the decoder on
            up to this many groups of rows of similar real length, each cut to its longest row,
            instead of on the whole padded batch (``length_groups_of``). Right padding never
            reaches a real position under causal attention, so the outputs at real positions are
            the same; hidden states at the cut padding positions are zeros. In the quickstart's
            stage 3, 59 % of the padded batch's positions were real (docs/NOTES.md, "Length
            groups"). 1 runs the padded batch as is. Defaults to 1.

    Raises:
        ValueError: If not exactly one of ``config``/``pretrained`` is given, an option is
            unknown, or ``first_new_id`` exceeds the LLM's vocabulary size.
        FileNotFoundError: If ``pretrained`` is not a directory.
    """

    def __init__(
        self,
        *,
        first_new_id: int,
        num_new_tokens: int,
        config: dict | None = None,
        pretrained: str | None = None,
        attn_implementation: str = "sdpa",
        dtype: str | None = None,
        freeze_base: bool = False,
        lora: dict | None = None,
        gradient_checkpointing: bool = False,
        tie_new_embeddings: bool = False,
        length_groups: int = 1,
    ) -> None:
        super().__init__()
        if length_groups < 1:
            raise ValueError(f"length_groups must be >= 1, got {length_groups}")
        self.length_groups = int(length_groups)
        if first_new_id < 1 or num_new_tokens < 1:
            raise ValueError(
                f"first_new_id and num_new_tokens must be >= 1, got {first_new_id}, "
                f"{num_new_tokens}"
            )
        self.first_new_id = int(first_new_id)
        self.num_new_tokens = int(num_new_tokens)
        self.model: nn.Module = _build_base(config, pretrained, attn_implementation, dtype)
        base_vocab = self.model.config.get_text_config().vocab_size
        if self.first_new_id > base_vocab:
            raise ValueError(
                f"first_new_id={self.first_new_id} exceeds the LLM's vocabulary size "
                f"config.vocab_size={base_vocab}: ids below first_new_id must exist in the LLM"
            )
        base_embed = self.model.get_input_embeddings().weight
        factory = dict(device=base_embed.device, dtype=base_embed.dtype)
        self.new_embed = nn.Embedding(self.num_new_tokens, base_embed.shape[1], **factory)
        self.new_head = nn.Linear(base_embed.shape[1], self.num_new_tokens, bias=False, **factory)
        self.tie_new_embeddings = tie_new_embeddings
        if tie_new_embeddings:
            self.new_head.weight = self.new_embed.weight
        self._new_tokens_loaded = False
        self._init_new_tokens()
        if pretrained is not None and (Path(pretrained) / GROUNDING_WEIGHTS_NAME).is_file():
            self._load_new_tokens(Path(pretrained))
        if gradient_checkpointing:
            self.model.activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        if lora is not None:
            self.model = _wrap_lora(self.model, lora)
        elif freeze_base:
            self.model.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> GroundedCausalLM:
        """Load a directory written by ``save_pretrained``; token ids come from its json.

        Args:
            directory: The directory.
            **kwargs: Other constructor arguments (``lora``, ``dtype``, ...).

        Returns:
            The model, with base weights and new tables as saved.
        """
        meta_path = Path(directory) / GROUNDING_CONFIG_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not written by save_pretrained")
        meta = json.loads(meta_path.read_text())
        return cls(
            first_new_id=meta["first_new_id"],
            num_new_tokens=meta["num_new_tokens"],
            pretrained=str(directory),
            **kwargs,
        )

    @property
    def hf_model(self) -> PreTrainedModel:
        """The Hugging Face model (with LoRA layers injected when ``lora`` is used)."""
        if isinstance(self.model, PreTrainedModel):
            return self.model
        return self.model.get_base_model()  # peft.PeftModel

    def architecture(self) -> dict[str, Any]:
        """The base model's config as a ``config=`` dict (``model_type`` included), so an export
        can rebuild the architecture without the original checkpoint directory."""
        fields = self.hf_model.config.to_dict()
        for key in ("_name_or_path", "transformers_version", "architectures"):
            fields.pop(key, None)
        return fields

    @property
    def hidden_size(self) -> int:
        """D, the LLM's hidden width."""
        return self.new_embed.embedding_dim

    @property
    def vocab_size(self) -> int:
        """``first_new_id + num_new_tokens``: the width of the logits."""
        return self.first_new_id + self.num_new_tokens

    def embed_tokens(self, input_ids: Tensor) -> Tensor:
        """Look up ids in the base table (``< first_new_id``) or the new table (the block).

        Args:
            input_ids: ``(...)`` long ids in ``[0, vocab_size)``.

        Returns:
            ``(..., D)`` embeddings, as the LLM would get them from its own table (including its
            embedding scale, e.g. Gemma's ``sqrt(D)``).

        Raises:
            ValueError: If an id is outside ``[0, vocab_size)``.
        """
        base_embed = self.hf_model.get_input_embeddings()
        if input_ids.numel():
            low, high = (int(v) for v in torch.aminmax(input_ids))
            if low < 0 or high >= self.vocab_size:
                raise ValueError(
                    f"token ids must lie in [0, {self.vocab_size}), got min {low} max {high}"
                )
            if high < self.first_new_id and not torch.is_grad_enabled():
                return base_embed(input_ids)  # no new id (e.g. a decoding step's word)
        is_new = input_ids >= self.first_new_id
        base = base_embed(input_ids.clamp(max=self.first_new_id - 1))
        new = self.new_embed((input_ids - self.first_new_id).clamp(min=0))
        # Scaled-embedding LLMs (Gemma) scale inside the table; the new rows must match.
        scale = getattr(base_embed, "embed_scale", None)
        if scale is not None:
            new = new * scale.to(new.dtype)
        return torch.where(is_new.unsqueeze(-1), new, base)

    def forward(
        self,
        inputs_embeds: Tensor,
        attention_mask: Tensor | None = None,
        position_ids: Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool = False,
        *,
        logits_to_keep: int = 0,
    ) -> LMOutput:
        """Run the LLM's decoder on embeddings; logits over base ids and grounding tokens.

        Args:
            inputs_embeds: ``(B, L, D)``, e.g. from ``embed_tokens`` with features spliced in.
            attention_mask: ``(B, L_past + L)`` 1 for real tokens, 0 for padding. Defaults to
                None (all real).
            position_ids: ``(B, L)``. Defaults to None (the LLM's default, ``0..L-1`` after the
                cache).
            past_key_values: The cache from a previous call. Defaults to None.
            use_cache: Return the updated cache. Defaults to False.
            logits_to_keep: Compute logits for the last this many positions only; 0 for all.
                Defaults to 0.

        Returns:
            ``LMOutput``; ``logits`` ``(B, L or logits_to_keep, first_new_id + num_new_tokens)``.
        """
        decoder = self.hf_model.get_decoder()
        plain = self.length_groups == 1 or use_cache or past_key_values is not None
        lengths = (
            None if plain or position_ids is not None else right_padded_lengths(attention_mask)
        )
        if lengths is not None:
            hidden = self._grouped_hidden(decoder, inputs_embeds, attention_mask, lengths)
            out = None
        else:
            out = decoder(
                inputs_embeds=inputs_embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                past_key_values=past_key_values,
                use_cache=use_cache,
            )
            hidden = out.last_hidden_state
        kept = hidden[:, -logits_to_keep:] if logits_to_keep > 0 else hidden
        base_logits = self.hf_model.get_output_embeddings()(kept)[..., : self.first_new_id]
        logits = torch.cat([base_logits, self.new_head(kept)], dim=-1)
        logits = self._softcap(logits)
        return LMOutput(logits, hidden, out.past_key_values if use_cache else None)

    def _grouped_hidden(
        self, decoder: nn.Module, inputs_embeds: Tensor, attention_mask: Tensor, lengths: list[int]
    ) -> Tensor:
        """``(B, L, D)`` last hidden states of a right-padded batch, the decoder run once per
        length group on its rows cut to the group's longest; zeros beyond each cut."""
        total = inputs_embeds.shape[1]
        order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
        parts = []
        for start, end in length_groups_of([lengths[row] for row in order], self.length_groups):
            rows = torch.tensor(order[start:end], device=inputs_embeds.device)
            cut = lengths[order[start]]
            if cut == 0:  # rows of padding only: nothing to run
                parts.append(inputs_embeds.new_zeros(end - start, total, inputs_embeds.shape[-1]))
                continue
            mask = attention_mask[rows, :cut]
            state = decoder(
                inputs_embeds=inputs_embeds[rows, :cut],
                attention_mask=None if bool(mask.all()) else mask,
                use_cache=False,
            ).last_hidden_state
            parts.append(nn.functional.pad(state, (0, 0, 0, total - cut)))
        inverse = torch.empty(len(order), dtype=torch.long, device=inputs_embeds.device)
        inverse[torch.tensor(order, device=inputs_embeds.device)] = torch.arange(
            len(order), device=inputs_embeds.device
        )
        return torch.cat(parts)[inverse]

    def _softcap(self, logits: Tensor) -> Tensor:
        """Apply the LLM's final logit soft-capping (Gemma 2) to all logits, new ones included."""
        cap = getattr(self.hf_model.config.get_text_config(), "final_logit_softcapping", None)
        if cap is None:
            return logits
        return torch.tanh(logits / cap) * cap

    def init_weights(self) -> None:
        """Re-initialise ``new_embed``/``new_head`` only; never the LLM's weights.

        mmengine's ``BaseModule.init_weights`` calls ``init_weights`` on every child that has one,
        and the LLM's own ``PreTrainedModel.init_weights`` would overwrite pretrained weights, so
        this method stops the recursion here. New tables loaded from ``pretrained`` are kept.
        """
        if not self._new_tokens_loaded:
            self._init_new_tokens()

    @torch.no_grad()
    def _init_new_tokens(self) -> None:
        """Draw the new rows from the per-dimension mean/std of the base rows (class docstring)."""
        hf = self.hf_model
        _fill_like(self.new_embed.weight, hf.get_input_embeddings().weight[: self.first_new_id])
        if not self.tie_new_embeddings:
            _fill_like(self.new_head.weight, hf.get_output_embeddings().weight[: self.first_new_id])

    def save_pretrained(self, directory: str | Path) -> None:
        """Save the LLM (HF layout, safetensors) and the grounding-token tables.

        With LoRA, the adapters are merged into the weights of a deep copy of the LLM
        (``merge_and_unload``), so the saved LLM loads without peft; the copy needs memory for
        one more LLM for the duration of the call, and ``self`` is left unchanged.

        Args:
            directory: Output directory (created if needed). Gets the LLM's files plus
                ``grounding_tokens.safetensors`` (``new_embed.weight``, ``new_head.weight``) and
                ``grounding_tokens.json`` (``first_new_id``, ``num_new_tokens``).
        """
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        if isinstance(self.model, PreTrainedModel):
            self.model.save_pretrained(directory, safe_serialization=True)
        else:
            merged = copy.deepcopy(self.model).merge_and_unload()
            merged.save_pretrained(directory, safe_serialization=True)
            del merged
        tables = {
            "new_embed.weight": self.new_embed.weight.detach().cpu().clone(),
            "new_head.weight": self.new_head.weight.detach().cpu().clone(),  # may be tied
        }
        save_file(tables, str(directory / GROUNDING_WEIGHTS_NAME))
        meta = {"first_new_id": self.first_new_id, "num_new_tokens": self.num_new_tokens}
        (directory / GROUNDING_CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")

    @torch.no_grad()
    def _load_new_tokens(self, directory: Path) -> None:
        """Copy the saved new tables in, after checking they were saved for the same ids."""
        meta_path = directory / GROUNDING_CONFIG_NAME
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            ours = {"first_new_id": self.first_new_id, "num_new_tokens": self.num_new_tokens}
            if {k: meta.get(k) for k in ours} != ours:
                raise ValueError(f"{meta_path} was saved for {meta}, but this model has {ours}")
        tables = load_file(str(directory / GROUNDING_WEIGHTS_NAME))
        for name, param in (("new_embed", self.new_embed), ("new_head", self.new_head)):
            saved = tables[f"{name}.weight"]
            if saved.shape != param.weight.shape:
                raise ValueError(
                    f"{name}.weight in {directory} has shape {tuple(saved.shape)}, expected "
                    f"{tuple(param.weight.shape)}"
                )
            param.weight.copy_(saved)
        self._new_tokens_loaded = True


def right_padded_lengths(attention_mask: Tensor | None) -> list[int] | None:
    """Real lengths of a right-padded ``(B, L)`` mask (each row ones, then zeros); None for no
    mask or any other padding."""
    if attention_mask is None or attention_mask.dim() != 2:
        return None
    real = attention_mask.bool()
    lengths = real.sum(-1)
    positions = torch.arange(real.shape[1], device=real.device)
    if not bool((real == (positions < lengths[:, None])).all()):
        return None
    return lengths.tolist()


def length_groups_of(lengths: list[int], max_groups: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` groups of non-increasing ``lengths`` that cover the fewest
    positions, each group counted as its rows times its first (longest) length: at most
    ``max_groups`` groups, none empty (dynamic programming, ``O(max_groups * B^2)``).

    Raises:
        ValueError: If ``lengths`` increase anywhere or ``max_groups < 1``.
    """
    if max_groups < 1:
        raise ValueError(f"max_groups must be >= 1, got {max_groups}")
    if any(a < b for a, b in zip(lengths, lengths[1:], strict=False)):
        raise ValueError(f"lengths must not increase, got {lengths}")
    n = len(lengths)
    if n == 0:
        return []
    inf = float("inf")
    # cost[g][e]: fewest positions covering rows [0, e) with g groups; cut[g][e]: last start.
    cost = [[inf] * (n + 1) for _ in range(max_groups + 1)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    cost[0][0] = 0
    for g in range(1, max_groups + 1):
        for end in range(1, n + 1):
            for start in range(end):
                candidate = cost[g - 1][start] + (end - start) * lengths[start]
                if candidate < cost[g][end]:
                    cost[g][end], cut[g][end] = candidate, start
    groups = min(range(1, max_groups + 1), key=lambda g: (cost[g][n], g))
    bounds, end = [], n
    for g in range(groups, 0, -1):
        start = cut[g][end]
        bounds.append((start, end))
        end = start
    return bounds[::-1]


def _build_base(
    config: dict | None, pretrained: str | None, attn_implementation: str, dtype: str | None
) -> PreTrainedModel:
    """Build the LLM from a config dict (random weights) or load it from a local directory."""
    if (config is None) == (pretrained is None):
        raise ValueError("give exactly one of config (random init) and pretrained (a directory)")
    kwargs: dict[str, Any] = {"attn_implementation": _resolve_attn(attn_implementation)}
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be None or one of {sorted(DTYPES)}, got {dtype!r}")
        kwargs["dtype"] = DTYPES[dtype]
    if pretrained is not None:
        if not Path(pretrained).is_dir():
            raise FileNotFoundError(f"pretrained LLM directory not found: {pretrained}")
        return AutoModelForCausalLM.from_pretrained(pretrained, local_files_only=True, **kwargs)
    fields = dict(config)
    if "model_type" not in fields:
        raise ValueError(f"config needs a 'model_type' (e.g. 'llama'), got keys {sorted(fields)}")
    hf_config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    return AutoModelForCausalLM.from_config(hf_config, **kwargs)


def _resolve_attn(attn_implementation: str) -> str:
    """The attention kernel to request; flash attention only where it can run."""
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise ValueError(
            f"attn_implementation must be one of {ATTN_IMPLEMENTATIONS}, "
            f"got {attn_implementation!r}"
        )
    if attn_implementation != "flash_attention_2":
        return attn_implementation
    if importlib.util.find_spec("flash_attn") is None:
        reason = "the flash_attn package is not installed"
    elif not torch.cuda.is_available():
        reason = "CUDA is not available"
    else:
        return attn_implementation
    warnings.warn(f"flash_attention_2 requested but {reason}; using sdpa", stacklevel=3)
    return "sdpa"


def _wrap_lora(model: PreTrainedModel, lora: dict) -> nn.Module:
    """Wrap ``model`` with peft LoRA adapters: base weights frozen, adapters trainable."""
    # Imported here: peft is only needed when LoRA is configured, and importing it is slow.
    from peft import LoraConfig, get_peft_model

    with warnings.catch_warnings():
        # peft 0.21 reads transformers 5's deprecated `is_gradient_checkpointing`; not ours to fix.
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        return get_peft_model(model, LoraConfig(**lora))


def _fill_like(target: Tensor, rows: Tensor) -> None:
    """Fill ``target`` (N, D) with draws from the per-dimension N(mean, std) of ``rows`` (M, D)."""
    rows = rows.detach().float()
    mean, std = rows.mean(dim=0), rows.std(dim=0, correction=0)
    noise = torch.randn(target.shape, device=target.device)
    target.copy_(mean + std * noise)
