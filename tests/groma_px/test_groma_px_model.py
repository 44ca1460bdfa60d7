"""GromaPX composition (groma_px/models/) and the perception cache, on the tiny config
(configs/tiny/groma-px_tiny.py) and the tiny synthetic dataset of conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from mmengine.runner import Runner
from torch import nn

from groma_px.engine.stages import export_runner_model
from groma_px.inference import GroundedChat
from groma_px.llm.pointer import MASKED_LOGIT
from groma_px.models.perceiving import PERCEPTION_MODULES
from groma_px.models.perception_cache import (
    RecentImages,
    weights_fingerprint,
)
from groma_px.structures import GroundedResponse, RegionSource

# Train records 0 and 10 share image 0 (a REC target and a region caption with a user region);
# record 17 is image 1. Test records 0 (REC) and 1 (region caption) share test image 0.
TRAIN_BATCH = (0, 10, 17)  # images 0, 0 and 1: rec, region_caption, rec
TEST_BATCH = (0, 1)
FROZEN_PERCEPTION = ("backbone", "proposer")

pytestmark = pytest.mark.usefixtures("single_thread")


# ------------------------------------------------------------------------------ GromaPX
def _loss(model, batch):
    return model(**model.data_preprocessor(batch, True), mode="loss")


@torch.no_grad()
def _tensor(model, batch, *, training):
    return model(**model.data_preprocessor(batch, training), mode="tensor")


def _total(losses):
    """What mmengine's ``parse_losses`` optimises: the sum of every ``loss*`` entry."""
    return sum(v for k, v in losses.items() if k.startswith("loss"))


def _grad_report(model):
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and p.grad is None)
    frozen_with_grad = sorted(
        n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None
    )
    return trainable, missing, frozen_with_grad


def test_loss_backward_reaches_every_trainable_parameter(build_model, make_batch):
    model = build_model()
    losses = _loss(model, make_batch(TRAIN_BATCH))
    assert set(losses) == {
        "loss",
        "region_acc",
        "loss_mask_bce",
        "loss_mask_dice",
        "loss_region_text",
        "region_text_acc",
    }
    assert torch.isfinite(losses["loss"]) and 0.0 <= float(losses["region_acc"]) <= 1.0
    _total(losses).backward()
    trainable, missing, frozen_with_grad = _grad_report(model)
    assert not missing and not frozen_with_grad
    assert {n.split(".")[0] for n in trainable} == {
        "llm",
        "region_encoder",
        "image_tokenizer",
        "feature_gain",
        "region_pointer",
        "copy_head",
        "describe_head",
        "mask_head",
    }
    for name in FROZEN_PERCEPTION:
        module = model.get_submodule(name)
        assert not module.training  # frozen modules stay in eval mode under model.train()
        assert not any(p.requires_grad for p in module.parameters())


def test_batch_without_regions_trains_and_predicts(build_model, make_batch):
    # No proposal reaches the threshold and no GT joins: a counting sample keeps no region.
    model = build_model(selector=dict(score_thr=0.999, use_gt=False))
    batch = make_batch([13])
    assert batch["data_samples"][0].metainfo["task"] == "counting"
    assert batch["data_samples"][0].ref_regions.numel() == 0
    _total(_loss(model, batch)).backward()
    _, missing, _ = _grad_report(model)
    assert not missing  # the region encoder gets zero gradients (DDP needs every parameter)
    assert all((p.grad == 0).all() for p in model.region_encoder.parameters())
    model.eval()
    with torch.no_grad():
        (sample,) = model(**model.data_preprocessor(make_batch([0], "test"), False), mode="predict")
    assert sample.kept_boxes.shape == (0, 4) and sample.pred_response.regions == ()


def test_frozen_llm_trains_only_new_rows_region_encoder_and_image_tokens(build_model, make_batch):
    model = build_model(frozen=(*FROZEN_PERCEPTION, "llm.model"))
    _total(_loss(model, make_batch(TRAIN_BATCH))).backward()
    trainable, missing, frozen_with_grad = _grad_report(model)
    assert not missing and not frozen_with_grad
    groups = {
        n.split(".")[0] if not n.startswith("llm.") else n.rsplit(".", 1)[0] for n in trainable
    }
    assert groups == {
        "llm.new_embed",
        "llm.new_head",
        "region_encoder",
        "image_tokenizer",
        "feature_gain",
        "region_pointer",
        "copy_head",
        "describe_head",
        "mask_head",
    }
    assert not model.llm.model.training


def test_region_loss_weight_upweights_region_targets(build_model, make_batch):
    batch = make_batch(TRAIN_BATCH)
    plain = build_model(selector=dict(score_thr=0.0))
    weighted = build_model(selector=dict(score_thr=0.0), region_loss_weight=5.0)
    weighted.load_state_dict(plain.state_dict())
    out = _tensor(plain, batch, training=False)
    assert out["region_tokens"].valid.any()
    with torch.no_grad():
        loss_plain = float(_loss(plain.eval(), batch)["loss"])
        loss_weighted = float(_loss(weighted.eval(), batch)["loss"])
    assert loss_weighted != pytest.approx(loss_plain)
    with pytest.raises(ValueError, match="region_loss_weight"):
        build_model(region_loss_weight=0.0)


@pytest.mark.parametrize("phrase_query", [False, True])
def test_pointer_region_head_scores_only_existing_regions(build_model, make_batch, phrase_query):
    model = build_model(
        selector=dict(score_thr=0.0),
        region_head="pointer",
        region_pointer=dict(phrase_query=phrase_query),
        region_encoder=dict(pixel_roi_size=4 if phrase_query else 0),
        # both read the phrase query
        **({} if phrase_query else dict(describe_head=None, region_text_loss=None)),
    )
    batch = make_batch(TRAIN_BATCH)
    _total(_loss(model, batch)).backward()
    _, missing, _ = _grad_report(model)
    assert not missing
    assert model.region_pointer.query.weight.grad.abs().sum() > 0
    out = _tensor(model.eval(), batch, training=False)
    counts = out["region_tokens"].valid.sum(1)
    cols = torch.tensor(model.token_ids.regions)
    for b, k in enumerate(counts.tolist()):
        assert (out["logits"][b][:, cols[k:]] == MASKED_LOGIT).all()
        assert (out["logits"][b][:, cols[:k]] > MASKED_LOGIT).all()
    with torch.no_grad():
        samples = model(
            **model.data_preprocessor(make_batch([0, 1], "test"), False), mode="predict"
        )
    assert all(s.pred_response is not None for s in samples)
    with pytest.raises(ValueError, match="region_head"):
        build_model(region_head="mlp")


# Decode-time pointer (and copy) logits vs teacher-forced ones: tests/groma_px/test_copy_head.py


@pytest.mark.parametrize("in_roi", [True, False])
def test_linear_region_head_cites_only_inside_roi_when_constrained(build_model, make_batch, in_roi):
    model = build_model(
        selector=dict(score_thr=0.0),
        region_tokens_in_roi=in_roi,
        **dict.fromkeys(["region_pointer", "copy_head", "describe_head", "region_text_loss"]),
        region_head="linear",
    ).eval()
    data = model.data_preprocessor(make_batch([0, 1], "test"), False)
    with torch.no_grad():
        perception = model.perceive(data["inputs"], data["data_samples"], data["valid_sizes"])
        batch = model._embed(perception, data["data_samples"], padding_side="left")
    decode_fn = model._decode_logits_fn(batch)
    if not in_roi:  # nothing to change in the LLM's logits
        assert decode_fn is None
        return
    ids, cols = model.token_ids, torch.tensor(model.token_ids.regions)
    logits = torch.randn(2, model.llm.vocab_size)
    hidden = torch.randn(2, model.llm.hidden_size)
    # row 0 just wrote <roi>, row 1 a word: only row 0 may cite
    so_far = torch.tensor([[ids.phrase_start, ids.phrase_end, ids.roi_start], [5, 6, 7]])
    out = decode_fn(logits, hidden, None, so_far)
    torch.testing.assert_close(out[0], logits[0])
    assert (out[1, cols] == MASKED_LOGIT).all()
    text = torch.ones(out.shape[1], dtype=torch.bool)
    text[cols] = False
    torch.testing.assert_close(out[1, text], logits[1, text])


def test_features_enter_at_the_token_embedding_scale(build_model, make_batch):
    model = build_model(selector=dict(score_thr=0.0)).eval()
    data = model.data_preprocessor(make_batch(TRAIN_BATCH), False)
    with torch.no_grad():
        perception = model.perceive(data["inputs"], data["data_samples"], data["valid_sizes"])
        batch = model._embed(perception, data["data_samples"], padding_side="right")
    rms = batch["region_feats"].pow(2).mean(-1).sqrt()
    embed_rms = model.llm.hf_model.get_input_embeddings().weight.pow(2).mean().sqrt()
    assert torch.allclose(rms, embed_rms.expand_as(rms), rtol=1e-3)
    assert float(model.embedding_rms) == pytest.approx(float(embed_rms.detach()), rel=1e-5)


def test_predict_returns_grounded_responses_in_original_pixels(build_model, make_batch):
    model = build_model().eval()
    batch = make_batch(TEST_BATCH, split="test")
    samples = model(**model.data_preprocessor(batch, False), mode="predict")
    assert len(samples) == len(TEST_BATCH)
    for sample in samples:
        assert isinstance(sample.pred_response, GroundedResponse)
        assert sample.pred_text == sample.pred_response.text
        h, w = sample.metainfo["ori_shape"]
        kept = sample.kept_boxes
        assert 0 < len(kept) <= model.selector.top_k and kept.shape[1] == 4
        assert (kept >= 0).all() and (kept[:, [0, 2]] <= w).all() and (kept[:, [1, 3]] <= h).all()
        assert (kept[:, 2:] >= kept[:, :2]).all()
    # Test image 0 (179 x 149 pixels) holds one object at [37, 44, 106, 114].
    for sample in samples:
        torch.testing.assert_close(
            sample.gt_boxes_original, torch.tensor([[37.0, 44.0, 106.0, 114.0]]), atol=1e-3, rtol=0
        )
    # The region caption's user region is kept first (row <r0>), in original pixels; the other
    # rows are proposals (no GT candidates outside training).
    with torch.no_grad():
        out = model(**model.data_preprocessor(make_batch([1], "test"), False), mode="tensor")
    source = out["region_tokens"].source[0][out["region_tokens"].valid[0]].tolist()
    assert source[0] == RegionSource.USER and set(source[1:]) == {RegionSource.PROPOSER}
    torch.testing.assert_close(
        samples[1].kept_boxes[0], samples[1].gt_boxes_original[0], atol=1e-3, rtol=0
    )


def test_predict_does_not_depend_on_batch_mates(build_model, make_batch):
    # With a fixed padded size, a sample's answer is the same alone and left-padded in a batch
    # of longer and shorter prompts.
    model = build_model(data_preprocessor=dict(pad_to_size=(64, 64)), max_new_tokens=6).eval()
    indices = (0, 5, 9)  # test records of images 0, 1, 1 with prompts of 15, 17 and 14 ids

    def predict(idx):
        return model(
            **model.data_preprocessor(make_batch(idx, split="test"), False), mode="predict"
        )

    together = predict(indices)
    assert len({len(s.input_ids) for s in together}) == 3
    for sample, index in zip(together, indices, strict=True):
        (alone,) = predict([index])
        assert sample.pred_response.raw_text == alone.pred_response.raw_text
        torch.testing.assert_close(sample.kept_boxes, alone.kept_boxes, rtol=0, atol=1e-4)


@pytest.mark.parametrize("layout", ["pair", "fused"])
def test_layouts_run(build_model, make_batch, layout):
    model = build_model(layout=layout)
    assert torch.isfinite(_loss(model, make_batch(TRAIN_BATCH))["loss"])
    model.eval()
    with torch.no_grad():
        out = model(**model.data_preprocessor(make_batch([15]), False), mode="tensor")
    num_regions = int(out["region_tokens"].valid.sum())
    assert num_regions > 0 and out["region_tokens"].tokens.shape[-1] == model.llm.hidden_size
    assert out["logits"].shape[-1] == len(model.tokenizer)
    # Sample 15's sequence: its ids, G - 1 more image slots, and the region block
    # (2 positions per region in the pair layout, 1 in the fused one).
    per_region = 2 if layout == "pair" else 1
    ids = make_batch([15])["data_samples"][0].input_ids
    expected = len(ids) - 1 + model.num_image_tokens + per_region * num_regions
    assert out["logits"].shape[:2] == (1, expected)


def test_build_checks_top_k_and_consumers(build_model):
    with pytest.raises(ValueError, match="top_k=17 exceeds the tokenizer's 16 region tokens"):
        build_model(selector=dict(top_k=17))
    with pytest.raises(KeyError, match=r"unknown consumers roles \['depth'\]"):
        build_model(consumers=dict(depth="proposer"))
    with pytest.raises(ValueError, match="layout must be one of"):
        build_model(layout="interleaved")


# ------------------------------------------------------------------------------ PerceptionCache
def test_perception_cache_hits_and_matches_uncached(build_model, make_batch):
    # The linear region head: the pointer's LayerNorm'd feature keys would amplify the cache's
    # float16 rounding in the logits compared below.
    fixed = dict(pad_to_size=(64, 64))
    head = dict(
        region_head="linear", region_pointer=None, describe_head=None, region_text_loss=None
    )

    def batch():  # the same visual prompts every time (RandomVisualPrompts draws from numpy)
        np.random.seed(0)
        return make_batch(TRAIN_BATCH)

    model = build_model(cache_perception=True, data_preprocessor=fixed, **head)
    cache = model._cache
    first = _loss(model, batch())["loss"]
    assert (cache.misses, cache.hits, len(cache)) == (3, 0, 2)  # records 0 and 10: one image
    second = _loss(model, batch())["loss"]
    assert (cache.misses, cache.hits) == (3, 3)
    assert torch.equal(first, second)
    uncached = build_model(seed=1, data_preprocessor=fixed, **head)
    uncached.load_state_dict(model.state_dict())
    assert uncached._cache is None
    torch.testing.assert_close(_loss(uncached, batch())["loss"], first, rtol=0, atol=1e-4)
    # The loss of a random LLM barely depends on its inputs; region tokens and logits do. The
    # cache keeps float16 features, so they match to that precision (a crop one cell short
    # moves them by ~0.5).
    cached, plain = (_tensor(m, batch(), training=True) for m in (model, uncached))
    assert (cache.misses, cache.hits) == (3, 6)
    for got, want in (
        (cached["region_tokens"].tokens, plain["region_tokens"].tokens),
        (cached["logits"], plain["logits"]),
    ):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3)
    # Evaluation bypasses the cache.
    _tensor(model.eval(), batch(), training=False)
    assert (cache.misses, cache.hits) == (3, 6)


def test_perception_cache_is_shared_by_models_with_the_same_perception(build_model, make_batch):
    fixed = dict(pad_to_size=(64, 64))
    first = build_model(cache_perception=True, data_preprocessor=fixed)
    _loss(first, make_batch(TRAIN_BATCH))
    assert (first._cache.misses, len(first._cache)) == (3, 2)
    # The next stage's model: the same perception weights (other trainable parts differ).
    second = build_model(seed=1, cache_perception=True, data_preprocessor=fixed)
    for name in PERCEPTION_MODULES:
        module = getattr(second, name)
        if module is not None:
            module.load_state_dict(getattr(first, name).state_dict())
    _loss(second, make_batch(TRAIN_BATCH))
    assert (second._cache.misses, second._cache.hits) == (0, 3)
    assert second._cache.fingerprint == first._cache.fingerprint

    # One changed perception weight (else first's weights): first's store must not serve it.
    def changed(**kwargs):
        model = build_model(cache_perception=True, **kwargs)
        with torch.no_grad():
            next(model.proposer.parameters()).view(-1)[0] += 1.0
        return model

    third = changed(data_preprocessor=fixed)
    _loss(third, make_batch(TRAIN_BATCH))
    assert (third._cache.misses, third._cache.hits) == (3, 0)
    assert third._cache.fingerprint != first._cache.fingerprint
    # third's weights at another padded size: third's store must not serve it either.
    other_size = changed(data_preprocessor=dict(pad_to_size=(128, 128)))
    _loss(other_size, make_batch(TRAIN_BATCH))
    assert (other_size._cache.misses, other_size._cache.hits) == (3, 0)
    assert other_size._cache.fingerprint != third._cache.fingerprint


def test_weights_fingerprint_reads_names_shapes_and_values():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert weights_fingerprint({"m": a}) == weights_fingerprint({"m": b})
    assert weights_fingerprint({"m": a}) != weights_fingerprint({"n": a})
    assert weights_fingerprint({"m": a}) != weights_fingerprint({"m": a, "r": None})
    with torch.no_grad():
        b.bias[1] = torch.nextafter(b.bias[1], torch.tensor(1.0))  # one ulp
    assert weights_fingerprint({"m": a}) != weights_fingerprint({"m": b})
    assert weights_fingerprint({"m": a.half()}) != weights_fingerprint({"m": a.float()})
    assert weights_fingerprint({"m": a}, extra="x") != weights_fingerprint({"m": a})
    # Non-persistent buffers (a preprocessor's mean and std) count too.
    c, d = nn.Module(), nn.Module()
    c.register_buffer("mean", torch.zeros(3), persistent=False)
    d.register_buffer("mean", torch.ones(3), persistent=False)
    assert weights_fingerprint({"p": c}) != weights_fingerprint({"p": d})


def _other_image(make_batch, split, image_of):
    """Index of the first ``split`` record whose image is not ``image_of``'s."""
    path = make_batch([image_of], split=split)["data_samples"][0].metainfo["img_path"]
    for i in range(1, 50):
        if make_batch([i], split=split)["data_samples"][0].metainfo["img_path"] != path:
            return i
    raise AssertionError("no second test image")


@torch.no_grad()
def test_evaluation_perceives_each_image_once(build_model, make_batch):
    model = build_model().eval()
    seen = []
    model.backbone.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    indices = (*TEST_BATCH, _other_image(make_batch, "test", TEST_BATCH[0]))
    data = model.data_preprocessor(make_batch(indices, split="test"), False)
    inputs, samples = data["inputs"], data["data_samples"]
    sizes = torch.stack([torch.as_tensor(s.metainfo["img_shape"][:2]) for s in samples])
    assert model.perceive(inputs, samples, sizes).proposals.boxes.shape[0] == 3
    assert seen == [2]  # records 0 and 1 share an image: it runs once
    pyramids, proposals = model._propose(inputs, samples, sizes)
    assert seen == [2, 3]
    memo = RecentImages(max_items=0)  # within the batch only
    shared = memo(inputs, samples, sizes, model._propose)
    assert seen == [2, 3, 2] and (memo.hits, memo.misses, len(memo)) == (1, 2, 0)
    for name, pyramid in pyramids.items():
        for got, want in zip(shared[0][name].maps, pyramid.maps, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
        assert torch.equal(shared[0][name].valid_sizes, sizes)
    for field in ("boxes", "scores", "valid"):
        torch.testing.assert_close(getattr(shared[1], field), getattr(proposals, field))
    # Images are compared by content: the same file with other pixels is another image, and
    # so are the same pixels with another valid size.
    altered = inputs.clone()
    altered[1, :, 0, 0] += 1.0
    memo(altered, samples, sizes, model._propose)
    assert seen[-1] == 3
    smaller = sizes.clone()
    smaller[1] -= 1
    memo(inputs, samples, smaller, model._propose)
    assert seen[-1] == 3
    # Each predicted sample reports its image's proposals (the W&B hook's AR reads them).
    calls = len(seen)
    out = model(inputs, samples, sizes, mode="predict")
    assert len(seen) == calls  # both images are remembered from the first perceive
    reported = [s.proposals for s in out]
    assert torch.equal(reported[0].scores, reported[1].scores) and len(reported[2].scores) > 0
    assert reported[0].metainfo["valid_size"] == tuple(sizes[0].tolist())
    torch.testing.assert_close(reported[2].bboxes, proposals.boxes[2][proposals.valid[2]])
    # Training (no cache) perceives every row.
    seen.clear()
    model.train()
    model.perceive(inputs, samples, sizes)
    assert seen == [3]
    # train() forgot the images: evaluation perceives them again.
    model.eval()
    model.perceive(inputs, samples, sizes)
    assert seen == [3, 2]


@torch.no_grad()
def test_evaluation_remembers_images_across_batches(build_model, make_batch):
    """A later batch reuses what an earlier one perceived: same outputs, only new images run;
    the memory is bounded (least recently used first out) and forgotten on a weights load."""
    model = build_model(recent_images=2).eval()
    seen = []
    model.backbone.register_forward_hook(lambda m, args, out: seen.append(len(args[0])))
    a = TEST_BATCH[0]
    b = _other_image(make_batch, "test", a)
    c = next(
        i
        for i in range(b + 1, 60)
        if _image(make_batch, i) not in {_image(make_batch, j) for j in (a, b)}
    )

    def perceive(*indices):
        data = model.data_preprocessor(make_batch(indices, split="test"), False)
        sizes = torch.stack(
            [torch.as_tensor(s.metainfo["img_shape"][:2]) for s in data["data_samples"]]
        )
        return model.perceive(data["inputs"], data["data_samples"], sizes)

    first = perceive(a)
    second = perceive(b, a)  # a remembered, b new
    assert seen == [1, 1] and len(model._recent) == 2
    for name, pyramid in first.pyramids.items():
        for got, want in zip(second.pyramids[name].maps, pyramid.maps, strict=True):
            assert torch.equal(got[1], want[0])
    assert torch.equal(second.proposals.boxes[1], first.proposals.boxes[0])
    perceive(a)  # a hit: a is now the most recently used
    perceive(c)  # evicts b, the least recently used
    perceive(a)
    assert seen == [1, 1, 1] and len(model._recent) == 2
    perceive(b)
    assert seen == [1, 1, 1, 1]
    model.load_state_dict(model.state_dict())
    assert len(model._recent) == 0
    perceive(b)
    assert seen == [1, 1, 1, 1, 1]


def _image(make_batch, index):
    return make_batch([index], split="test")["data_samples"][0].metainfo["img_path"]


def test_perception_cache_rejects_another_padded_size(build_model, make_batch):
    model = build_model(cache_perception=True, data_preprocessor=dict(pad_to_size=(64, 64)))
    _loss(model, make_batch(TRAIN_BATCH))
    model.data_preprocessor.pad_to_size = (80, 80)
    with pytest.raises(
        ValueError, match=r"padded sizes \[\(64, 64\)\] but this batch is \(80, 80\)"
    ):
        _loss(model, make_batch(TRAIN_BATCH))


def test_perception_cache_needs_frozen_perception(build_model):
    with pytest.raises(ValueError, match="cache_perception=True needs 'backbone' and 'proposer'"):
        build_model(cache_perception=True, frozen=("backbone",))


# ------------------------------------------------------------------------------ Runner
@pytest.mark.slow
def test_runner_trains_and_tests(tiny_cfg, tiny_data):
    cfg = tiny_cfg
    cfg.test_dataloader.dataset.indices = 6  # test image 0 (REC, caption, ...) and 1 REC record
    records = (tiny_data["data_root"] / "test.jsonl").read_text().splitlines()[:6]
    num_rec = sum(json.loads(line)["task"] == "rec" for line in records)
    runner = Runner.from_cfg(cfg)
    head = runner.model.llm.new_head.weight.detach().clone()
    runner.train()
    assert runner.iter == 2 and (Path(cfg.work_dir) / "iter_2.pth").is_file()
    assert torch.isfinite(torch.tensor(runner.message_hub.get_scalar("train/loss").current()))
    assert not torch.equal(runner.model.llm.new_head.weight, head)  # the optimiser stepped
    metrics = runner.test()
    assert num_rec > 0 and metrics["rec/count"] == num_rec
    assert 0.0 <= metrics["rec/acc@0.5"] <= metrics["rec/ceiling"] + 1e-9 <= 1.0 + 1e-9
    # The trained model exports with the test pipeline and loads back for chat.
    chat = GroundedChat.from_pretrained(
        export_runner_model(runner, cfg, Path(cfg.work_dir) / "model")
    )
    trained = runner.model.state_dict()
    assert all(torch.equal(value, trained[key]) for key, value in chat.model.state_dict().items())
    assert chat.pipeline.transforms[-1].mode == "predict"


def test_a_saved_llama_checkpoint_directory_plugs_in_through_config(
    build_model, make_batch, tmp_path
):
    """A real pretrained Llama directory (here one this test saves) replaces the random LLM with
    a config change only: ``llm=dict(type="GroundedCausalLM", pretrained=DIR)``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    reference = build_model()
    first_new_id = reference.llm.first_new_id
    torch.manual_seed(3)
    llama = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=first_new_id + 7,  # a padded vocabulary, as real checkpoints have
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).eval()
    llama.save_pretrained(tmp_path / "llama")
    model = build_model(
        llm=dict(type="GroundedCausalLM", pretrained=str(tmp_path / "llama"), config=None)
    )
    assert model.llm.hidden_size == 48 and model.region_encoder is not None
    for name, param in llama.state_dict().items():
        assert torch.equal(model.llm.hf_model.state_dict()[name], param), name
    losses = _loss(model, make_batch(TRAIN_BATCH))
    assert torch.isfinite(losses["loss"])
    losses["loss"].backward()
    assert model.llm.new_embed.weight.grad is not None


def test_user_region_features_splice_the_feature_where_the_question_cites_it(
    build_model, make_batch
):
    batch = make_batch([1], "test")  # region caption: "What object is shown in <refer_box>?"
    assert batch["data_samples"][0].metainfo["task"] == "region_caption"
    plain = build_model(selector=dict(score_thr=0.0)).eval()
    fed = build_model(selector=dict(score_thr=0.0), user_region_features=True).eval()
    fed.load_state_dict(plain.state_dict())
    embedded = []
    for model in (plain, fed):
        data = model.data_preprocessor(batch, False)
        with torch.no_grad():
            perception = model.perceive(data["inputs"], data["data_samples"], data["valid_sizes"])
            embedded.append(model._embed(perception, data["data_samples"], padding_side="left"))
    a, b = embedded
    # One more position: the cited <r0> is followed by a <region> slot holding region 0.
    assert b["input_ids"].shape[1] == a["input_ids"].shape[1] + 1
    assert (b["region_slots"] == 0).sum() == (a["region_slots"] == 0).sum() + 1
    ids = plain.token_ids
    assert ids.refer_box not in b["input_ids"] and ids.refer_feat not in b["input_ids"]
