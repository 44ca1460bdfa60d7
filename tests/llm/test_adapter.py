"""Tests for ``groma_px.llm.adapter.GroundedCausalLM`` on tiny random Hugging Face models."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mmengine.model import BaseModule
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from groma_px.llm.adapter import GroundedCausalLM
from groma_px.registry import MODELS

VOCAB = 300
FIRST_NEW = 290  # < VOCAB: base rows 290..299 exist in the LLM but are unused
NUM_NEW = 20
TINY = dict(
    model_type="llama",
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
)
LORA = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)


def tiny_lm(**kwargs) -> GroundedCausalLM:
    torch.manual_seed(0)
    kwargs = {"first_new_id": FIRST_NEW, "num_new_tokens": NUM_NEW, "config": TINY, **kwargs}
    return GroundedCausalLM(**kwargs).eval()


def saved_llama(directory: Path) -> LlamaForCausalLM:
    """A random Llama checkpoint written with ``save_pretrained``, like a downloaded one."""
    torch.manual_seed(1)
    fields = {k: v for k, v in TINY.items() if k != "model_type"}
    model = LlamaForCausalLM(LlamaConfig(**fields)).eval()
    model.save_pretrained(directory)
    return model


def base_ids() -> torch.Tensor:
    return torch.randint(0, FIRST_NEW, (2, 7), generator=torch.Generator().manual_seed(2))


def logits_of(lm: GroundedCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return lm(lm.embed_tokens(ids)).logits


def test_logits_cover_base_and_new_ids_and_match_bare_model() -> None:
    lm = tiny_lm()
    ids = base_ids()
    ids[0, 3] = FIRST_NEW + 5  # a grounding token inside the sequence
    out = lm(lm.embed_tokens(ids), attention_mask=torch.ones_like(ids))
    assert out.logits.shape == (2, 7, FIRST_NEW + NUM_NEW) == (2, 7, lm.vocab_size)
    assert out.hidden_states.shape == (2, 7, lm.hidden_size) == (2, 7, 64)
    assert out.past_key_values is None
    plain = base_ids()
    bare = lm.hf_model(input_ids=plain).logits
    torch.testing.assert_close(logits_of(lm, plain)[..., :FIRST_NEW], bare[..., :FIRST_NEW])


def test_embed_tokens_dispatches_to_base_and_new_tables() -> None:
    lm = tiny_lm()
    ids = torch.tensor([[0, FIRST_NEW - 1, FIRST_NEW, FIRST_NEW + NUM_NEW - 1]])
    emb = lm.embed_tokens(ids)
    base_table = lm.hf_model.get_input_embeddings().weight
    assert emb.shape == (1, 4, 64)
    torch.testing.assert_close(emb[0, :2], base_table[[0, FIRST_NEW - 1]])
    torch.testing.assert_close(emb[0, 2:], lm.new_embed.weight[[0, NUM_NEW - 1]])


@pytest.mark.parametrize("bad", [-1, FIRST_NEW + NUM_NEW])
def test_embed_tokens_rejects_ids_outside_the_vocabulary(bad: int) -> None:
    with pytest.raises(ValueError, match=r"\[0, 310\)"):
        tiny_lm().embed_tokens(torch.tensor([[1, bad]]))


def test_first_new_id_beyond_base_vocab_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"first_new_id=301.*vocab_size=300"):
        tiny_lm(first_new_id=VOCAB + 1)
    assert tiny_lm(first_new_id=VOCAB).vocab_size == VOCAB + NUM_NEW  # the boundary is fine


def test_needs_exactly_one_source_and_known_options() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        GroundedCausalLM(first_new_id=FIRST_NEW, num_new_tokens=NUM_NEW)
    with pytest.raises(ValueError, match="dtype"):
        tiny_lm(dtype="float64")
    with pytest.raises(ValueError, match="model_type"):
        tiny_lm(config={k: v for k, v in TINY.items() if k != "model_type"})


def test_builds_from_the_registry() -> None:
    lm = MODELS.build(
        dict(type="GroundedCausalLM", first_new_id=FIRST_NEW, num_new_tokens=NUM_NEW, config=TINY)
    )
    assert isinstance(lm, GroundedCausalLM)


def test_freeze_base_trains_only_new_tables_and_keeps_table_size() -> None:
    lm = tiny_lm(freeze_base=True).train()
    assert lm.hf_model.get_input_embeddings().weight.shape == (VOCAB, 64)
    assert lm.hf_model.get_output_embeddings().weight.shape == (VOCAB, 64)
    ids = base_ids()
    ids[:, -1] = FIRST_NEW + 1
    logits_of(lm, ids).logsumexp(-1).sum().backward()
    with_grad = {n for n, p in lm.named_parameters() if p.grad is not None}
    assert with_grad == {"new_embed.weight", "new_head.weight"}
    assert {n for n, p in lm.named_parameters() if p.requires_grad} == with_grad


def test_lora_trains_only_adapters_and_new_tables_and_starts_as_base() -> None:
    plain, lora = tiny_lm(), tiny_lm(lora=LORA)
    trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
    assert {"new_embed.weight", "new_head.weight"} <= set(trainable)
    assert all("lora_" in n for n in trainable if not n.startswith("new_"))
    assert sum("lora_" in n for n in trainable) == 2 * 2 * 2  # layers x (q, v) x (A, B)
    ids = base_ids()
    torch.testing.assert_close(logits_of(lora, ids), logits_of(plain, ids))  # lora_B starts at 0
    lora.train()
    logits_of(lora, ids).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in lora.parameters() if p.requires_grad)


def test_gradient_checkpointing_still_gives_every_trainable_parameter_a_gradient() -> None:
    lm = tiny_lm(lora=LORA, gradient_checkpointing=True).train()
    assert lm.hf_model.is_activation_checkpointing
    logits_of(lm, base_ids()).logsumexp(-1).sum().backward()
    assert all(p.grad is not None for p in lm.parameters() if p.requires_grad)


def test_pretrained_llama_directory_plugs_in(tmp_path: Path) -> None:
    saved = saved_llama(tmp_path)
    lm = tiny_lm(config=None, pretrained=str(tmp_path))
    ids = base_ids()
    torch.testing.assert_close(
        logits_of(lm, ids)[..., :FIRST_NEW], saved(ids).logits[..., :FIRST_NEW]
    )


def test_missing_pretrained_directory_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_llm"
    with pytest.raises(FileNotFoundError, match="no_such_llm"):
        tiny_lm(config=None, pretrained=str(missing))


@pytest.mark.parametrize("lora", [None, LORA])
def test_save_pretrained_round_trip(tmp_path: Path, lora: dict | None) -> None:
    lm = tiny_lm(lora=lora)
    with torch.no_grad():  # make LoRA non-trivial so that merging matters
        for name, param in lm.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.1)
    lm.save_pretrained(tmp_path)
    assert (tmp_path / "grounding_tokens.safetensors").is_file()
    assert (tmp_path / "model.safetensors").is_file()
    back = GroundedCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(back.new_embed.weight, lm.new_embed.weight, rtol=0, atol=0)
    torch.testing.assert_close(back.new_head.weight, lm.new_head.weight, rtol=0, atol=0)
    ids = base_ids()
    ids[1, 2] = FIRST_NEW + NUM_NEW - 1
    torch.testing.assert_close(logits_of(back, ids), logits_of(lm, ids))
    # The base part alone loads without peft or the adapter.
    assert AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True) is not None


def test_loading_tables_saved_for_other_ids_fails(tmp_path: Path) -> None:
    tiny_lm().save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="saved for"):
        tiny_lm(config=None, pretrained=str(tmp_path), first_new_id=FIRST_NEW - 1)


def test_init_weights_keeps_loaded_base_and_loaded_new_tables(tmp_path: Path) -> None:
    tiny_lm().save_pretrained(tmp_path)
    parent = BaseModule()  # as in GromaPX: mmengine calls each child's init_weights
    parent.llm = GroundedCausalLM.from_pretrained(tmp_path)
    before = {k: v.clone() for k, v in parent.state_dict().items()}
    parent.init_weights()
    after = parent.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_init_weights_redraws_only_fresh_new_tables() -> None:
    lm = tiny_lm()
    before = {k: v.clone() for k, v in lm.state_dict().items()}
    lm.init_weights()
    changed = {k for k, v in lm.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"new_embed.weight", "new_head.weight"}


def test_new_tables_start_at_the_scale_of_the_base_rows() -> None:
    lm = tiny_lm()
    base = lm.hf_model.get_input_embeddings().weight[:FIRST_NEW]
    ratio = lm.new_embed.weight.std() / base.std()
    assert 0.7 < ratio < 1.3


def test_tied_new_embeddings_share_one_table_and_round_trip(tmp_path: Path) -> None:
    lm = tiny_lm(tie_new_embeddings=True, freeze_base=True)
    assert lm.new_head.weight is lm.new_embed.weight
    ids = base_ids()
    ids[:, -1] = FIRST_NEW + 3
    hidden = lm(lm.embed_tokens(ids)).hidden_states
    # The logit of <new 3> is the hidden state scored against <new 3>'s own input embedding.
    expected = hidden[..., :] @ lm.new_embed.weight[3]
    assert torch.allclose(lm(lm.embed_tokens(ids)).logits[..., FIRST_NEW + 3], expected, atol=1e-5)
    lm(lm.embed_tokens(ids)).logits.sum().backward()
    assert lm.new_embed.weight.grad is not None and lm.new_embed.weight.grad.abs().sum() > 0
    lm.save_pretrained(tmp_path / "tied")
    again = GroundedCausalLM(
        first_new_id=FIRST_NEW,
        num_new_tokens=NUM_NEW,
        pretrained=str(tmp_path / "tied"),
        tie_new_embeddings=True,
    ).eval()
    assert again.new_head.weight is again.new_embed.weight
    assert torch.equal(again.new_embed.weight, lm.new_embed.weight)


def test_flash_attention_falls_back_to_sdpa_on_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.warns(UserWarning, match="flash_attention_2.*sdpa"):
        lm = tiny_lm(attn_implementation="flash_attention_2")
    assert lm.hf_model.config._attn_implementation == "sdpa"
    assert tiny_lm(attn_implementation="eager").hf_model.config._attn_implementation == "eager"


def test_other_architectures_plug_in_with_their_scaling_and_softcapping() -> None:
    config = dict(TINY, model_type="gemma2", head_dim=16, final_logit_softcapping=1.0)
    lm = tiny_lm(config=config, attn_implementation="eager")  # Gemma 2 has no sdpa path
    ids = base_ids()
    bare = lm.hf_model(input_ids=ids).logits
    torch.testing.assert_close(logits_of(lm, ids)[..., :FIRST_NEW], bare[..., :FIRST_NEW])
    new = lm.embed_tokens(torch.tensor([FIRST_NEW]))
    torch.testing.assert_close(new[0], lm.new_embed.weight[0] * 64**0.5)  # Gemma's sqrt(D)


@pytest.mark.gpu
def test_bfloat16_on_gpu_matches_bare_model() -> None:
    lm = tiny_lm(dtype="bfloat16").cuda()
    assert lm.new_embed.weight.dtype == lm.new_head.weight.dtype == torch.bfloat16
    ids = base_ids().cuda()
    bare = lm.hf_model(input_ids=ids).logits
    torch.testing.assert_close(logits_of(lm, ids)[..., :FIRST_NEW], bare[..., :FIRST_NEW])


def test_length_groups_of_picks_the_fewest_positions() -> None:
    from groma_px.llm.adapter import length_groups_of

    lengths = [10, 9, 9, 4, 4, 3, 1]
    assert length_groups_of(lengths, 1) == [(0, 7)]
    # Two groups: {10, 9, 9} and the rest, 3 * 10 + 4 * 4 = 46 positions.
    assert length_groups_of(lengths, 2) == [(0, 3), (3, 7)]
    assert length_groups_of(lengths, 3) == [(0, 3), (3, 6), (6, 7)]  # 30 + 12 + 1
    assert length_groups_of([5, 5, 5], 3) == [(0, 3)]  # no gain from more groups
    assert length_groups_of([], 2) == []
    with pytest.raises(ValueError, match="must not increase"):
        length_groups_of([3, 5], 2)
    with pytest.raises(ValueError, match="max_groups"):
        length_groups_of([3], 0)


@pytest.mark.parametrize("groups", [2, 3])
def test_length_groups_give_the_padded_batch_outputs_and_gradients(groups: int) -> None:
    torch.manual_seed(3)
    lengths = [5, 12, 3, 12, 9, 1]
    ids = torch.randint(0, FIRST_NEW + NUM_NEW, (len(lengths), 12))
    mask = (torch.arange(12) < torch.tensor(lengths)[:, None]).long()
    outputs = {}
    for key in (1, groups):
        lm = tiny_lm(length_groups=key).train()
        calls = []
        hook = lm.hf_model.get_decoder().register_forward_pre_hook(
            lambda module, args, kwargs, calls=calls: calls.append(
                kwargs["inputs_embeds"].shape[:2]
            ),
            with_kwargs=True,
        )
        embeds = lm.embed_tokens(ids).detach().requires_grad_()
        out = lm(embeds, attention_mask=mask)
        hook.remove()
        real = mask.bool()
        (out.logits[real].square().sum() + out.hidden_states[real].sum()).backward()
        grads = {name: p.grad for name, p in lm.named_parameters() if p.grad is not None}
        outputs[key] = (out, embeds.grad, grads, calls)
    (out1, embeds1, grads1, calls1), (out_g, embeds_g, grads_g, calls_g) = outputs.values()
    real = mask.bool()
    torch.testing.assert_close(out_g.logits[real], out1.logits[real], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out_g.hidden_states[real], out1.hidden_states[real])
    assert not out_g.hidden_states[5, 5:].any()  # beyond its group's cut (5): zeros
    torch.testing.assert_close(embeds_g, embeds1, atol=1e-5, rtol=1e-5)
    assert grads_g.keys() == grads1.keys()
    for name in grads1:  # the same sums in another order: float32 rounding only
        scale = float(grads1[name].abs().max())
        torch.testing.assert_close(grads_g[name], grads1[name], atol=1e-4 * scale, rtol=1e-4)
    assert calls1 == [(6, 12)]
    # Sorted lengths 12, 12, 9, 5, 3, 1: two groups cover 3 * 12 + 3 * 5 = 51 positions
    # (72 padded), three 36 + 5 + 2 * 3 = 47 (tied with 36 + 2 * 5 + 1; the first is kept).
    expected = {2: [(3, 12), (3, 5)], 3: [(3, 12), (1, 5), (2, 3)]}
    assert calls_g == expected[groups]


def test_length_groups_leave_left_padding_and_cached_calls_alone() -> None:
    lm = tiny_lm(length_groups=4)
    calls = []
    lm.hf_model.get_decoder().register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(kwargs["inputs_embeds"].shape[:2]),
        with_kwargs=True,
    )
    ids = base_ids()
    left = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7])
    lm(lm.embed_tokens(ids), attention_mask=left)
    right = left.flip(-1)
    lm(lm.embed_tokens(ids), attention_mask=right, use_cache=True)
    assert calls == [(2, 7), (2, 7)]  # one padded call each
    with pytest.raises(ValueError, match="length_groups"):
        tiny_lm(length_groups=0)


def test_length_groups_give_zeros_for_a_row_of_padding_only() -> None:
    ids = base_ids()
    mask = torch.tensor([[1, 1, 1, 1, 0, 0, 0], [0] * 7])
    grouped = tiny_lm(length_groups=2)
    out = grouped(grouped.embed_tokens(ids), attention_mask=mask)
    padded = tiny_lm()(grouped.embed_tokens(ids[:1, :4]), attention_mask=mask[:1, :4])
    assert not out.hidden_states[1].any()
    torch.testing.assert_close(out.hidden_states[0, :4], padded.hidden_states[0])
