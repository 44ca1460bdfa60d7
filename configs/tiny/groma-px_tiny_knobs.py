# The tiny GromaPX with every training knob set by config (tests/engine/test_knobs.py checks that
# each takes effect). Stage 3 style: perception frozen, LLM trained through LoRA adapters.
_base_ = ["./groma-px_tiny.py"]

model = dict(
    # Freezing per stage: sub-modules (dotted paths allowed) that do not train and stay in eval
    # mode; stage 2 adds "llm.model" (the base LLM, not the grounding-token rows).
    frozen=("backbone", "proposer"),
    llm=dict(
        # peft LoRA on the LLM: base weights frozen, adapters and grounding-token rows train
        lora=dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0),
        gradient_checkpointing=True,  # recompute LLM activations in backward (non-reentrant)
        attn_implementation="eager",  # "sdpa" | "eager" | "flash_attention_2" (CUDA only)
    ),
)

optim_wrapper = dict(
    # bf16 autocast on CUDA; region_proposer.runtime.optim_wrapper_for_device turns this into
    # the fp32 OptimWrapper where there is no CUDA (mmengine's AmpOptimWrapper refuses CPU).
    type="AmpOptimWrapper",
    dtype="bfloat16",
    optimizer=dict(type="AdamW", lr=1e-3, weight_decay=0.0),
    # gradient accumulation: one optimizer step per 2 iterations (losses scaled by 1/2)
    accumulative_counts=2,
    clip_grad=dict(max_norm=1.0, norm_type=2),
    # per-module learning-rate multipliers: a parameter takes the longest key its name contains
    paramwise_cfg=dict(
        custom_keys={
            "llm": dict(lr_mult=0.5),
            "region_encoder": dict(lr_mult=2.0),
            "feature_gain": dict(lr_mult=0.1, decay_mult=0.0),
        }
    ),
)
