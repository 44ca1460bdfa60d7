"""``GromaPX(BaseModel)``: image -> proposals -> region tokens -> LLM -> grounded answer."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
from mmengine.model import BaseModel
from mmengine.structures import BaseDataElement, InstanceData
from torch import Tensor, nn

from region_proposer.pretrain import with_in_channels
from region_proposer.pretrain.transforms import to_original_boxes

from ..llm.generation import greedy_generate
from ..llm.parser import parse_grounded_text
from ..llm.tokenizer import load_tokenizer
from ..llm.vocab import GroundingVocab
from ..mask_head import mask_losses
from ..registry import MODELS
from .building import PartsConfigMixin
from .heads import GroundingHeadsMixin
from .masks import cited_regions, padded_targets
from .outputs import kept_regions, next_token_loss, padded_region_tokens
from .perceiving import PerceptionMixin, forget_recent_images
from .perception_cache import RecentImages
from .prompting import VisualPromptsMixin
from .region_text_loss import RegionTextLossMixin

LAYOUTS = ("pair", "fused")
REGION_HEADS = ("linear", "pointer")
TOKEN_AVERAGES = ("global", "local")


@MODELS.register_module()
class GromaPX(
    PartsConfigMixin,
    PerceptionMixin,
    VisualPromptsMixin,
    GroundingHeadsMixin,
    RegionTextLossMixin,
    BaseModel,
):
    """Decoupled-perception grounded MLLM (Groma): a composition of configured parts.

    ``forward`` modes: ``loss`` -> ``{"loss": next-token CE over text and region-index tokens,
    "region_acc": ...}``; ``predict`` -> data samples with ``pred_response``
    (:class:`GroundedResponse`, boxes in original pixels), ``pred_text``, ``kept_boxes`` and
    ``gt_boxes_original``; ``tensor`` -> ``{"logits", "region_tokens"}``. With a mask head,
    ``loss`` adds ``loss_mask_bce`` and ``loss_mask_dice`` over the assistant citations whose
    region has a ground-truth mask, and every cited region of a ``pred_response`` carries its
    mask (COCO RLE in original pixels).

    Args:
        backbone: ``VisionBackbone`` config (shared by proposer, region encoder, image tokens).
        proposer: Any ``region_proposer`` proposer config; ``in_channels`` is derived.
        region_encoder: Region encoder config (``RoIRegionEncoder``); widths are derived.
        image_tokenizer: ``ImageTokenizer`` config; widths are derived.
        llm: ``GroundedCausalLM`` config; the grounding-token block is derived from the tokenizer.
        tokenizer: Local tokenizer directory holding the grounding tokens.
        selector: ``RegionSelector`` config; ``top_k`` must not exceed the region tokens.
        layout: Region block layout, ``"pair"`` (Groma) or ``"fused"``. Defaults to "pair".
        consumers: Backbone output feeding each role (``proposer``, ``region``, ``image``,
            ``mask``). Defaults to "proposer" for all (one shared pyramid).
        frozen: Sub-module names (dotted paths allowed) whose parameters do not train and stay
            in eval mode. Defaults to ("backbone", "proposer").
        max_new_tokens: Generation limit in ``predict``. Defaults to 64.
        region_tokens_in_roi: While decoding, an ``<ri>`` may follow only ``<roi>`` or
            another ``<ri>``, as the token format writes them: at every other step the ``<ri>``
            columns are masked and the pointer head is not run (most steps of an answer), so
            greedy decoding differs from unconstrained decoding only where the latter would
            cite a region outside ``<roi>``. Text logits are the same either way. Training
            (teacher-forced) is not affected. Defaults to True.
        recent_images: Outside training, images remembered by content (``RecentImages``) so
            that an image seen again, in this batch or a recent one, is not perceived again
            (evaluation lists each image's records together; ``TaskGroupedSampler`` keeps them
            in nearby batches). Only for proposers that read nothing but the image; forgotten
            on ``train()``/``eval()`` and after loading a state dict. 0 keeps none. Defaults
            to 128.
        cache_perception: Keep each training image's pyramid and proposals after the first
            computation (``PerceptionCache``); needs the backbone and proposer frozen and a
            fixed padded size (``data_preprocessor.pad_to_size``). At the first training step
            the cache binds to a digest of the frozen perception weights and the data
            preprocessor (normalisation, padded size), and models with the same digest in one
            process share what was computed (stage 3 after stage 2).
            Defaults to False.
        match_embedding_scale: RMS-normalise image and region tokens and scale them to the RMS
            of the LLM's token embeddings (times a learnable gain starting at 1), so that
            features do not drown the token embeddings they sit next to or are added to (the
            fused layout adds a region feature to its ``<ri>`` embedding). Defaults to True.
        region_loss_weight: Weight of ``<ri>`` targets in the token-averaged cross-entropy
            (1.0: plain CE). An answer has one region token among a dozen text tokens; a
            larger weight strengthens the pointing signal against the text. Defaults to 1.0.
        region_head: How ``<ri>`` logits are computed: ``"linear"`` (the adapter's extra LM
            head, Groma) or ``"pointer"`` (``RegionPointerHead``: the next-token state matched
            against region i's prompt-slot state and feature). Defaults to "linear".
        region_pointer: Keyword arguments of ``RegionPointerHead`` (``dim``, ``phrase_query``)
            when ``region_head="pointer"``. Defaults to None.
        copy_head: Keyword arguments of ``CopyHead`` (``dim``): the answer may copy text
            tokens of the prompt (pointer-generator), so the phrase it cites repeats the
            question's words. None: off. Defaults to None.
        describe_head: Keyword arguments of ``DescribeHead`` (none yet; ``dict()`` turns it on):
            text logits get a gated bias towards the words whose pointer key matches the user
            regions the prompt cites (the pointer run backwards, for region captions). Needs
            ``region_head="pointer"`` with ``phrase_query=True``. None: off. Defaults to None.
        region_text_loss: Keyword arguments of ``RegionTextAlignment`` (``weight``,
            ``drop_prob``, ``noun``, ``prefix``, ``iou_thr``): ``loss`` adds
            ``loss_region_text``, which names every labelled region of each training image and
            trains the pointer's phrase query against the kept regions' feature keys. Needs
            ``region_head="pointer"`` with ``phrase_query=True`` and samples packed with
            ``region_label_fields``. None: off. Defaults to None.
        token_average: Normalise the loss by the supervised tokens of the ``"global"`` batch
            (all data-parallel ranks: the gradient then equals one process's on the whole
            batch) or of each rank's ``"local"`` one. Same on one process. Defaults to "global".
        mask_head: Mask head config (``QueryMaskHead``, ``LLMMaskHead``); widths and levels
            are derived. None: boxes only. Defaults to None.
        mask_loss: Keyword arguments of ``mask_losses`` (``num_points``, ``bce_weight``,
            ``dice_weight``), and ``max_masks``: supervise at most this many citations per
            batch (a random subset; None: all). Defaults to None (their defaults).
        point_box_size: Side (share of the image) of the box a point prompt gets when no
            proposal contains it; otherwise it snaps to the best proposal containing it.
            Defaults to 0.1.
        user_region_features: Read a human turn's ``<refer_box>`` as ``<refer_feat>``: the
            user region's feature is spliced in where the question cites it (as Groma's
            ``<refer_feat>``), not only in the region block. Defaults to False.
        region_classifier: Keyword arguments of stage 1's ``RegionClassifier`` (its weights
            load from the stage-1 checkpoint under the same name; freeze it with ``frozen``):
            each region token gets ``W softmax(classifier logits)`` added, ``W`` starting at
            zero, so the category the pyramid was trained to name reaches the LLM and the
            pointer directly. None: off. Defaults to None.
        box_refiner: Stage 1's ``BoxRefiner`` (its weights load from the stage-1 checkpoint
            under the same name): tightens the proposer's boxes from the input pixels before
            region selection, only those the selector can keep (its ``score_thr`` is raised to
            the selector's). Always frozen here, like the proposer's outputs. A stage-1
            checkpoint without ``box_refiner.*`` keys leaves it at its initialisation, which
            returns the boxes unchanged (mmengine lists the missing keys). None: off.
            Defaults to None.
        data_preprocessor: ``ProposerDataPreprocessor`` config.
        init_cfg: mmengine init config.
    """

    def __init__(
        self,
        *,
        backbone: dict,
        proposer: dict,
        region_encoder: dict,
        image_tokenizer: dict,
        llm: dict,
        tokenizer: str,
        selector: dict | None = None,
        layout: str = "pair",
        consumers: dict[str, str] | None = None,
        frozen: Sequence[str] = ("backbone", "proposer"),
        max_new_tokens: int = 64,
        region_tokens_in_roi: bool = True,
        cache_perception: bool = False,
        recent_images: int = 128,
        match_embedding_scale: bool = True,
        region_loss_weight: float = 1.0,
        region_head: str = "linear",
        region_pointer: dict | None = None,
        copy_head: dict | None = None,
        describe_head: dict | None = None,
        region_text_loss: dict | None = None,
        token_average: str = "global",
        mask_head: dict | None = None,
        mask_loss: dict | None = None,
        point_box_size: float = 0.1,
        user_region_features: bool = False,
        region_classifier: dict | None = None,
        box_refiner: dict | None = None,
        data_preprocessor: dict | None = None,
        init_cfg: dict | None = None,
    ) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.max_new_tokens = max_new_tokens
        self.region_tokens_in_roi = bool(region_tokens_in_roi)
        self.consumers = self._check_consumers(consumers)
        self.tokenizer = load_tokenizer(tokenizer)
        self.vocab = GroundingVocab.from_tokenizer(self.tokenizer)
        self.token_ids = self.vocab.token_ids(self.tokenizer)
        self.backbone = MODELS.build(backbone)
        self.proposer = MODELS.build(
            with_in_channels(proposer, self.backbone, self.consumers["proposer"])
        )
        self.llm = MODELS.build(self._llm_cfg(llm))
        self.region_encoder = MODELS.build(self._width_cfg(region_encoder, "region", levels=True))
        self.image_tokenizer = MODELS.build(self._width_cfg(image_tokenizer, "image"))
        self._build_region_classifier(region_classifier)
        self.selector = MODELS.build(dict(type="RegionSelector") if selector is None else selector)
        if self.selector.top_k > self.vocab.num_region_tokens:
            raise ValueError(
                f"selector.top_k={self.selector.top_k} exceeds the tokenizer's "
                f"{self.vocab.num_region_tokens} region tokens"
            )
        self.box_refiner = None
        if box_refiner is not None:
            self.box_refiner = MODELS.build({"type": "region_proposer.BoxRefiner", **box_refiner})
            # refine only what the selector can keep, in training or test (scores do not change)
            self.box_refiner.score_thr = max(
                self.box_refiner.score_thr, self.selector.min_score_thr
            )
        self.frozen = tuple(frozen) + (
            ("box_refiner",) if box_refiner is not None and "box_refiner" not in frozen else ()
        )
        self._freeze()
        self._cache = self._build_cache() if cache_perception else None
        self._recent = RecentImages(recent_images)
        self.register_load_state_dict_post_hook(forget_recent_images)
        self.match_embedding_scale = match_embedding_scale
        if region_loss_weight <= 0:
            raise ValueError(f"region_loss_weight must be > 0, got {region_loss_weight}")
        self.region_loss_weight = float(region_loss_weight)
        if region_head not in REGION_HEADS:
            raise ValueError(f"region_head must be one of {REGION_HEADS}, got {region_head!r}")
        self.region_head = region_head
        if token_average not in TOKEN_AVERAGES:
            raise ValueError(
                f"token_average must be one of {TOKEN_AVERAGES}, got {token_average!r}"
            )
        self.token_average = token_average
        self._build_text_heads(region_pointer, copy_head, describe_head, region_text_loss)
        self.mask_head = None if mask_head is None else MODELS.build(self._mask_head_cfg(mask_head))
        self.mask_loss = dict(mask_loss or {})
        self.max_masks = self.mask_loss.pop("max_masks", None)
        self.point_box_size = float(point_box_size)
        self.user_region_features = user_region_features
        self.register_buffer(
            "_region_cols", torch.tensor(self.token_ids.regions, dtype=torch.long), persistent=False
        )
        if match_embedding_scale:
            rms = self.llm.hf_model.get_input_embeddings().weight.detach().float().pow(2).mean()
            self.register_buffer("embedding_rms", rms.sqrt().reshape(()))
            self.feature_gain = nn.Parameter(torch.ones(2))  # image tokens, region tokens

    # ----------------------------------------------------------------------------- building

    num_image_tokens = property(lambda self: self.image_tokenizer.num_tokens, doc="G per image")

    # ----------------------------------------------------------------------------- forward
    def forward(
        self,
        inputs: Tensor,
        data_samples: list[BaseDataElement] | None = None,
        valid_sizes: Tensor | None = None,
        mode: str = "tensor",
    ) -> dict[str, Tensor] | list[BaseDataElement]:
        """See the class docstring; ``valid_sizes`` (B, 2) come from the data preprocessor."""
        if data_samples is None:
            raise ValueError("GromaPX needs data_samples (token ids and regions) in every mode")
        if valid_sizes is None:
            valid_sizes = torch.tensor([inputs.shape[-2:]] * len(inputs), device=inputs.device)
        if mode == "loss":
            return self.loss(inputs, data_samples, valid_sizes)
        if mode == "predict":
            return self.predict(inputs, data_samples, valid_sizes)
        if mode == "tensor":
            return self._forward(inputs, data_samples, valid_sizes)
        raise ValueError(f"unknown mode {mode!r}; expected 'loss', 'predict' or 'tensor'")

    @property
    def _pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.tokenizer.eos_token_id)

    def loss(
        self, inputs: Tensor, data_samples: list[BaseDataElement], valid_sizes: Tensor
    ) -> dict[str, Tensor]:
        """Next-token cross-entropy over supervised text and region-index tokens."""
        perception = self.perceive(inputs, data_samples, valid_sizes)
        batch = self._embed(perception, data_samples, padding_side="right")
        out = self.llm(batch["inputs_embeds"], attention_mask=batch["attention_mask"])
        logits = self._output_logits(out.logits, out.hidden_states, batch, supervised_only=True)
        losses = next_token_loss(
            logits[:, :-1].float(),
            batch["labels"][:, 1:],
            self._region_cols,
            self.region_loss_weight,
            global_average=self.token_average == "global",
        )
        if self.mask_head is not None:
            cited = cited_regions(data_samples, perception, batch["labels"], self._region_cols)
            cited = cited.subset(self.max_masks)
            hidden = out.hidden_states[cited.batch_index, cited.positions - 1]
            mask_logits = self._mask_logits(perception, batch, inputs, cited, hidden)
            targets, extents = padded_targets(
                data_samples, cited, valid_sizes, tuple(inputs.shape[-2:])
            )
            losses.update(mask_losses(mask_logits, targets, extents, **self.mask_loss))
        if self.region_text is not None:
            losses.update(self._region_text_losses(perception, batch, data_samples, valid_sizes))
        return losses

    @torch.no_grad()
    def predict(
        self, inputs: Tensor, data_samples: list[BaseDataElement], valid_sizes: Tensor
    ) -> list[BaseDataElement]:
        """Greedy generation with KV cache; region and image features enter only the prefill."""
        perception = self.perceive(inputs, data_samples, valid_sizes)
        batch = self._embed(perception, data_samples, padding_side="left")
        eos = self.tokenizer.eos_token_id
        generated = greedy_generate(
            self.llm,
            batch["inputs_embeds"],
            batch["attention_mask"],
            max_new_tokens=self.max_new_tokens,
            eos_token_id=eos,
            pad_token_id=self._pad_id,
            logits_fn=self._decode_logits_fn(batch),
        )
        masks = self._predict_masks(perception, batch, inputs, generated, data_samples)
        for b, sample in enumerate(data_samples):
            regions, kept = kept_regions(perception.selections[b], sample, valid_sizes[b])
            for row, rle in masks[b].items():
                regions[row] = dataclasses.replace(regions[row], mask=rle)
            raw = self._decode(generated.tokens[b])
            sample.pred_response = parse_grounded_text(raw, regions, vocab=self.vocab)
            sample.pred_text = sample.pred_response.text
            sample.kept_boxes = kept
            sample.gt_boxes_original = to_original_boxes(sample.gt_boxes.float(), sample.metainfo)
            valid = perception.proposals.valid[b]
            sample.proposals = InstanceData(  # before selection, after any box refiner
                metainfo={"valid_size": tuple(int(v) for v in valid_sizes[b])},
                bboxes=perception.proposals.boxes[b][valid],
                scores=perception.proposals.scores[b][valid],
            )
        return data_samples

    def _forward(
        self, inputs: Tensor, data_samples: list[BaseDataElement], valid_sizes: Tensor
    ) -> dict[str, Any]:
        perception = self.perceive(inputs, data_samples, valid_sizes)
        batch = self._embed(perception, data_samples, padding_side="right")
        out = self.llm(batch["inputs_embeds"], attention_mask=batch["attention_mask"])
        logits = self._output_logits(out.logits, out.hidden_states, batch)
        return {"logits": logits, "region_tokens": padded_region_tokens(perception, batch)}
