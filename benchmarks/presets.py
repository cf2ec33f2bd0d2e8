"""Real MoE architectures as config fields (public configs), built with random weights by benchmarks/speed_memory.py.

Only shapes matter for speed and memory: fields that do not change a shape or the work done (rope theta, token
ids, ...) are left at the family's defaults.
"""

PRESETS: dict[str, dict] = {
    # a small qwen3_moe shape whose compute is dominated by routed experts (--quick, smoke tests)
    "toy": dict(
        model_type="qwen3_moe", hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
        head_dim=32, intermediate_size=512, moe_intermediate_size=512, num_experts=16, num_experts_per_tok=4,
        vocab_size=2048, max_position_embeddings=4096,
    ),
    # Qwen/Qwen1.5-MoE-A2.7B
    "qwen1.5-moe-a2.7b": dict(
        model_type="qwen2_moe", hidden_size=2048, num_hidden_layers=24, num_attention_heads=16,
        num_key_value_heads=16, intermediate_size=5632, moe_intermediate_size=1408,
        shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4, norm_topk_prob=False,
        vocab_size=151936, max_position_embeddings=8192, tie_word_embeddings=False,
    ),
    # Qwen/Qwen3-30B-A3B
    "qwen3-30b-a3b": dict(
        model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral": dict(
        model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False,
    ),
}
