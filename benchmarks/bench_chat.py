"""Grounded-chat inference costs of ``GromaPX``. Prints tables, writes JSON.

    python benchmarks/bench_chat.py --model work_dirs/quickstart/model   # the quickstart's export
    python benchmarks/bench_chat.py --config CFG --tokenizer DIR         # random weights
    python benchmarks/bench_chat.py --config CFG --tokenizer DIR \
        --cfg-options model.llm.config.num_hidden_layers=16               # a deeper LLM

Measures, on prompts built from synthetic test images:
1. Decode speed: tokens/s of ``GromaPX`` generation as ``predict`` runs it (``greedy_generate``
   over the spliced prompt, KV cache, the grounding heads' per-step hook) vs the bare Hugging Face
   LLM's ``generate`` on token ids of the same total prompt length and batch; also the LLM loop
   without the hook, and the hook with its phrase pools over whole rows (no ``phrase_window``).
   Decode time is ``t(N new tokens) - t(1 new token)``, so the prefill is excluded; runs
   alternate in rounds (ours, whole rows, anywhere, loop, bare; ``--decode-repeats`` rounds).
   The rates are medians over the rounds; each ratio is the median of the per-round ratios, so
   a machine whose speed drifts between rounds moves both sides of a ratio together.
2. Prefill breakdown: time in backbone + proposer, box refiner (when the model has one), selector,
   region encoder, image tokens and the LLM prefill forward; the share of proposer (with its
   refiner) + selector + region encoder.
3. LLM positions per image for the ``pair`` and ``fused`` layouts at K = 100 region tokens.
4. With a mask head: its time per cited region (pixel embeddings, mask logits and the RLE in
   original pixels, for one citation per sample) against the time of a whole answer per sample
   (``predict``: perception, prefill, decoding, masks), and their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from mmengine.config import DictAction  # noqa: E402
from mmengine.dataset import Compose, pseudo_collate  # noqa: E402
from mmengine.registry import DefaultScope  # noqa: E402

from groma_px.data.grounded_dataset import GroundedConversationDataset  # noqa: E402
from groma_px.llm.generation import greedy_generate  # noqa: E402
from groma_px.llm.sequence import LAYOUTS, positions_per_image  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_chat.json"


def load_model(args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict]]:
    """The exported model (``--model``) or a randomly initialised one from ``--config``."""
    if args.model:
        if args.cfg_options:
            raise ValueError("--cfg-options applies to --config (random weights), not --model")
        from groma_px.inference.export import load_exported

        return load_exported(args.model)
    from groma_px.engine.stages import chat_config
    from groma_px.registry import MODELS

    cfg = chat_config(
        args.config,
        data_root=args.data_root,
        tokenizer_dir=args.tokenizer,
        work_dir="work_dirs/bench_chat",
        load_from=None,
    )
    if args.cfg_options:
        from region_proposer.runtime import apply_cfg_options

        apply_cfg_options(cfg, args.cfg_options)
    with DefaultScope.overwrite_default_scope("groma_px"):
        model = MODELS.build(cfg.model)
    return model.eval(), cfg.test_dataloader.dataset.pipeline


def batch_of(pipeline: list[dict], data_root: str, size: int, task: str) -> dict:
    dataset = GroundedConversationDataset(
        "test.jsonl", data_root, check_images="exists", tasks=[task]
    )
    with DefaultScope.overwrite_default_scope("groma_px"):
        transform = Compose(pipeline)
    return pseudo_collate([transform(dataset.get_data_info(i)) for i in range(size)])


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def prefill(model: torch.nn.Module, batch: dict) -> tuple[dict, dict[str, float]]:
    """The spliced prompt and the time of each prefill part (seconds)."""
    data = model.data_preprocessor(batch, False)
    inputs, samples, sizes = data["inputs"], data["data_samples"], data["valid_sizes"]
    parts: dict[str, float] = {}
    refiner, model.box_refiner = model.box_refiner, None  # timed on its own below
    try:
        start = time.perf_counter()
        pyramids, proposals = model._propose(inputs, samples, sizes)
        parts["backbone+proposer"] = time.perf_counter() - start
    finally:
        model.box_refiner = refiner
    if refiner is not None:
        start = time.perf_counter()
        proposals = refiner.refine_proposals(inputs, proposals, sizes)
        parts["box_refiner"] = time.perf_counter() - start
    start = time.perf_counter()
    perception = model.perceive_from(pyramids, proposals, samples, sizes, image=inputs)
    parts["selector"] = time.perf_counter() - start
    parts["region_encoder"] = timed(lambda: model._region_features(perception))
    image = model.consumers["image"]
    parts["image_tokens"] = timed(lambda: model.image_tokenizer(perception.pyramids[image]))
    prompt = model._embed(perception, samples, padding_side="left")
    parts["llm_prefill"] = timed(
        lambda: model.llm(prompt["inputs_embeds"], attention_mask=prompt["attention_mask"])
    )
    return prompt, parts


@torch.no_grad()
def mask_costs(model: torch.nn.Module, batch: dict, repeats: int) -> dict | None:
    """Seconds of the mask head per cited region vs seconds of a whole answer per sample."""
    if getattr(model, "mask_head", None) is None:
        return None
    from groma_px.models.masks import CitedRegions, logits_to_rle

    data = model.data_preprocessor(batch, False)
    inputs, samples, sizes = data["inputs"], data["data_samples"], data["valid_sizes"]
    perception = model.perceive(inputs, samples, sizes)
    prompt = model._embed(perception, samples, padding_side="left")
    # Row 0 of every sample that kept a region (random weights may keep none).
    index = torch.tensor(
        [b for b, k in enumerate(prompt["num_regions"]) if k > 0], dtype=torch.long
    )
    n = len(index)
    if n == 0:
        return {"mask_head": type(model.mask_head).__name__, "skipped": "no sample kept a region"}
    zeros = torch.zeros(n, dtype=torch.long)
    cited = CitedRegions(index, zeros, zeros, zeros)
    hidden = torch.randn(n, model.llm.hidden_size, generator=torch.Generator().manual_seed(0))
    padded = tuple(inputs.shape[-2:])

    def masks() -> None:
        logits = model._mask_logits(perception, prompt, inputs, cited, hidden)
        for mask, b in zip(logits, index.tolist(), strict=True):
            logits_to_rle(mask, padded, samples[b].metainfo)

    def answers() -> None:
        model.predict(inputs, samples, sizes)

    masks(), answers()  # warm-up
    per_region = statistics.median(timed(masks) for _ in range(repeats)) / n
    per_answer = statistics.median(timed(answers) for _ in range(repeats)) / len(samples)
    return {
        "mask_head": type(model.mask_head).__name__,
        "cited_samples": n,
        "mask_seconds_per_cited_region": per_region,
        "answer_seconds_per_sample": per_answer,
        "mask_share_per_cited_region": per_region / per_answer,
    }


@torch.no_grad()
def decode_rates(model: torch.nn.Module, prompt: dict, new_tokens: int, repeats: int) -> dict:
    """Decode tokens/s, measured alternately: ``GromaPX`` generation as ``predict`` runs it
    (the grounding heads' per-step hook: region pointer, copy and describe heads), the same with
    the hook's phrase pools read over the whole row instead of the window since the latest
    ``<p>`` (``phrase_window``), the same with ``<ri>`` scored at every step
    (``region_tokens_in_roi=False``), the LLM loop alone (no hook), and the bare LLM's
    ``generate``. Also which share of the steps (and of the rows' steps) could cite a region,
    i.e. ran the pointer, in the first contender's output."""
    from groma_px.models import heads

    embeds, mask = prompt["inputs_embeds"], prompt["attention_mask"]
    batch, length = mask.shape
    base = model.llm.hf_model
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, model.llm.first_new_id, (batch, length), generator=gen)
    pad = model.tokenizer.pad_token_id or 0
    window = heads.phrase_window

    def loop(n: int, hooked: bool) -> float:
        return timed(
            lambda: greedy_generate(
                model.llm,
                embeds,
                mask,
                max_new_tokens=n,
                eos_token_id=-1,
                pad_token_id=pad,
                output_hidden_states=False,
                logits_fn=model._decode_logits_fn(prompt) if hooked else None,
            )
        )

    def whole_row(n: int) -> float:
        heads.phrase_window = lambda token_ids, **_: 0
        try:
            return loop(n, True)
        finally:
            heads.phrase_window = window

    def anywhere(n: int) -> float:
        constrained, model.region_tokens_in_roi = model.region_tokens_in_roi, False
        try:
            return loop(n, True)
        finally:
            model.region_tokens_in_roi = constrained

    def bare(n: int) -> float:
        return timed(
            lambda: base.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=pad,
                eos_token_id=None,
            )
        )

    contenders = {
        "ours": lambda n: loop(n, True),
        "ours_whole_row_pools": whole_row,
        "ours_regions_anywhere": anywhere,
        "llm_loop": lambda n: loop(n, False),
        "bare": bare,
    }
    for fn in contenders.values():  # warm-up
        fn(2)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(repeats):
        for name, fn in contenders.items():
            times[name].append(fn(new_tokens) - fn(1))
    rates = {k: batch * (new_tokens - 1) / statistics.median(v) for k, v in times.items()}

    def ratio(name: str, other: str) -> float:
        """Median over the rounds of ``name``'s rate over ``other``'s in the same round."""
        return statistics.median(
            t_o / t_n for t_n, t_o in zip(times[name], times[other], strict=True)
        )

    tokens = greedy_generate(
        model.llm,
        embeds,
        mask,
        max_new_tokens=new_tokens,
        eos_token_id=-1,
        pad_token_id=pad,
        output_hidden_states=False,
        logits_fn=model._decode_logits_fn(prompt),
    ).tokens
    previous = torch.cat([prompt["input_ids"][:, -1:], tokens[:, :-1]], dim=1)
    may_cite = model._region_may_follow()[previous]
    return {
        "batch": batch,
        "prompt_length": length,
        "new_tokens": new_tokens,
        **{f"{name}_tokens_per_s": rate for name, rate in rates.items()},
        "ratio_ours_over_bare": ratio("ours", "bare"),
        "ratio_ours_over_llm_loop": ratio("ours", "llm_loop"),
        "ratio_llm_loop_over_bare": ratio("llm_loop", "bare"),
        "ratio_ours_over_whole_row_pools": ratio("ours", "ours_whole_row_pools"),
        "ratio_ours_over_regions_anywhere": ratio("ours", "ours_regions_anywhere"),
        "pointer_step_share": float(may_cite.any(0).float().mean()),
        "pointer_row_step_share": float(may_cite.float().mean()),
        "repeats": repeats,
        "decode_seconds_per_round": times,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--model", help="exported model directory (tools/quickstart.py writes one)")
    parser.add_argument(
        "--config",
        default="configs/groma_px/groma-px_ddetr-vit-tiny_llama-tiny_stage3_synthetic.py",
    )
    parser.add_argument(
        "--cfg-options",
        nargs="+",
        action=DictAction,
        metavar="KEY=VALUE",
        help="overrides of --config (keys must exist), e.g. model.llm.config.num_hidden_layers=16",
    )
    parser.add_argument("--tokenizer", default="work_dirs/quickstart/tokenizer")
    parser.add_argument("--data-root", default="work_dirs/quickstart/data")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5, help="prefill and mask-head timings")
    parser.add_argument(
        "--decode-repeats",
        type=int,
        default=21,
        help="rounds of the decode contenders (the ratios are medians of per-round ratios)",
    )
    parser.add_argument("--out", default=str(DEFAULT_OUT))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    model, pipeline = load_model(args)
    batch = batch_of(pipeline, args.data_root, args.batch, "rec")
    prefill(model, batch)  # warm-up
    runs = [prefill(model, batch)[1] for _ in range(args.repeats)]
    parts = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    prompt, _ = prefill(model, batch)
    total = sum(parts.values())
    perceive = ("backbone+proposer", "box_refiner", "selector", "region_encoder")
    perception = sum(parts.get(k, 0.0) for k in perceive)
    decode = decode_rates(model, prompt, args.new_tokens, args.decode_repeats)
    masks = mask_costs(model, batch, args.repeats)
    positions = {
        layout: positions_per_image(model.num_image_tokens, 100, layout) for layout in LAYOUTS
    }
    result = {
        "what": "GromaPX grounded-chat inference: decode speed vs the bare LLM, prefill "
        "breakdown, LLM positions per image",
        "model": args.model or f"{args.config} (random weights)",
        "cfg_options": args.cfg_options or {},
        "llm": {
            "layers": model.llm.hf_model.config.num_hidden_layers,
            "hidden_size": model.llm.hidden_size,
        },
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "decode": decode,
        "prefill_seconds": parts,
        "prefill_share_proposer_selector_region_encoder": perception / total,
        "llm_positions_per_image_at_K100": positions,
        "num_image_tokens": model.num_image_tokens,
        "mask": masks,
    }
    print(
        f"\ndecode ({decode['batch']} x {decode['prompt_length']}-token prompts, "
        f"{decode['new_tokens']} new tokens, {decode['repeats']} rounds; ratios: medians of "
        "per-round ratios)"
    )
    rows = (
        ("GromaPX generation", "ours"),
        ("  pools of whole rows", "ours_whole_row_pools"),
        ("  <ri> at every step", "ours_regions_anywhere"),
        ("  LLM loop, no heads", "llm_loop"),
        ("bare LLM generate", "bare"),
    )
    for label, key in rows:
        print(f"  {label:<26} {decode[f'{key}_tokens_per_s']:>9.1f} tokens/s")
    ratios = (
        "ours_over_bare",
        "ours_over_llm_loop",
        "llm_loop_over_bare",
        "ours_over_whole_row_pools",
    )
    for key in (*ratios, "ours_over_regions_anywhere"):
        print(f"  {'ratio ' + key.replace('_over_', ' / '):<26} {decode['ratio_' + key]:>9.3f}")
    print(
        f"  pointer ran at {decode['pointer_step_share']:.0%} of the steps "
        f"({decode['pointer_row_step_share']:.0%} of the rows' steps)"
    )
    print("\nprefill (median seconds)")
    for key, value in parts.items():
        print(f"  {key:<22} {value:>9.4f}  {value / total:>6.1%}")
    print(f"  proposer + selector + region encoder share: {perception / total:.1%}")
    print("\nLLM positions per image at K = 100")
    for layout, n in positions.items():
        print(f"  {layout:<8} {n}")
    if masks is not None and "skipped" in masks:
        print(f"\nmask head ({masks['mask_head']}): not measured, {masks['skipped']}")
    elif masks is not None:
        print(f"\nmask head ({masks['mask_head']}, median seconds)")
        print(f"  {'per cited region':<22} {masks['mask_seconds_per_cited_region']:>9.4f}")
        print(f"  {'whole answer / sample':<22} {masks['answer_seconds_per_sample']:>9.4f}")
        print(f"  {'share per region':<22} {masks['mask_share_per_cited_region']:>9.1%}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
