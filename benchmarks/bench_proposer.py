"""Forward time of our Deformable DETR proposer vs transformers' Deformable DETR, and its growth
from 448^2 to 896^2 input. Prints tables, writes JSON.

    python benchmarks/bench_proposer.py --device cpu --repeats 3
    python benchmarks/bench_proposer.py --encoder-layers 6 --decoder-layers 6  # paper size

Defaults (256 wide, 8 heads, 4 points, 4 levels, 300 queries, 3 + 3 layers) finish in about 1.5
minutes on 2 CPU cores; 6 + 6 layers take about twice as long. transformers' detection model
needs at least 2 decoder layers (its weight-tying patterns fail for 1).

Both models get the same multi-scale maps, sized as a ViT pyramid would make them (stride-14
patches, scales 4/2/1/0.5), and the same size (width, heads, points, levels, layers, queries,
box refinement, one objectness class). transformers' conv backbone is bypassed: its
``model.backbone`` is replaced by a module returning those maps (with all-valid masks) and its
``input_proj`` by per-level 1x1 conv + GroupNorm like ours, so both time input projection,
position embeddings, encoder, decoder and heads. Runs alternate (ours, HF, ours, ...) after one
warm-up each; the figures are medians of ``--repeats`` wall-clock runs under ``torch.no_grad``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from region_proposer.proposers.deformable_detr import DeformableDETRProposer  # noqa: E402
from region_proposer.structures import FeaturePyramid  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "bench_proposer.json"
PATCH = 14
SCALES = (4.0, 2.0, 1.0, 0.5)


def pyramid_shapes(image: int, patch: int = PATCH) -> list[tuple[int, int]]:
    """(H_l, W_l) of a ViT pyramid for a square ``image``: patch grid times each scale."""
    grid = math.ceil(image / patch)
    return [(int(grid * s), int(grid * s)) for s in SCALES]


def make_pyramid(image: int, channels: int, batch: int, device: str) -> FeaturePyramid:
    """Random maps of a ``batch`` of padded ``image`` x ``image`` inputs."""
    gen = torch.Generator().manual_seed(0)
    maps = [torch.randn(batch, channels, h, w, generator=gen) for h, w in pyramid_shapes(image)]
    size = math.ceil(image / PATCH) * PATCH
    return FeaturePyramid.from_maps([m.to(device) for m in maps], (size, size))


class _FixedMaps(nn.Module):
    """Stands in for transformers' conv backbone: returns the given maps with all-valid masks."""

    def __init__(self, maps: tuple[Tensor, ...]) -> None:
        super().__init__()
        self.maps = maps

    def forward(self, pixel_values: Tensor, pixel_mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        return [(m, torch.ones_like(m[:, 0], dtype=torch.bool)) for m in self.maps]


def build_hf(args: argparse.Namespace, feats: FeaturePyramid) -> nn.Module:
    """transformers' DeformableDetrForObjectDetection at our size, its backbone bypassed."""
    from transformers import DeformableDetrConfig, DeformableDetrForObjectDetection

    config = DeformableDetrConfig(
        backbone="resnet18",
        use_pretrained_backbone=False,
        num_labels=1,
        d_model=args.embed_dim,
        encoder_layers=args.encoder_layers,
        decoder_layers=args.decoder_layers,
        encoder_attention_heads=args.num_heads,
        decoder_attention_heads=args.num_heads,
        encoder_ffn_dim=args.ffn_dim,
        decoder_ffn_dim=args.ffn_dim,
        encoder_n_points=args.num_points,
        decoder_n_points=args.num_points,
        num_feature_levels=len(SCALES),
        num_queries=args.num_queries,
        with_box_refine=True,
        dropout=0.0,
    )
    model = DeformableDetrForObjectDetection(config)
    model.model.backbone = _FixedMaps(feats.maps)
    model.model.input_proj = nn.ModuleList(
        nn.Sequential(nn.Conv2d(c, args.embed_dim, 1), nn.GroupNorm(32, args.embed_dim))
        for c in feats.channels
    )
    return model.eval().to(args.device)


def build_ours(args: argparse.Namespace) -> nn.Module:
    model = DeformableDETRProposer(
        in_channels=args.channels,
        embed_dim=args.embed_dim,
        num_heads=args.num_heads,
        num_levels=len(SCALES),
        num_points=args.num_points,
        num_encoder_layers=args.encoder_layers,
        num_decoder_layers=args.decoder_layers,
        ffn_dim=args.ffn_dim,
        num_queries=args.num_queries,
    )
    return model.eval().to(args.device)


def _timed(fn: Callable[[], object], device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def time_alternating(fns: dict, repeats: int, device: str) -> dict:
    """Median seconds per function (name -> callable); one warm-up each, then they take turns."""
    times: dict = {name: [] for name in fns}
    with torch.no_grad():
        for fn in fns.values():
            fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(_timed(fn, device))
    return {name: statistics.median(ts) for name, ts in times.items()}


def compare_with_hf(args: argparse.Namespace) -> dict:
    """Ours vs transformers at ``--image``."""
    feats = make_pyramid(args.image, args.channels, args.batch, args.device)
    torch.manual_seed(0)
    ours, hf = build_ours(args), build_hf(args, feats)
    pixels = torch.zeros(args.batch, 3, *feats.image_size, device=args.device)
    medians = time_alternating(
        {"ours": lambda: ours(feats), "transformers": lambda: hf(pixel_values=pixels)},
        args.repeats,
        args.device,
    )
    return {
        "image": args.image,
        "tokens": sum(h * w for h, w in pyramid_shapes(args.image)),
        "ours_s": medians["ours"],
        "transformers_s": medians["transformers"],
        "ratio_ours_over_hf": medians["ours"] / medians["transformers"],
    }


def scaling(args: argparse.Namespace) -> list[dict]:
    """Our forward time at each ``--scaling-images`` size (sizes take turns, as above)."""
    torch.manual_seed(0)
    ours = build_ours(args)
    pyramids = {
        image: make_pyramid(image, args.channels, args.batch, args.device)
        for image in args.scaling_images
    }
    fns = {image: (lambda f=feats: ours(f)) for image, feats in pyramids.items()}
    medians = time_alternating(fns, args.scaling_repeats, args.device)
    rows = [
        {"image": image, "tokens": sum(h * w for h, w in pyramid_shapes(image)), "ours_s": median}
        for image, median in medians.items()
    ]
    for row in rows:
        row["time_vs_first"] = row["ours_s"] / rows[0]["ours_s"]
        row["tokens_vs_first"] = row["tokens"] / rows[0]["tokens"]
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scaling-repeats", type=int, default=2)
    parser.add_argument("--image", type=int, default=448, help="input size of the HF comparison")
    parser.add_argument("--scaling-images", type=int, nargs="+", default=[448, 896])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--channels", type=int, default=256, help="pyramid channels")
    parser.add_argument("--embed-dim", type=int, default=256)
    parser.add_argument("--num-heads", type=int, default=8)
    parser.add_argument("--num-points", type=int, default=4)
    parser.add_argument("--encoder-layers", type=int, default=3, help="paper: 6")
    parser.add_argument("--decoder-layers", type=int, default=3, help="paper: 6")
    parser.add_argument("--ffn-dim", type=int, default=1024)
    parser.add_argument("--num-queries", type=int, default=300)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.decoder_layers < 2:
        parser.error("--decoder-layers must be >= 2 (transformers' weight tying fails for 1)")
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    settings.update(
        torch_threads=torch.get_num_threads(),
        torch=torch.__version__,
        python=sys.version.split()[0],
        machine=platform.machine(),
    )
    print("settings:", json.dumps(settings))
    compare = compare_with_hf(args)
    print(f"\n{'input':>6} {'tokens':>7} {'ours s':>8} {'HF s':>8} {'ours/HF':>8}")
    print(
        f"{compare['image']:>6} {compare['tokens']:>7} {compare['ours_s']:>8.3f} "
        f"{compare['transformers_s']:>8.3f} {compare['ratio_ours_over_hf']:>8.3f}"
    )
    rows = scaling(args)
    print(f"\n{'input':>6} {'tokens':>7} {'ours s':>8} {'x time':>7} {'x tokens':>9}")
    for row in rows:
        print(
            f"{row['image']:>6} {row['tokens']:>7} {row['ours_s']:>8.3f} "
            f"{row['time_vs_first']:>7.2f} {row['tokens_vs_first']:>9.2f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"settings": settings, "vs_transformers": compare, "scaling": rows}, indent=2)
        + "\n"
    )
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
