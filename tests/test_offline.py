"""Out-of-core pruning, editing and scoring (fmoe.methods.offline): checkpoint in, checkpoint out, equal to the
in-memory edit + save_pretrained."""

import json
import os
import textwrap

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import fmoe
import fmoe.cli
import fmoe.methods.offline
from fmoe.methods import registry
from fmoe.model.experts import slice_expert, width_buckets
from fmoe.model.structure import apply_widths
from fmoe.toy.tiny import tiny_config, tiny_model
from tests.conftest import bytes_by_layer, make_batches, peak_in_child

SHARD = "20KB"  # the tiny models (~400 KB) save as a dozen shards


def tensors(directory) -> dict[str, torch.Tensor]:
    """The union of the tensors of every safetensors file in `directory` (names must not repeat)."""
    out = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), "pt") as f:
                for key in f.keys():
                    assert key not in out, f"{key} written twice"
                    out[key] = f.get_tensor(key)
    return out


def assert_same(expected: dict, got: dict) -> None:
    assert sorted(expected) == sorted(got)
    for k in expected:
        assert expected[k].dtype == got[k].dtype and torch.equal(expected[k], got[k]), k


def source(tmp_path, family, **overrides):
    """A sharded checkpoint as transformers writes it (per-expert tensors for most families)."""
    tiny_model(family, **overrides).save_pretrained(tmp_path / "src", max_shard_size=SHARD)
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    return tmp_path / "src"


def plan_for(src, scope):
    scores = fmoe.score_checkpoint(src, criterion="magnitude")
    return fmoe.make_plan(scores, 0.5, scope, multiple_of=16 if scope == "expert" else 1)


def bucket_state(src, plan) -> dict[str, torch.Tensor]:
    """What a pruned model stores, with ragged experts as width buckets (the spec, built from the loaded model)."""
    original, pruned = fmoe.from_pretrained(src), fmoe.prune(fmoe.from_pretrained(src), plan)
    ragged = [n for n, m in fmoe.find_experts(pruned).items() if isinstance(m, fmoe.RaggedExperts)]
    state = {k: v for k, v in pruned.state_dict().items() if not any(k.startswith(f"{n}.") for n in ragged)}
    modules = fmoe.find_experts(original)
    for n in ragged:
        for b, (_, experts) in enumerate(width_buckets([len(k) for k in plan.keep[n]])):
            cuts = [slice_expert(modules[n], e, plan.keep[n][e]) for e in experts]
            state.update({f"{n}.buckets.{b}.{p}": torch.stack([c[p] for c in cuts]) for p in cuts[0]})
    return state


CASES = [(f, s) for f in ("qwen2_moe", "mixtral", "deepseek_v3", "gpt_oss", "olmoe") for s in ("expert", "layer")]


@pytest.mark.parametrize("family,scope", CASES)
def test_output_equals_prune_then_save_pretrained(tmp_path, family, scope):
    src = source(tmp_path, family)
    plan = plan_for(src, scope)
    fmoe.prune_checkpoint(src, plan, tmp_path / "out", max_shard_size=SHARD)
    model = fmoe.prune(fmoe.from_pretrained(src), plan)
    fmoe.save_pretrained(model, tmp_path / "ref")
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # sharded output
    assert_same(tensors(tmp_path / "ref"), tensors(tmp_path / "out"))
    for name in ("config.json", "generation_config.json"):
        ref = tmp_path / "ref" / name
        assert (tmp_path / "out" / name).is_file() == ref.is_file()
        if ref.is_file():
            assert json.loads((tmp_path / "out" / name).read_text()) == json.loads(ref.read_text())
    ids = torch.randint(3, 128, (2, 9))
    expected = model(input_ids=ids).logits
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    if config["fmoe_format"] == "stock":  # uniform, and the family's width field describes it
        assert plan.is_uniform()
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    else:
        loaded = fmoe.from_pretrained(tmp_path / "out")
    torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gpt_oss", "mixtral"])  # fused transposed interleaved + biases; per-expert w1/w3
def test_ragged_output_stores_width_buckets(tmp_path, family):
    src = source(tmp_path, family)
    plan = plan_for(src, "layer")
    assert not plan.is_uniform()
    fmoe.prune_checkpoint(src, plan, tmp_path / "out")
    assert_same(bucket_state(src, plan), tensors(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["fmoe_format"] == "fused" and config["fmoe_expert_widths"] == plan.kept_widths()


def test_ragged_output_loads_with_fmoe(tmp_path):
    src = source(tmp_path, "qwen2_moe")
    plan = plan_for(src, "layer")
    fmoe.prune_checkpoint(src, plan, tmp_path / "out", max_shard_size="1GB")  # one file
    model = fmoe.prune(fmoe.from_pretrained(src), plan)
    ids = torch.randint(3, 128, (2, 9))
    assert torch.equal(fmoe.from_pretrained(tmp_path / "out")(input_ids=ids).logits, model(input_ids=ids).logits)


@pytest.mark.parametrize("family", fmoe.toy.tiny.FAMILIES)
def test_data_free_scores_equal_those_of_the_loaded_model(tmp_path, family):
    src = source(tmp_path, family)
    model = fmoe.from_pretrained(src)
    for criterion, seed in (("magnitude", 0), ("random", 3)):
        expected = fmoe.score(model, criterion=criterion, seed=seed)
        got = fmoe.score_checkpoint(src, criterion, seed=seed)
        assert got.fingerprint == expected.fingerprint == fmoe.fingerprint(model)
        assert_same(expected.tensors, got.tensors)
        assert got.meta == expected.meta


def test_sources_in_the_models_own_layout_tied_and_bf16(tmp_path):
    """fmoe's fused format as a source (model state-dict names), tied embeddings, bf16: the same output."""
    fmoe.save_pretrained(tiny_model("deepseek_v2", tie_word_embeddings=True), tmp_path / "fused")  # unpruned
    tiny_model("qwen3_moe", tie_word_embeddings=True).to(torch.bfloat16).save_pretrained(tmp_path / "stock",
                                                                                          max_shard_size=SHARD)
    for src in (tmp_path / "fused", tmp_path / "stock"):
        plan = plan_for(src, "expert")
        fmoe.prune_checkpoint(src, plan, tmp_path / "out")
        fmoe.save_pretrained(fmoe.prune(fmoe.from_pretrained(src), plan), tmp_path / "ref")
        assert_same(tensors(tmp_path / "ref"), tensors(tmp_path / "out"))
    assert tensors(tmp_path / "out")["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_cli_prune_checkpoint(tmp_path, capsys):
    src = source(tmp_path, "olmoe")
    plan = plan_for(src, "expert")
    plan.save(tmp_path / "plan.json")
    fmoe.cli.main(["prune-checkpoint", str(src), "--plan", str(tmp_path / "plan.json"), "--out", str(tmp_path / "a"),
                   "--max_shard_size", SHARD])
    assert "wrote" in capsys.readouterr().out
    fmoe.prune_checkpoint(src, plan, tmp_path / "b", max_shard_size=SHARD)
    assert_same(tensors(tmp_path / "b"), tensors(tmp_path / "a"))
    assert "prune-checkpoint" in fmoe.cli.usage()


def children(path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def test_bad_input_is_a_clear_error_and_writes_nothing(tmp_path):
    src = source(tmp_path, "mixtral")
    plan = plan_for(src, "expert")
    other = tmp_path / "other"
    tiny_model("mixtral", seed=1).save_pretrained(other)
    wider = tmp_path / "wider"
    tiny_model("mixtral", intermediate_size=48).save_pretrained(wider)
    before = children(tmp_path)
    with pytest.raises(ValueError, match="scores of another model"):
        fmoe.prune_checkpoint(other, plan, tmp_path / "out")
    with pytest.raises(ValueError, match="plan does not fit this model"):
        fmoe.prune_checkpoint(wider, plan, tmp_path / "out")
    with pytest.raises(ValueError, match="must lie outside"):
        fmoe.prune_checkpoint(src, plan, src / "pruned")
    with pytest.raises(ValueError, match="score_checkpoint computes the data-free criteria"):
        fmoe.score_checkpoint(src, "fisher")
    assert children(tmp_path) == before and not (src / "pruned").exists()
    (src / "model.safetensors.index.json").rename(tmp_path / "index.json")
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        fmoe.prune_checkpoint(src, plan, tmp_path / "out")
    index = json.loads((tmp_path / "index.json").read_text())
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    first = sorted(set(index["weight_map"].values()))[0]
    (src / first).rename(tmp_path / first)
    with pytest.raises(FileNotFoundError, match=f"lists shards that are missing.*{first}"):
        fmoe.prune_checkpoint(src, plan, tmp_path / "out")
    (tmp_path / first).rename(src / first)
    assert not (tmp_path / "out").exists()


def test_a_failure_while_writing_keeps_the_previous_output(tmp_path, monkeypatch):
    src = source(tmp_path, "qwen2_moe")
    plan = plan_for(src, "expert")
    fmoe.prune_checkpoint(src, plan, tmp_path / "out")
    before = tensors(tmp_path / "out")
    calls = []

    def failing(self, key):
        calls.append(key)
        if len(calls) > 5:
            raise OSError("disk full")
        return safe_open(str(self.directory / self.file_of[key]), "pt").get_tensor(key)

    monkeypatch.setattr(fmoe.model.view.Source, "tensor", failing)
    with pytest.raises(OSError, match="disk full"):
        fmoe.prune_checkpoint(src, fmoe.make_plan(fmoe.score_checkpoint(src), 0.75, "expert"), tmp_path / "out")
    assert_same(before, tensors(tmp_path / "out"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]  # no temporary directory left


_PEAK = textwrap.dedent("""
    import json, sys
    import fmoe
    from tests.conftest import resident_peak
    src, plan, dst = sys.argv[1:]
    plan = fmoe.PruningPlan.load(plan)
    fmoe.prune_checkpoint(src, plan, dst + ".warm")  # imports, code pages, lazy state: fixed costs, not data
    print(json.dumps({"growth": resident_peak(lambda: fmoe.prune_checkpoint(src, plan, dst))}))
""")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_is_one_tensor(tmp_path):
    """Peak resident growth while pruning <= largest tensor + 4 MiB (two meta models, the
    key tables, interpreter objects), on a checkpoint several times that bound: the model is never held (glibc's
    mmap threshold pinned: tests.conftest.peak_in_child)."""
    model = tiny_model("qwen2_moe", hidden_size=256, intermediate_size=256, moe_intermediate_size=512,
                       shared_expert_intermediate_size=256, num_experts=8, num_hidden_layers=4, vocab_size=512)
    model.save_pretrained(tmp_path / "src", max_shard_size="4MB")
    plan = fmoe.make_plan(fmoe.score_checkpoint(tmp_path / "src"), 0.5, "expert")
    plan.save(tmp_path / "plan.json")
    shards = [p.stat().st_size for p in (tmp_path / "src").glob("*.safetensors")]
    largest_tensor = max(t.numel() * t.element_size() for t in tensors(tmp_path / "src").values())
    bound = largest_tensor + 4 * 2**20  # no source page is mapped: shards do not count
    assert sum(shards) > 3 * bound  # holding the checkpoint would break the bound
    growth = peak_in_child(_PEAK, tmp_path / "src", tmp_path / "plan.json", tmp_path / "out", timeout=120)
    assert growth <= bound, f"peak grew by {growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
    fmoe.save_pretrained(fmoe.prune(fmoe.from_pretrained(tmp_path / "src"), plan), tmp_path / "ref")
    assert_same(tensors(tmp_path / "ref"), tensors(tmp_path / "out"))


# ------------------------------------------------------------------------------------- edit_checkpoint (any plan)

EDITS = [  # (family, method, amount, options)
    ("qwen2_moe", "expert_drop", 0.25, {}),
    ("qwen2_moe", "block_drop", None, {"count": 1}),
    ("deepseek_v3", "reap", 0.25, {"scope": "global"}),
    ("deepseek_v3", "layer_drop", None, {"count": 1}),
    ("mixtral", "reap", None, {"count": 1}),
    ("mixtral", "layer_drop", None, {"count": 1}),
    ("gpt_oss", "expert_drop", None, {"count": 1, "scope": "global"}),  # uneven expert counts: fmoe's format
    ("gpt_oss", "block_drop", None, {"count": 1, "mode": "consecutive"}),
    ("olmoe", "compressed_experts", 0.5, {}),  # new parameters, made layer by layer
]


def planned(model, name, amount, **options):
    return registry.make(model, name, amount, fmoe.calibrate(model, make_batches(), progress=False), **options)


def assert_edit_matches(src, plan, out, ref, **kwargs):
    """edit_checkpoint's output == apply_plan + save_pretrained's: tensors bit for bit, configs, same logits."""
    fmoe.edit_checkpoint(src, plan, out, **kwargs)
    model = fmoe.apply_plan(fmoe.from_pretrained(src), plan)
    fmoe.save_pretrained(model, ref)
    assert_same(tensors(ref), tensors(out))
    for name in ("config.json", "generation_config.json"):
        assert (out / name).is_file() == (ref / name).is_file()
        if (ref / name).is_file():
            assert json.loads((out / name).read_text()) == json.loads((ref / name).read_text())
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(fmoe.from_pretrained(out)(input_ids=ids).logits, model(input_ids=ids).logits,
                                   rtol=1e-5, atol=1e-6)
    return json.loads((out / "config.json").read_text())


@pytest.mark.parametrize("family,name,amount,options", EDITS)
def test_edit_output_equals_apply_plan_then_save_pretrained(tmp_path, family, name, amount, options):
    model = tiny_model(family)
    model.save_pretrained(tmp_path / "src", max_shard_size=SHARD)  # sharded, per-expert for most families
    plan = planned(model, name, amount, **options)
    config = assert_edit_matches(tmp_path / "src", plan, tmp_path / "out", tmp_path / "ref", max_shard_size=SHARD)
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()  # sharded output
    if name == "block_drop":
        assert config["num_hidden_layers"] == model.config.num_hidden_layers - 1
    if options.get("scope") == "global" and family == "gpt_oss":
        assert config["fmoe_format"] == "fused" and len(set(config["fmoe_expert_counts"].values())) > 1


def test_edit_of_fmoe_checkpoints_tied_bf16_mixed_dtypes_and_dims_plans(tmp_path):
    """Sources in fmoe's fused format (ragged widths), tied bf16 embeddings, bf16 + float32 tensors; a dims plan
    goes to prune_checkpoint."""
    src = source(tmp_path, "qwen2_moe")
    dims = plan_for(src, "layer")
    assert not dims.is_uniform()
    fmoe.edit_checkpoint(src, dims, tmp_path / "ragged")
    fmoe.prune_checkpoint(src, dims, tmp_path / "pruned")
    assert_same(tensors(tmp_path / "pruned"), tensors(tmp_path / "ragged"))
    ragged = fmoe.from_pretrained(tmp_path / "ragged")  # ragged experts: no dim scores, a made-up similarity
    n = ragged.config.num_hidden_layers
    plan = fmoe.plan_block_drop(ragged, torch.rand(n + 1, n + 1, generator=torch.Generator().manual_seed(0)), 1)
    assert_edit_matches(tmp_path / "ragged", plan, tmp_path / "out", tmp_path / "ref")
    model = tiny_model("qwen3_moe", tie_word_embeddings=True)
    plan = planned(model, "expert_drop", 0.25)
    model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size=SHARD)
    assert_edit_matches(tmp_path / "bf16", plan, tmp_path / "out2", tmp_path / "ref2")
    assert tensors(tmp_path / "out2")["lm_head.weight"].dtype == torch.bfloat16
    model = tiny_model("deepseek_v3")  # bf16 with float32 routing-score corrections: two item sizes per layer
    plan = planned(model, "reap", 0.25)
    model.to(torch.bfloat16)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            buffer.data = buffer.data.float()
    model.save_pretrained(tmp_path / "mixed", max_shard_size=SHARD)
    assert_edit_matches(tmp_path / "mixed", plan, tmp_path / "out3", tmp_path / "ref3", max_shard_size=SHARD)
    assert {t.dtype for t in tensors(tmp_path / "out3").values()} == {torch.bfloat16, torch.float32}


def test_cli_applies_any_plan(tmp_path, capsys):
    model = tiny_model("olmoe")
    model.save_pretrained(tmp_path / "src")
    calibration = fmoe.calibrate(model, make_batches(), progress=False)
    for i, (name, options) in enumerate([("reap", {}), ("layer_drop", {"count": 1})]):
        plan = registry.make(model, name, 0.25 if name == "reap" else None, calibration, **options)
        plan.save(tmp_path / "plan.json")
        fmoe.cli.main(["prune-checkpoint", str(tmp_path / "src"), "--plan", str(tmp_path / "plan.json"),
                       "--out", str(tmp_path / f"a{i}")])
        assert "wrote" in capsys.readouterr().out
        fmoe.edit_checkpoint(tmp_path / "src", plan, tmp_path / f"b{i}")
        assert_same(tensors(tmp_path / f"b{i}"), tensors(tmp_path / f"a{i}"))


def test_edit_bad_input_is_a_clear_error_and_writes_nothing(tmp_path):
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "src")
    plan = planned(model, "expert_drop", 0.25)
    drop = planned(model, "block_drop", None, count=1)
    tiny_model("mixtral", seed=1).save_pretrained(tmp_path / "other")
    state = tensors(tmp_path / "src")
    state.pop("model.layers.1.post_attention_layernorm.weight")
    (tmp_path / "broken").mkdir()
    save_file(state, tmp_path / "broken" / "model.safetensors", metadata={"format": "pt"})
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "src" / "config.json").read_text())
    before = children(tmp_path)
    for p in (plan, drop):
        with pytest.raises(ValueError, match="was made for another model"):
            fmoe.edit_checkpoint(tmp_path / "other", p, tmp_path / "out")
        with pytest.raises(ValueError, match="must lie outside"):
            fmoe.edit_checkpoint(tmp_path / "src", p, tmp_path / "src" / "edited")
        with pytest.raises(ValueError, match=r"does not match its config.json: missing \['model.layers.1.post_"):
            fmoe.edit_checkpoint(tmp_path / "broken", p, tmp_path / "out")
    with pytest.raises(TypeError, match="not an fmoe plan"):
        fmoe.edit_checkpoint(tmp_path / "src", {"keep": {}}, tmp_path / "out")
    assert children(tmp_path) == before and children(tmp_path / "src") == children(tmp_path / "other")


class _Mix:
    """A plan whose edit reads another layer's tensors: layer 1's attention output takes layer 0's values."""


def _mix(model, plan):
    layers = model.model.layers
    layers[1].self_attn.o_proj.weight.data = layers[1].self_attn.o_proj.weight + layers[0].self_attn.o_proj.weight
    return model


def test_an_edit_reading_other_layers_is_refused_and_keeps_the_output(tmp_path, monkeypatch):
    tiny_model("mixtral").save_pretrained(tmp_path / "src")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "kept.txt").write_text("previous output")
    monkeypatch.setitem(registry.METHODS, "mix", registry.Method(None, _mix, _Mix, "", "test"))
    with pytest.raises(RuntimeError, match="with only decoder layer model.layers.0 resident, its edit fails .*: it "
                                           "reads tensors of other layers and cannot be applied out of core"):
        fmoe.edit_checkpoint(tmp_path / "src", _Mix(), tmp_path / "out")
    assert children(tmp_path) == ["out", "src"] and children(tmp_path / "out") == ["kept.txt"]


_EDIT_PEAK = _PEAK.replace("fmoe.PruningPlan.load(plan)", "fmoe.load_plan(plan)").replace("prune_checkpoint",
                                                                                            "edit_checkpoint")


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_edit_peak_memory_is_two_layers(tmp_path):
    """Peak resident growth while editing <= 2 x the largest group of source tensors (a decoder layer, or the
    rest) + 4 MiB, on a checkpoint several times that bound (glibc's mmap threshold pinned: see above)."""
    model = tiny_model("qwen2_moe", hidden_size=256, intermediate_size=256, moe_intermediate_size=512,
                       shared_expert_intermediate_size=256, num_experts=8, num_hidden_layers=8, vocab_size=512)
    model.save_pretrained(tmp_path / "src", max_shard_size="4MB")
    scores = {n: torch.rand(8, generator=torch.Generator().manual_seed(i))
              for i, n in enumerate(fmoe.find_experts(model))}
    plan = fmoe.plan_experts(model, scores, 0.25)
    plan.save(tmp_path / "plan.json")
    groups = bytes_by_layer(tmp_path / "src")
    bound = 2 * max(groups.values()) + 4 * 2**20
    assert sum(groups.values()) > 3 * bound  # holding the checkpoint would break the bound
    growth = peak_in_child(_EDIT_PEAK, tmp_path / "src", tmp_path / "plan.json", tmp_path / "out", timeout=120)
    assert growth <= bound, f"peak grew by {growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
    fmoe.save_pretrained(fmoe.apply_plan(fmoe.from_pretrained(tmp_path / "src"), plan), tmp_path / "ref")
    assert_same(tensors(tmp_path / "ref"), tensors(tmp_path / "out"))
