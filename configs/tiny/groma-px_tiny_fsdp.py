# The tiny GromaPX trained with FSDP through mmengine's FlexibleRunner (full state dicts, so its
# checkpoints load like DDP ones). Launch with torchrun and --launcher pytorch
# (docs/distributed.md). On CPU the FSDP wrapper gets device_id="cpu" at launch
# (region_proposer.runtime.configure_for_device).
_base_ = ["./groma-px_tiny.py"]

runner_type = "FlexibleRunner"
strategy = dict(
    # mmengine's FSDPStrategy with its resume fixed for torch >= 2.1
    type="region_proposer.CompatFSDPStrategy",
    # use_orig_params: frozen (backbone, proposer) and trained parameters share flat parameters
    model_wrapper=dict(use_orig_params=True),
    state_dict_cfg="full",
)
