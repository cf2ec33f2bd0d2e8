"""Real MoE architectures as config fields (public configs), built with random weights by benchmarks/speed_memory.py
and written as random checkpoints by benchmarks/streamed.py.

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
    # Qwen/Qwen3-235B-A22B
    "qwen3-235b-a22b": dict(
        model_type="qwen3_moe", hidden_size=4096, num_hidden_layers=94, num_attention_heads=64,
        num_key_value_heads=4, head_dim=128, intermediate_size=12288, moe_intermediate_size=1536, num_experts=128,
        num_experts_per_tok=8, norm_topk_prob=True, vocab_size=151936, max_position_embeddings=40960,
        tie_word_embeddings=False,
    ),
    # deepseek-ai/DeepSeek-V3 (MLA attention; the first 3 layers dense; group-limited routing)
    "deepseek-v3": dict(
        model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=3,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256, n_shared_experts=1,
        num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
        num_attention_heads=128, num_key_value_heads=128, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, vocab_size=129280, max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    # moonshotai/Kimi-K2-Instruct (DeepSeek-V3's architecture: 384 routed experts, 64 heads, one dense layer)
    "kimi-k2": dict(
        model_type="deepseek_v3", hidden_size=7168, num_hidden_layers=61, first_k_dense_replace=1,
        intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=384, n_shared_experts=1,
        num_experts_per_tok=8, n_group=1, topk_group=1, routed_scaling_factor=2.827, norm_topk_prob=True,
        num_attention_heads=64, num_key_value_heads=64, q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64,
        qk_nope_head_dim=128, v_head_dim=128, vocab_size=163840, max_position_embeddings=4096,
        tie_word_embeddings=False,
    ),
    # mistralai/Mixtral-8x7B-v0.1
    "mixtral": dict(
        model_type="mixtral", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        head_dim=128, intermediate_size=14336, num_local_experts=8, num_experts_per_tok=2, vocab_size=32000,
        max_position_embeddings=32768, sliding_window=None, tie_word_embeddings=False,
    ),
}
