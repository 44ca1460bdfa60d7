"""Training knobs set by config take effect in a Runner (``configs/tiny/groma-px_tiny_knobs.py``):
LoRA, gradient checkpointing, attention implementation, optim wrapper by device, gradient
accumulation, per-module learning-rate multipliers, frozen modules; and the device defaults of
``region_proposer.runtime`` (DDP/FSDP wrappers on CPU)."""

from __future__ import annotations

import time
import warnings

import pytest
import torch
from mmengine.config import Config

from groma_px.engine import tiny_runs
from region_proposer.optim import cpu_has_fast_bf16
from region_proposer.runtime import build_runner, configure_for_device, optim_wrapper_for_device

KNOBS_CONFIG = tiny_runs.REPO_ROOT / "configs" / "tiny" / "groma-px_tiny_knobs.py"
ITERS = 4
BASE_LR = 1e-3


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The knobs config trained for 4 iterations in this process, and its weights before."""
    root = tmp_path_factory.mktemp("knobs")
    workspace = tiny_runs.make_workspace(root, num_train=8)
    path = tiny_runs.write_config(
        root / "knobs.py",
        workspace,
        base=KNOBS_CONFIG,
        options={"train_cfg.max_iters": ITERS, "default_hooks.checkpoint.interval": ITERS},
    )
    cfg = Config.fromfile(str(path))
    cfg.work_dir, cfg.launcher = str(root / "work"), "none"
    cfg.experiment_name = f"knobs_{time.time_ns()}"  # ENV-NOTES 8: one Visualizer per Runner
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "AmpOptimWrapper needs CUDA" on CPUs without bf16
        configure_for_device(cfg)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runner = build_runner(cfg)
        model = runner.model
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        runner.train()
    finally:
        torch.set_num_threads(threads)
    names = {id(p): n for n, p in model.named_parameters()}
    return {"runner": runner, "model": model, "before": before, "names": names}


def _changed(trained: dict, name: str) -> bool:
    return not torch.equal(trained["model"].state_dict()[name], trained["before"][name])


@pytest.mark.slow
def test_lora_trains_adapters_and_new_rows_and_leaves_the_base_llm(trained):
    model = trained["model"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("llm")]
    assert any("lora_A" in n for n in trainable) and any("lora_B" in n for n in trainable)
    assert {n for n in trainable if "lora_" not in n} == {
        "llm.new_embed.weight",
        "llm.new_head.weight",
    }
    base = [n for n in trained["before"] if n.startswith("llm.model") and "lora_" not in n]
    assert base and not any(_changed(trained, n) for n in base)
    assert all(_changed(trained, n) for n in trainable if "lora_B" in n)  # B starts at 0


@pytest.mark.slow
def test_gradient_checkpointing_and_attention_implementation_reach_the_llm(trained):
    hf_model = trained["model"].llm.hf_model
    assert hf_model.is_activation_checkpointing
    assert hf_model.config._attn_implementation == "eager"


@pytest.mark.slow
def test_frozen_modules_keep_their_weights_and_eval_mode(trained):
    model = trained["model"]
    for prefix in ("backbone.", "proposer."):
        names = [n for n in trained["before"] if n.startswith(prefix)]
        assert names and not any(_changed(trained, n) for n in names)
    model.train()
    assert not model.backbone.training and not model.proposer.training
    assert model.region_encoder.training


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_amp_optim_wrapper_runs_as_autocast_or_fp32_optim_wrapper_on_cpu(trained):
    wrapper = trained["runner"].optim_wrapper
    expected = "AutocastOptimWrapper" if cpu_has_fast_bf16() else "OptimWrapper"
    assert type(wrapper).__name__ == expected
    assert all(p.dtype == torch.float32 for p in trained["model"].parameters())


@pytest.mark.slow
def test_accumulation_steps_the_optimizer_every_second_iteration(trained):
    optimizer = trained["runner"].optim_wrapper.optimizer
    steps = {float(s["step"]) for s in optimizer.state.values()}
    assert steps == {ITERS / 2}
    assert trained["runner"].optim_wrapper._accumulative_counts == 2


@pytest.mark.slow
def test_lr_multipliers_show_in_the_optimizer_param_groups(trained):
    expected = {"llm": 0.5, "region_encoder": 2.0, "feature_gain": 0.1}
    seen = set()
    for group in trained["runner"].optim_wrapper.optimizer.param_groups:
        for param in group["params"]:
            name = trained["names"][id(param)]
            key = next((k for k in expected if k in name), None)
            seen.add(key)
            assert group["lr"] == pytest.approx(BASE_LR * expected.get(key, 1.0)), name
            if key == "feature_gain":
                assert group["weight_decay"] == 0.0
    assert seen == {*expected, None}  # every multiplier used, and the default lr too


def test_amp_optim_wrapper_is_kept_on_cuda_and_becomes_plain_elsewhere():
    amp = dict(
        type="AmpOptimWrapper",
        dtype="bfloat16",
        loss_scale="dynamic",
        optimizer=dict(type="AdamW", lr=1e-3),
        accumulative_counts=2,
        paramwise_cfg=dict(custom_keys={"llm": dict(lr_mult=0.1)}),
    )
    assert optim_wrapper_for_device(amp, cuda=True) == amp
    with pytest.warns(UserWarning, match="AmpOptimWrapper needs CUDA"):
        cpu = optim_wrapper_for_device(amp, cuda=False, cpu_bf16=False)
    assert cpu == {
        "type": "OptimWrapper",
        "optimizer": amp["optimizer"],
        "accumulative_counts": 2,
        "paramwise_cfg": amp["paramwise_cfg"],
    }
    assert amp["type"] == "AmpOptimWrapper"  # the config is not modified
    plain = dict(type="OptimWrapper", optimizer=dict(type="SGD", lr=0.1))
    assert optim_wrapper_for_device(plain, cuda=False) == plain


def test_configure_for_device_sets_the_cpu_wrappers_and_keeps_explicit_values():
    ddp = Config(dict(launcher="pytorch", find_unused_parameters=True))
    configure_for_device(ddp, cuda=False)
    assert ddp.model_wrapper_cfg == dict(
        type="MMDistributedDataParallel",
        broadcast_buffers=False,
        find_unused_parameters=True,
        device_ids=None,
    )
    fsdp = Config(
        dict(launcher="pytorch", strategy=dict(type="region_proposer.CompatFSDPStrategy"))
    )
    configure_for_device(fsdp, cuda=False)
    assert fsdp.strategy.model_wrapper == dict(device_id="cpu")
    explicit = Config(dict(launcher="pytorch", model_wrapper_cfg=dict(type="X", device_ids=[3])))
    configure_for_device(explicit, cuda=False)
    assert explicit.model_wrapper_cfg == dict(type="X", device_ids=[3])
    for cfg, cuda in (
        (Config(dict(launcher="none")), False),
        (Config(dict(launcher="pytorch")), True),
    ):
        configure_for_device(cfg, cuda=cuda)
        assert "model_wrapper_cfg" not in cfg


@pytest.mark.gpu
def test_bf16_autocast_trains_on_cuda(trained):
    cfg = Config(dict(optim_wrapper=dict(type="AmpOptimWrapper", dtype="bfloat16")))
    configure_for_device(cfg, cuda=True)
    assert cfg.optim_wrapper["type"] == "AmpOptimWrapper"
    from mmengine.optim import build_optim_wrapper

    model = trained["model"].cuda()
    wrapper = build_optim_wrapper(
        model, dict(type="AmpOptimWrapper", dtype="bfloat16", optimizer=dict(type="AdamW", lr=1e-4))
    )
    batch = next(iter(trained["runner"].train_dataloader))
    losses = model.train_step(batch, wrapper)
    assert torch.isfinite(losses["loss"])
