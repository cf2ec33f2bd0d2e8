"""fmoe's exports served by vLLM (its CPU build, in its own environment, with fmoe's plugin) equal fmoe +
transformers greedy generation token for token.

The engine tests need an environment with vLLM and the plugin: `.ci/run` makes one and sets FMOE_VLLM_PYTHON
(docs/serving.md shows how). Without it they skip; the plugin's reading of fmoe's layout is tested here either way.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

import fmoe
from fmoe import toy
from fmoe.evaluation.tasks import extract_answer, load_tasks, normalize
from fmoe.model import structure
from fmoe.model.checkpoint import SERVED_PREFIX
from fmoe.model.experts import width_buckets
from fmoe.serving import vllm as serving
from fmoe.toy.tiny import tiny_model
from tests.conftest import make_batches

PLUGIN_FILE = Path(__file__).resolve().parents[1] / "plugins" / "vllm" / "fmoe_vllm.py"
FAMILIES = ("olmoe", "qwen2_moe", "qwen3_moe", "mixtral", "deepseek_v2", "deepseek_v3")
# shapes vLLM's CPU attention runs (head size 32, 64, ...); DeepSeek's MLA as plain attention (VLLM_MLA_DISABLE)
_MLA = dict(kv_lora_rank=32, q_lora_rank=32, qk_rope_head_dim=32, qk_nope_head_dim=32, qk_head_dim=64, v_head_dim=64,
            head_dim=32)
SHAPES = {"deepseek_v2": _MLA, "deepseek_v3": {**_MLA, "topk_method": "noaux_tc"}}
# vLLM's DeepSeek path (MLA as plain attention) differs from transformers by ~1e-2 in log-probability on the
# unpruned model already (its MoE layers are vLLM's stock ones): these families are held to twice that control
CONTROLLED = ("deepseek_v2", "deepseek_v3")
TOY_EXPORTS = {  # name: (method, amount, options); "uniform" is a stock export (stock vLLM, no plugin)
    "ragged": ("dims", 0.5, {"scope": "layer"}),
    "uniform": ("dims", 0.5, {"scope": "expert"}),
    "expert_drop": ("expert_drop", 0.25, {"scope": "global"}),
    "layer_drop": ("layer_drop", None, {"count": 1}),
}
N_TOY_PROMPTS, TOY_TOKENS, FAMILY_TOKENS = 24, 32, 12
LOGPROB_TOL = 1e-3  # |vLLM - transformers| chosen-token log-probability, fp32
TIE_TOL = 1e-3  # a differing token is accepted only where transformers' top two are this close (a float tie)


def plugin():
    spec = importlib.util.spec_from_file_location("fmoe_vllm", PLUGIN_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # imports torch and the standard library only: vLLM is imported when used
    return module


# ---- the plugin reads fmoe's layout (no engine) ------------------------------------------------------------------

def test_plugin_reads_the_layout_fmoe_writes():
    p = plugin()
    assert (p.WIDTHS_FIELD, p.EXPERT_COUNTS_FIELD, p.DROPPED_MOE_FIELD, p.ARCH_PREFIX) == (
        structure.WIDTHS_FIELD, structure.EXPERT_COUNTS_FIELD, structure.DROPPED_MOE_FIELD, SERVED_PREFIX)
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        widths = torch.randint(1, 5, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g).mul(16).tolist()
        assert p.width_buckets(widths) == width_buckets(widths)


def test_plugin_refuses_what_it_cannot_serve():
    p = plugin()

    class Config:
        pass

    config = Config()
    config.fmoe_compressed = {"main": 1}
    with pytest.raises(NotImplementedError, match="fmoe_compressed.*compressed experts"):
        p.Structure(config)
    config = Config()
    config.fmoe_something_new = 1
    with pytest.raises(NotImplementedError, match="fmoe_something_new"):
        p.Structure(config)
    config = Config()
    config.fmoe_expert_widths = {"model.layers.0.mlp.experts": [32, 64]}
    config.fmoe_expert_counts = {"model.layers.0.mlp.experts": 3}
    with pytest.raises(ValueError, match="layer 0 lists 2 expert widths"):
        p.Structure(config)
    with pytest.raises(AttributeError, match="FmoeOlmoeForCausalLM"):
        getattr(p, "FmoeGptOssForCausalLM")


def test_exports_say_which_engine_serves_them(tmp_path):
    model = tiny_model("olmoe", tie_word_embeddings=True)
    fmoe.save_pretrained(model, tmp_path / "stock")
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["architectures"] == ["OlmoeForCausalLM"] and not serving.needs_plugin(tmp_path / "stock")
    calibration = fmoe.calibrate(model, make_batches(), "fisher", progress=False)
    fmoe.compress(model, "dims", 0.5, calibration, scope="layer", multiple_of=1)
    fmoe.save_pretrained(model, tmp_path / "ragged")
    config = json.loads((tmp_path / "ragged" / "config.json").read_text())
    assert config["architectures"] == ["FmoeOlmoeForCausalLM"] and serving.needs_plugin(tmp_path / "ragged")
    assert "plugins/vllm" in serving.serve_command(tmp_path / "ragged")
    # both names of the tied embeddings/head are in each file; fmoe still loads both layouts exactly
    for name in ("stock", "ragged"):
        from safetensors import safe_open

        with safe_open(tmp_path / name / "model.safetensors", "pt") as f:
            assert {"lm_head.weight", "model.embed_tokens.weight"} <= set(f.keys())
            assert torch.equal(f.get_tensor("lm_head.weight"), f.get_tensor("model.embed_tokens.weight"))
    ids = torch.randint(3, 128, (2, 9))
    reloaded = fmoe.from_pretrained(tmp_path / "ragged")
    torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert reloaded.lm_head.weight is reloaded.model.embed_tokens.weight


# ---- in the engine ------------------------------------------------------------------------------------------------

def greedy(model, prompt: list[int], max_tokens: int, ignore_eos: bool) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation of one prompt and the log-probabilities [steps, vocab] of each step."""
    out = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_tokens, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0,
                         **({"eos_token_id": None, "min_new_tokens": max_tokens} if ignore_eos else {}))
    tokens = out.sequences[0, len(prompt):].tolist()
    return tokens, torch.log_softmax(torch.stack(out.scores)[:, 0].double(), -1)


def toy_exports(root: Path) -> tuple[list[str], list[str]]:
    model, tokenizer, config = toy.load()
    files = toy.corpus_files(config)
    texts = [r["text"] for r in toy.read_jsonl(files["arithmetic"]["train"])][:64]
    calibration = fmoe.calibrate(model, toy.batches(tokenizer, texts, 16), "fisher", progress=False)
    for name, (method, amount, options) in TOY_EXPORTS.items():
        pruned = copy.deepcopy(model)
        fmoe.compress(pruned, method, amount, calibration, **options)
        fmoe.save_pretrained(pruned, root / f"toy_{name}", tokenizer=tokenizer)
    return load_tasks(files["arithmetic"]["test"], N_TOY_PROMPTS)


def family_export(family: str, root: Path) -> Path:
    """A 3-layer random `family` model with every structure at once: a removed MoE sublayer, expert counts that
    differ by layer (a global expert drop) and ragged widths of any size (a layer-scope dims plan, unrounded).
    CONTROLLED families also get their unpruned export, `<family>_dense`."""
    model = tiny_model(family, num_hidden_layers=3, hidden_size=128, tie_word_embeddings=False,
                       **SHAPES.get(family, {"head_dim": 32}))
    batches = make_batches(vocab=model.config.vocab_size)
    if family in CONTROLLED:
        fmoe.save_pretrained(model, root / f"{family}_dense")
        masked_pair(model, batches, root / f"{family}_dims", root / f"{family}_masked")
    for method, amount, options in (("layer_drop", None, {"count": 1}), ("expert_drop", 0.25, {"scope": "global"}),
                                    ("dims", 0.5, {"scope": "layer", "multiple_of": 1})):
        fmoe.compress(model, method, amount, fmoe.calibrate(model, batches, "fisher", progress=False), **options)
    fmoe.save_pretrained(model, root / family)
    return root / family


def masked_pair(model, batches, pruned_dir: Path, masked_dir: Path) -> None:
    """A removed MoE sublayer and ragged widths (no expert drop), and the same model with those dims and that
    sublayer zeroed at full width instead (uniform: vLLM's own MoE layers): equal models in exact arithmetic."""
    pruned, masked = copy.deepcopy(model), copy.deepcopy(model)
    drop = fmoe.compress(pruned, "layer_drop", None, fmoe.calibrate(pruned, batches, "fisher", progress=False), count=1)
    dims = fmoe.compress(pruned, "dims", 0.5, fmoe.calibrate(pruned, batches, "fisher", progress=False),
                         scope="layer", multiple_of=1)
    fmoe.save_pretrained(pruned, pruned_dir)
    with torch.no_grad():
        for name, keep in dims.keep.items():
            experts = masked.get_submodule(name)  # fused, gate rows then up rows: gate_up [E, 2I, H], down [E, H, I]
            width = experts.down_proj.shape[-1]
            for e, kept in enumerate(keep):
                gone = torch.ones(width, dtype=torch.bool)
                gone[kept] = False
                experts.gate_up_proj[e, :width][gone] = 0
                experts.gate_up_proj[e, width:][gone] = 0
                experts.down_proj[e][:, gone] = 0
        for i in drop.moe_layers:
            block = masked.model.layers[i].mlp
            block.experts.down_proj.zero_()
            block.shared_experts.down_proj.weight.zero_()
    fmoe.save_pretrained(masked, masked_dir)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Every export generated by one vLLM process (one engine per model) and by fmoe + transformers."""
    if serving.vllm_python() is None:
        pytest.skip(f"no vLLM environment (set {serving.PYTHON_ENV}; .ci/run makes one)")
    root = tmp_path_factory.mktemp("served")
    prompts, answers = toy_exports(root)
    tokenizer = AutoTokenizer.from_pretrained(root / "toy_ragged")
    toy_ids = [tokenizer(p)["input_ids"] for p in prompts]
    g = torch.Generator().manual_seed(0)
    family_ids = [torch.randint(3, 128, (n,), generator=g).tolist() for n in (5, 9, 14, 23)]
    jobs = {f"toy_{n}": dict(prompts=toy_ids, max_tokens=TOY_TOKENS, ignore_eos=False) for n in TOY_EXPORTS}
    jobs.update({f: dict(prompts=family_ids, max_tokens=FAMILY_TOKENS, ignore_eos=True)
                 for f in (*FAMILIES, *(f"{c}_{k}" for c in CONTROLLED for k in ("dense", "dims", "masked")))})
    no_tokenizer = {"engine": {"skip_tokenizer_init": True}}  # random models: token ids in and out
    for family in FAMILIES:
        family_export(family, root)
    unknown = root / "unknown_field"  # a structure the plugin does not know must fail at load, by name
    fmoe.save_pretrained(tiny_model("olmoe", hidden_size=128, head_dim=32), unknown)
    config = json.loads((unknown / "config.json").read_text())
    (unknown / "config.json").write_text(json.dumps({**config, "architectures": ["FmoeOlmoeForCausalLM"],
                                                     "fmoe_format": "fused", "fmoe_new_structure": [1]}))
    models = [{"path": str(root / n), **job, **({} if n.startswith("toy") else no_tokenizer)}
              for n, job in jobs.items()]
    models.append({"path": str(unknown), "prompts": family_ids[:1], "max_tokens": 1, **no_tokenizer})
    # vLLM 0.32's CPU MLA backend fails ("Unsupported block size: 16"): DeepSeek runs its MLA as plain attention
    results = {Path(r["path"]).name: r for r in serving.generate(models, engine={"enforce_eager": True},
                                                                  env={"VLLM_MLA_DISABLE": "1"})}
    stock = [{"path": str(root / "toy_ragged"), "prompts": toy_ids[:1], "max_tokens": 1},
             {"path": str(root / "toy_uniform"), "prompts": toy_ids, "max_tokens": TOY_TOKENS}]
    without_plugin = serving.generate(stock, engine={"enforce_eager": True}, env={"VLLM_PLUGINS": "none"})
    references = {}
    for name, job in jobs.items():
        model = fmoe.from_pretrained(root / name)
        references[name] = [greedy(model, p, job["max_tokens"], job["ignore_eos"]) for p in job["prompts"]]
    return {"results": results, "references": references, "answers": answers, "tokenizer": tokenizer,
            "without_plugin": without_plugin}


def logprob_error(result: dict, reference: list) -> float:
    """The largest |vLLM - transformers| chosen-token log-probability before the continuations part."""
    worst = 0.0
    for (tokens, logprobs), got, got_lp in zip(reference, result["tokens"], result["logprobs"], strict=True):
        for step, (want, have) in enumerate(zip(tokens, got)):
            if want != have:
                break
            worst = max(worst, abs(got_lp[step] - float(logprobs[step, want])))
    return worst


def assert_same_greedy(result: dict, reference: list, exact: bool, tol: float = LOGPROB_TOL) -> None:
    assert result["error"] is None, result["error"]
    for i, ((tokens, logprobs), got, got_lp) in enumerate(zip(reference, result["tokens"], result["logprobs"],
                                                              strict=True)):
        for step, (want, have) in enumerate(zip(tokens, got)):
            if want != have:
                gap = float(logprobs[step, want] - logprobs[step, have])
                assert not exact and gap < max(TIE_TOL, tol), (f"prompt {i} step {step}: vLLM {have}, "
                                                               f"transformers {want} (log-probability gap {gap:.2e})")
                break  # a float tie: the continuations part here
            assert abs(got_lp[step] - float(logprobs[step, want])) < tol, (i, step)
        else:
            assert got == tokens, f"prompt {i}: vLLM {got}, transformers {tokens}"


@pytest.mark.parametrize("name", [f"toy_{n}" for n in TOY_EXPORTS])
def test_toy_exports_serve_exactly(served, name):
    """The shipped toy pruned every way serves in vLLM with transformers' greedy tokens, exactly."""
    assert_same_greedy(served["results"][name], served["references"][name], exact=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_exports_serve(served, family):
    """Removed MoE sublayer + per-layer expert counts + ragged widths, for each family vLLM's CPU build runs."""
    tol = LOGPROB_TOL
    if family in CONTROLLED:  # the engine's own error on the unpruned model, twice
        control = served["results"][f"{family}_dense"]
        assert control["error"] is None, control["error"]
        tol = max(tol, 2 * logprob_error(control, served["references"][f"{family}_dense"]))
    assert_same_greedy(served["results"][family], served["references"][family], exact=False, tol=tol)


@pytest.mark.parametrize("family", CONTROLLED)
def test_pruned_equals_masked_in_the_engine(served, family):
    """Ragged widths and a removed MoE sublayer served by the plugin equal the same dims and sublayer zeroed at full
    width in vLLM's own MoE layers: the plugin's error alone, without the engine's DeepSeek-vs-transformers one."""
    pruned, masked = served["results"][f"{family}_dims"], served["results"][f"{family}_masked"]
    assert pruned["error"] is None and masked["error"] is None, (pruned["error"], masked["error"])
    assert pruned["tokens"] == masked["tokens"]
    for a, b in zip(pruned["logprobs"], masked["logprobs"], strict=True):
        assert max(abs(x - y) for x, y in zip(a, b, strict=True)) < 1e-4


def test_toy_accuracy_through_vllm_equals_fmoe(served):
    tokenizer, answers = served["tokenizer"], served["answers"]
    for name in (f"toy_{n}" for n in TOY_EXPORTS):
        def accuracy(continuations):
            texts = [tokenizer.decode(t, skip_special_tokens=True) for t in continuations]
            return sum(normalize(extract_answer(t)) == normalize(a) for t, a in zip(texts, answers)) / len(answers)

        assert accuracy(served["results"][name]["tokens"]) == accuracy([t for t, _ in served["references"][name]])


def test_what_vllm_cannot_express_fails_at_load_by_name(served):
    error = served["results"]["unknown_field"]["error"]
    assert error is not None and "fmoe_new_structure" in error
    ragged, uniform = served["without_plugin"]  # stock vLLM: a fused export is refused, a stock one serves
    assert ragged["error"] is not None and "FmoeOlmoeForCausalLM" in ragged["error"]
    assert_same_greedy(uniform, served["references"]["toy_uniform"], exact=True)


def test_fmoe_serve_says_what_is_missing(tmp_path, monkeypatch):
    from fmoe import cli

    with pytest.raises(SystemExit, match="no config.json"):
        cli.main(["serve", str(tmp_path)])
    fmoe.save_pretrained(tiny_model("olmoe"), tmp_path / "m")
    monkeypatch.delenv(serving.PYTHON_ENV, raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # no vllm on it
    with pytest.raises(SystemExit, match="vLLM not found"):
        cli.main(["serve", str(tmp_path / "m")])
    fake = tmp_path / "bin" / "python"  # an executable standing in for vLLM's Python: it writes what it was asked
    fake.parent.mkdir()
    fake.write_text(f"#!/bin/sh\necho \"$@\" > {fake.parent / 'args'}\n")
    fake.chmod(0o755)
    pid = os.fork()
    if pid == 0:  # os.execv replaces the process: run it in a child
        try:
            cli.main(["serve", str(tmp_path / "m"), "--python", str(fake), "--", "--port", "8001"])
        finally:
            os._exit(1)
    os.waitpid(pid, 0)
    assert (fake.parent / "args").read_text().split() == ["-m", serving.SERVER, "--model", str(tmp_path / "m"),
                                                          "--port", "8001"]
