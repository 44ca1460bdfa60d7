"""``benchmarks/bench_chat.py`` runs end to end on the tiny config and writes its JSON."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_chat", ROOT / "benchmarks/bench_chat.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_chat_writes_ratios_and_positions(tiny_data, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = tmp_path / "bench_chat.json"
        result = _bench().main(
            [
                "--config", str(ROOT / "configs/tiny/groma-px_tiny.py"),
                "--tokenizer", str(tiny_data["tokenizer_dir"]),
                "--data-root", str(tiny_data["data_root"]),
                "--batch", "2", "--new-tokens", "3", "--repeats", "1", "--decode-repeats", "1",
                "--out", str(out),
                "--cfg-options", "model.llm.config.num_hidden_layers=1",
            ]
        )  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["llm"]["layers"] == 1  # the override reached the built model
    decode = result["decode"]
    for key in ("ours", "ours_whole_row_pools", "ours_regions_anywhere", "llm_loop", "bare"):
        assert decode[f"{key}_tokens_per_s"] > 0
    assert 0.0 <= decode["pointer_row_step_share"] <= decode["pointer_step_share"] <= 1.0
    # one round: the per-round ratio is the ratio of the rates
    assert decode["ratio_ours_over_bare"] == pytest.approx(
        decode["ours_tokens_per_s"] / decode["bare_tokens_per_s"]
    )
    assert decode["ratio_ours_over_llm_loop"] == pytest.approx(
        decode["ours_tokens_per_s"] / decode["llm_loop_tokens_per_s"]
    )
    assert {len(v) for v in decode["decode_seconds_per_round"].values()} == {1}
    g = result["num_image_tokens"]
    assert result["llm_positions_per_image_at_K100"] == {"pair": g + 200, "fused": g + 100}
    assert 0.0 < result["prefill_share_proposer_selector_region_encoder"] < 1.0
