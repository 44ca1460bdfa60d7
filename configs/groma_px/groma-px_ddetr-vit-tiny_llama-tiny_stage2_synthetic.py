# Stage 2 (alignment) of the tiny CPU pipeline: perception and the LLM frozen; the image tokens,
# the region encoder and the grounding-token rows train. Starts from the stage-1 checkpoint
# (load_from; its backbone.*, proposer.* and box_refiner.* keys match GromaPX's).
_base_ = [
    "../_base_/default_runtime.py",
    "../_base_/datasets/synthetic_chat.py",
    "../_base_/models/proposer_vit-tiny.py",
    "../tiny/proposers/ddetr.py",
    "../_base_/models/groma-px_parts.py",
    "../_base_/models/llm_llama-tiny.py",
]
model = dict(
    type="GromaPX",
    backbone={{_base_.backbone}},
    proposer={{_base_.proposer}},
    box_refiner={{_base_.box_refiner}},  # stage 1's, frozen: tightens the proposals
    region_encoder={{_base_.region_encoder}},
    image_tokenizer={{_base_.image_tokenizer}},
    selector={{_base_.selector}},
    llm={{_base_.llm}},
    tokenizer={{_base_.tokenizer_dir}},
    layout="pair",
    frozen=("backbone", "proposer", "llm.model"),  # llm.model: the base LLM, not new rows
    max_new_tokens=48,
    # While decoding, <ri> only after <roi> or another <ri> (the token format): the grounding
    # heads' pointer runs on those steps alone. On qs_s13's test split 2 of 2531 answers
    # changed, both from a region cited outside <roi> to a well-formed citation of the same
    # region (docs/NOTES.md, "Region tokens only inside <roi>").
    region_tokens_in_roi=True,
    # <ri> logits from a pointer over the region set (hidden state vs each region's slot state
    # and feature), its targets weighted 5x: on the CPU budget the linear head stayed near
    # chance (docs/NOTES.md, "groma_px end to end").
    region_head="pointer",
    # The pointer's query also reads the mean embedding of the phrase being cited (MDETR-style
    # phrase-region alignment): region accuracy rose from ~0.2 to ~0.6-0.8 in training.
    # relation=dict(): PhraseRelationHead, a CMN-style second hop for relational phrases ("the
    # triangle left of the star"), trained by the relational region-text queries below.
    # gated_phrase: the phrase term reads a per-word gated mean instead of the plain mean, so
    # the anchor's words ("the square" in "the object right of the square") can stop voting.
    region_pointer=dict(phrase_query=True, relation=dict(gated_phrase=False)),
    # The answer may copy the question's words (pointer-generator): without it the from-scratch
    # LLM rewrote "the hexagon" as "the circle" and the phrase query then sought a circle.
    copy_head=dict(),
    # Every labelled region of a training image also trains the pointer's phrase query against
    # its feature (its words, a random subset: "the star" ... "the small red star"): REC
    # questions alone give one label per sample, and shape was what the regions lacked.
    # negatives="batch": each query competes over every kept region of the batch, not only its
    # image's (docs/NOTES.md, "Batch-wide region-text negatives").
    # relational_prob: every region also gets a query relating it to another ("the star to the
    # left of the red circle") where one holds: relational questions alone were too few to
    # train the relation head (docs/NOTES.md, "Relational region-text queries"). 1.0 over 0.5:
    # REC 0.912 / 0.921 against 0.886-0.908 in six runs at 0.5 on the same stage 1
    # (docs/NOTES.md, "Every region a relational query").
    # weight=2.0: REC 0.910 / 0.910 (relational 0.836 / 0.821) against 0.884 / 0.894 (0.672 /
    # 0.657) at 1.0 on the same stage 1 (two runs each; docs/NOTES.md, "Region-text weight 2").
    region_text_loss=dict(weight=2.0, negatives="batch", relational_prob=1.0),
    # Region captions: text logits biased towards the words whose pointer key matches the cited
    # user region (the pointer run backwards); without it every caption was the same sentence.
    describe_head=dict(),
    region_loss_weight=5.0,
    # A question's <refer_box> carries its region feature (Groma's <refer_feat>): with the
    # citation alone the from-scratch LLM answered every region caption the same way.
    user_region_features=True,
    mask_head={{_base_.mask_head}},
    mask_loss=dict(num_points=1024, max_masks=16),
    # Perception is frozen in stages 2 and 3: keep each image's pyramid and proposals after the
    # first epoch. A fixed padded size makes features independent of batch-mates.
    cache_perception=True,
    data_preprocessor=dict(
        type="ProposerDataPreprocessor",
        pad_size_divisor={{_base_.data_preprocessor.pad_size_divisor}},
        pad_to_size=({{_base_.image_size}}, {{_base_.image_size}}),
    ),
)
load_from = "work_dirs/stage1/iter_1800.pth"  # tools/train.py of the stage-1 config

max_iters = 200
train_cfg = dict(type="IterBasedTrainLoop", max_iters=max_iters, val_interval=max_iters + 1)
val_cfg = dict(type="ValLoop")
test_cfg = dict(type="TestLoop")
optim_wrapper = dict(
    type="OptimWrapper",
    # fused AdamW: 7.2 ms per stage-3 step against 31.2 ms per-tensor
    # (benchmarks/bench_optimizer.py).
    optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.0, fused=True),
    clip_grad=dict(max_norm=1.0),
)
param_scheduler = [
    dict(type="LinearLR", start_factor=0.05, by_epoch=False, begin=0, end=20),
    dict(type="CosineAnnealingLR", by_epoch=False, begin=20, end=max_iters, eta_min=1e-5),
]
default_hooks = dict(checkpoint=dict(interval=max_iters, max_keep_ckpts=1))
