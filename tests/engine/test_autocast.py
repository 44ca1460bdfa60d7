"""bf16 autocast without a loss scaler (``region_proposer.AutocastOptimWrapper``) and the device
rule that picks it for ``AmpOptimWrapper(dtype="bfloat16")`` configs on CPUs with native bf16."""

from __future__ import annotations

import pytest
import torch
from mmengine.model import BaseModel
from mmengine.optim import OptimWrapper, build_optim_wrapper
from torch import nn

from region_proposer.optim import AutocastOptimWrapper
from region_proposer.runtime import optim_wrapper_for_device


class _Regressor(BaseModel):
    """Two linear layers; records the dtype each one computed in."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 1))
        self.dtypes: list[torch.dtype] = []
        for layer in (self.net[0], self.net[2]):
            layer.register_forward_hook(lambda m, i, out: self.dtypes.append(out.dtype))

    def forward(self, inputs, targets=None, mode="loss"):
        out = self.net(inputs)
        return {"loss": (out.float().squeeze(1) - targets).pow(2).mean()}


def _batch() -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 16, generator=g)
    return {"inputs": x, "targets": x[:, :4].sum(1)}


def _train(wrapper_cfg: dict, steps: int) -> tuple[_Regressor, OptimWrapper, list[float]]:
    model = _Regressor()
    wrapper = build_optim_wrapper(model, wrapper_cfg)
    losses = [model.train_step(_batch(), wrapper)["loss"].detach().item() for _ in range(steps)]
    return model, wrapper, losses


def test_autocast_wrapper_runs_the_forward_in_bf16_and_keeps_fp32_weights_and_state():
    adam = dict(type="AdamW", lr=1e-2)
    model, wrapper, losses = _train(
        dict(type="region_proposer.AutocastOptimWrapper", optimizer=adam), steps=30
    )
    assert isinstance(wrapper, AutocastOptimWrapper)
    assert set(model.dtypes) == {torch.bfloat16}  # both linear layers, every step
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())
    state = wrapper.optimizer.state[model.net[0].weight]
    assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.float32
    assert losses[-1] < 0.2 * losses[0]  # it trains
    reference, _, fp32_losses = _train(dict(type="OptimWrapper", optimizer=adam), steps=30)
    assert set(reference.dtypes) == {torch.float32}
    assert losses[0] == pytest.approx(fp32_losses[0], rel=0.02)  # the same model, bf16 products
    with torch.no_grad():  # outside the wrapper's context: fp32 again
        model.net(_batch()["inputs"])
    assert model.dtypes[-1] == torch.float32


def test_autocast_wrapper_refuses_float16():
    with pytest.raises(ValueError, match="only 'bfloat16'.*AmpOptimWrapper"):
        AutocastOptimWrapper(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1), dtype="float16")


def test_bf16_amp_config_becomes_autocast_on_a_cpu_with_native_bf16_and_fp32_elsewhere():
    amp = dict(
        type="AmpOptimWrapper",
        dtype="bfloat16",
        loss_scale="dynamic",
        optimizer=dict(type="AdamW", lr=1e-3),
        clip_grad=dict(max_norm=1.0),
    )
    rest = {"optimizer": amp["optimizer"], "clip_grad": amp["clip_grad"]}
    assert optim_wrapper_for_device(amp, cuda=False, cpu_bf16=True) == {
        "type": "region_proposer.AutocastOptimWrapper",
        "dtype": "bfloat16",
        **rest,
    }
    with pytest.warns(UserWarning, match="native bf16"):
        assert optim_wrapper_for_device(amp, cuda=False, cpu_bf16=False) == {
            "type": "OptimWrapper",
            **rest,
        }
    fp16 = {**amp, "dtype": "float16"}
    with pytest.warns(UserWarning, match="training in fp32"):
        assert optim_wrapper_for_device(fp16, cuda=False, cpu_bf16=True)["type"] == "OptimWrapper"
    assert optim_wrapper_for_device(amp, cuda=True, cpu_bf16=True) == amp
    assert amp["type"] == "AmpOptimWrapper"  # not modified
