"""benchmarks/streamed.py's random-weight checkpoint writer: reduced shapes of its real architectures, written shard
by shard without a model, hold the keys, shapes and dtypes `save_pretrained` writes and load and run through
`fmoe.from_pretrained`; so does the small twin a measurement warms up on."""

import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig

import fmoe

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import streamed  # noqa: E402

REDUCED = {
    "qwen3_moe": dict(hidden_size=256, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=32, intermediate_size=512, moe_intermediate_size=128, num_experts=16,
                      num_experts_per_tok=4, norm_topk_prob=True, vocab_size=1024, tie_word_embeddings=False),
    "deepseek_v3": dict(hidden_size=256, num_hidden_layers=3, first_k_dense_replace=1, intermediate_size=512,
                        moe_intermediate_size=128, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                        n_group=4, topk_group=2, num_attention_heads=8, num_key_value_heads=8, q_lora_rank=64,
                        kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=32, v_head_dim=32,
                        vocab_size=1024, tie_word_embeddings=False),
}


def file_tensors(directory: Path) -> dict[str, tuple[list[int], torch.dtype]]:
    out = {}
    for path in directory.glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            for key in f.keys():
                t = f.get_slice(key)
                out[key] = (list(t.get_shape()), f.get_tensor(key).dtype)
    return out


@pytest.mark.parametrize("model_type", sorted(REDUCED))
def test_written_checkpoint_is_what_save_pretrained_writes_and_loads(tmp_path, model_type):
    config = AutoConfig.for_model(model_type, **REDUCED[model_type])
    info = streamed.write_checkpoint(config, tmp_path / "ckpt", torch.bfloat16, seed=0)
    written = file_tensors(tmp_path / "ckpt")
    layers = config.num_hidden_layers
    assert info["shards"] == layers + 2  # embeddings, one per layer, final norm + head

    model = fmoe.from_pretrained(tmp_path / "ckpt")
    assert next(model.parameters()).dtype == torch.bfloat16
    model.save_pretrained(tmp_path / "ref")  # what transformers writes for this very model
    assert written == file_tensors(tmp_path / "ref")
    index = json.loads((tmp_path / "ckpt" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == info["bytes"]

    experts = fmoe.find_experts(model)
    some = next(iter(experts.values()))
    assert 0.015 < float(some.down_proj.detach().float().std()) < 0.025  # random, std 0.02
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, config.vocab_size, (2, 16), generator=gen)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert torch.isfinite(logits).all()
    routed = []  # routing is non-trivial: different tokens pick different experts
    handle = model.model.layers[-1].mlp.gate.register_forward_hook(lambda m, a, out: routed.append(out))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    top = routed[0][1] if isinstance(routed[0], tuple) else routed[0]
    assert len(torch.unique(top)) > config.num_experts_per_tok

    warm = streamed.warm_config(config)  # the small twin a measurement warms up on
    streamed.write_checkpoint(warm, tmp_path / "warm", torch.bfloat16)
    small = fmoe.from_pretrained(tmp_path / "warm")
    assert len(small.model.layers) == 1 and small.config.vocab_size == 512
    assert next(iter(fmoe.find_experts(small).values())).down_proj.shape[0] == 16


def test_layer_flops_count_active_experts_only():
    config = AutoConfig.for_model("qwen3_moe", **REDUCED["qwen3_moe"])
    flops = streamed.layer_flops(config, context=0)
    h, i, e, k = 256, 128, 16, 4
    attention = h * 8 * 32 * 2 + h * 4 * 32 * 2  # q, o; k, v
    expected = 2 * (attention + 3 * h * i * k + h * e + 2 * 32 + 2 * h)  # + router, q/k norms, layer norms
    assert flops == [expected] * 2
