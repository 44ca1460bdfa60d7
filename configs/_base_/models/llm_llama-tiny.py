# Tiny randomly initialised Llama for the CPU synthetic pipeline: 4 layers, 256 wide.
# vocab_size defaults to the tokenizer's base vocabulary (GromaPX derives it); a real model
# plugs in with llm = dict(type="GroundedCausalLM", pretrained="/path/to/llama-dir").
llm = dict(
    type="GroundedCausalLM",
    config=dict(
        model_type="llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    ),
    attn_implementation="sdpa",
    tie_new_embeddings=True,  # <ri> is scored against its own prompt embedding (pointer-like)
    # Training runs the decoder on two groups of rows of similar length, each cut to its
    # longest: stage-3 step 0.619 s against 0.714 s padded, losses equal
    # (benchmarks/results/bench_train_steps_length_groups.json).
    length_groups=2,
)
