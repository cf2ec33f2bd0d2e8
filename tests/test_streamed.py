"""Streamed calibration (one decoder layer resident at a time) against the in-memory pass: scores and statistics
equal on every family, chunks, files, resuming, two processes, memory, and bad input."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import fmoe
from fmoe.calibration import streamed as streamed_module
from fmoe.toy.tiny import FAMILIES, tiny_model
from tests.conftest import bytes_by_layer, make_batches, peak_in_child


def assert_close(a: dict, b: dict, rel: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max().clamp(min=1e-30)
        assert ((a[name] - b[name]).abs().max() / scale) <= rel, name


def assert_same_calibration(got: fmoe.Calibration, ref: fmoe.Calibration) -> None:
    assert_close(got.scores.tensors, ref.scores.tensors)
    assert (got.scores.samples, got.scores.tokens, got.scores.fingerprint) == \
        (ref.scores.samples, ref.scores.tokens, ref.scores.fingerprint)
    assert got.statistics.experts.keys() == ref.statistics.experts.keys()
    for criterion, tensors in ref.statistics.experts.items():
        assert_close(got.statistics.experts[criterion], tensors)
    torch.testing.assert_close(got.statistics.moe_similarity, ref.statistics.moe_similarity, equal_nan=True)
    torch.testing.assert_close(got.statistics.block_similarity, ref.statistics.block_similarity)
    assert got.statistics.meta["layers"] == ref.statistics.meta["layers"]


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_fisher_and_statistics_equal_the_in_memory_pass(tmp_path, family):
    """Every family, padded batches of uneven lengths, a sharded checkpoint: dim Fisher, expert Fisher, router,
    frequency, REAP, MoE and block similarities as `fmoe.calibrate` on the loaded model."""
    model = tiny_model(family, num_hidden_layers=3)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    batches = make_batches()
    assert_same_calibration(fmoe.calibrate(tmp_path, batches, "fisher"), fmoe.calibrate(model, batches, "fisher"))


@pytest.mark.parametrize("criterion", ["activation", "router", "compensated", "rank_mean(fisher, compensated)"])
def test_other_criteria_chunks_and_files(tmp_path, criterion):
    """Forward-only criteria, weight criteria read after the sweep, combinations; chunks of whole batches (3
    sequences per sweep, then 4: one and two batches) and boundaries in files."""
    model = tiny_model("deepseek_v3", first_k_dense_replace=1, num_hidden_layers=3)
    model.save_pretrained(tmp_path / "ckpt")
    batches = make_batches(n_batches=3)
    ref = fmoe.score(model, batches, criterion)
    for options in ({}, {"chunk": 4}, {"chunk": 3, "offload_dir": tmp_path / "sweep"}):
        got = fmoe.score(tmp_path / "ckpt", batches, criterion, **options)
        assert_close(got.tensors, ref.tensors)
        assert (got.samples, got.tokens) == (ref.samples, ref.tokens)
    assert not list((tmp_path / "sweep").iterdir())  # a finished sweep leaves no file behind
    # with the expert and layer statistics every boundary is kept during a sweep, and still freed after it
    calibration = fmoe.calibrate(tmp_path / "ckpt", batches, criterion, chunk=3, offload_dir=tmp_path / "sweep")
    assert_close(calibration.scores.tensors, ref.tensors)
    assert not list((tmp_path / "sweep").iterdir())


def test_a_bf16_checkpoint_equals_the_loaded_bf16_model(tmp_path):
    """Boundaries are kept in the model's dtype, exactly what the in-memory forward hands from layer to layer."""
    tiny_model("qwen3_moe", dtype=torch.bfloat16).save_pretrained(tmp_path)
    batches = make_batches()
    assert_same_calibration(fmoe.calibrate(tmp_path, batches, "fisher"),
                            fmoe.calibrate(fmoe.from_pretrained(tmp_path), batches, "fisher"))


def test_an_in_memory_model_streams_the_same_way():
    model = tiny_model("olmoe")
    batches = make_batches()
    assert_same_calibration(fmoe.calibrate(model, batches, "fisher", streamed=True),
                            fmoe.calibrate(model, batches, "fisher"))


class Interrupt(Exception):
    pass


@pytest.mark.parametrize("phase", ["forward", "backward", "second chunk"])
def test_an_interrupted_sweep_resumes_from_the_last_finished_layer(tmp_path, monkeypatch, phase):
    """Sweeps of 2 batches then 1 (chunk of 6 sequences), 4 layers: interrupted inside layer 2 of the first
    forward sweep (layers 0-1 done), inside layer 1 of the first backward sweep (layers 3-2 done), or inside layer
    2 of the second chunk's forward sweep, the next run starts there and gives the uninterrupted result."""
    model = tiny_model("qwen3_moe", num_hidden_layers=4)
    model.save_pretrained(tmp_path / "ckpt")
    batches = make_batches(n_batches=3)
    run_layer, calls, armed = streamed_module.Streamed.run_layer, [], [True]
    fail_at, done, skipped = {"forward": (5, (0, "forward", 2), 4), "backward": (13, (0, "backward", 1), 12),
                              "second chunk": (19, (1, "forward", 2), 18)}[phase]

    def counting(self, i, h, arguments):
        calls.append(i)
        if armed[0] and len(calls) == fail_at:
            armed[0] = False
            raise Interrupt
        return run_layer(self, i, h, arguments)

    monkeypatch.setattr(streamed_module.Streamed, "run_layer", counting)
    options = dict(chunk=6, offload_dir=tmp_path / "sweep")
    with pytest.raises(Interrupt):
        fmoe.calibrate(tmp_path / "ckpt", batches, "fisher", **options)
    progress = json.loads((tmp_path / "sweep" / "progress.json").read_text())
    assert (progress["chunk"], progress["phase"], progress["layer"]) == done
    calls.clear()
    got = fmoe.calibrate(tmp_path / "ckpt", batches, "fisher", **options)
    assert_same_calibration(got, fmoe.calibrate(model, batches, "fisher"))
    assert len(calls) == 2 * 4 * 3 - skipped  # the finished layers did not run again
    # another run's sweep in the same directory is refused, not mixed in
    calls.clear()
    armed[0] = True
    with pytest.raises(Interrupt):
        fmoe.calibrate(tmp_path / "ckpt", batches, "fisher", **options)
    with pytest.raises(ValueError, match="sweep of another run"):
        fmoe.calibrate(tmp_path / "ckpt", batches[:2], "fisher", **options)


def _rank(rank: int, world: int, src: str, out: str, port: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:  # uneven shares: rank 0 sweeps 2 chunks of one batch, rank 1 one chunk (and joins the other empty)
        calibration = fmoe.calibrate(src, make_batches(n_batches=3), "fisher", chunk=3,
                                     offload_dir=Path(out) / "sweep")
        if rank == 0:
            calibration.scores.save(Path(out) / "scores")
            calibration.statistics.save(Path(out) / "statistics")
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one(tmp_path):
    """Each rank streams every layer over its share of the batches (files in a folder per rank); the sums are
    reduced once."""
    model = tiny_model("mixtral")
    model.save_pretrained(tmp_path / "ckpt")
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    mp.spawn(_rank, args=(2, str(tmp_path / "ckpt"), str(tmp_path), port), nprocs=2, join=True)
    got = fmoe.Calibration(fmoe.Scores.load(tmp_path / "scores"), fmoe.Statistics.load(tmp_path / "statistics"))
    assert_same_calibration(got, fmoe.calibrate(model, make_batches(n_batches=3), "fisher"))
    assert not [p for p in (tmp_path / "sweep").rglob("*") if p.is_file()]


def test_bad_input_is_refused_before_the_sweep(tmp_path, monkeypatch):
    model = tiny_model("qwen2_moe")
    model.save_pretrained(tmp_path / "ckpt")
    batches = make_batches()
    with pytest.raises(ValueError, match="no calibration sample with a supervised token"):
        fmoe.score(tmp_path / "ckpt", [{**b, "labels": torch.full_like(b["input_ids"], -100)} for b in batches])
    monkeypatch.setattr(streamed_module.shutil, "disk_usage", lambda path: type("U", (), {"free": 1000})())
    with pytest.raises(OSError, match="offload_dir .* GiB free"):
        fmoe.score(tmp_path / "ckpt", batches, offload_dir=tmp_path / "sweep")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="grad_abs"):
        fmoe.score(tmp_path / "ckpt", batches, "grad_abs")
    with pytest.raises(ValueError, match="chunk"):
        fmoe.score(tmp_path / "ckpt", batches, chunk=0)
    # a checkpoint missing a layer's tensor
    from safetensors.torch import load_file, save_file

    state = load_file(tmp_path / "ckpt" / "model.safetensors")
    missing = next(k for k in state if ".layers.1." in k)
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text((tmp_path / "ckpt" / "config.json").read_text())
    save_file({k: v for k, v in state.items() if k != missing}, tmp_path / "broken" / "model.safetensors")
    with pytest.raises(ValueError, match="missing"):
        fmoe.score(tmp_path / "broken", batches)
    # FP8 weights (DeepSeek-V3's and Kimi-K2's releases) are refused with the way out
    save_file({k: v.to(torch.float8_e4m3fn) if k == missing else v for k, v in state.items()},
              tmp_path / "broken" / "model.safetensors")
    with pytest.raises(ValueError, match="quantized .* convert it first"):
        fmoe.score(tmp_path / "broken", batches)
    # a model without routed experts
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                 vocab_size=128)).save_pretrained(tmp_path / "dense")
    with pytest.raises(ValueError, match="experts"):
        fmoe.score(tmp_path / "dense", batches)


_PEAK = r"""
import json, sys
import fmoe
from tests.conftest import make_batches, resident_peak

batches = make_batches(n_batches=2, batch_size=2, seq_len=32, vocab=512)
fmoe.score(sys.argv[2], batches, "fisher")  # warm: lazy imports, allocator pools
print(json.dumps({"growth": resident_peak(lambda: fmoe.score(sys.argv[1], batches, "fisher"))}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_peak_memory_is_one_layer_and_the_boundaries(tmp_path):
    """Peak resident growth of streamed Fisher <= 1.5 x (largest decoder layer's bytes + boundary bytes), on a
    sharded checkpoint several times that bound (glibc's mmap threshold pinned: tests.conftest.peak_in_child)."""
    config = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=512, shared_expert_intermediate_size=256,
                  num_experts=16, num_hidden_layers=6, vocab_size=512)
    tiny_model("qwen2_moe", **config).save_pretrained(tmp_path / "ckpt", max_shard_size="30MB")
    tiny_model("qwen2_moe", **{**config, "num_hidden_layers": 1}).save_pretrained(tmp_path / "warm")
    groups = bytes_by_layer(tmp_path / "ckpt")
    boundaries = (6 + 1 + 2) * 2 * 2 * 32 * 256 * 4  # (layers + 1) + two gradient slots, 2 batches of [2, 32, 256]
    bound = 1.5 * (max(n for group, n in groups.items() if group) + boundaries)
    assert sum(groups.values()) > 3 * bound  # holding the model would break the bound
    growth = peak_in_child(_PEAK, tmp_path / "ckpt", tmp_path / "warm")
    assert growth <= bound, f"peak grew by {growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
