"""`fmoe prune-checkpoint SRC --calibration DATA ...`: a checkpoint to a pruned checkpoint that never holds the
model, equal to the in-memory pipeline, resumable, within its memory bound."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fmoe
import fmoe.cli
from fmoe import toy
from fmoe.calibration import streamed as streamed_module
from fmoe.lightning.data import TextDataModule
from fmoe.methods import offline
from fmoe.toy.tiny import tiny_model
from tests.conftest import bytes_by_layer, peak_in_child

TOY_ARGS = ["--pack", "false", "--seq_len", "80", "--samples", "16", "--batch_size", "8"]


def toy_data() -> str:
    return str(toy.corpus_files()["arithmetic"]["train"])


def toy_batches() -> list[dict]:
    data = TextDataModule(str(toy.TOY_DIR), toy_data(), seq_len=80, n_samples=16, batch_size=8, pack=False)
    data.setup("fit")
    return list(data.train_dataloader())


def tensors(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(directory.glob("*.safetensors")):
        out.update(load_file(path))
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("method, amount, extra, criterion", [
    ("fisher", "0.5", [], "fisher"),  # dims scored by Fisher, layer scope
    ("reap", "0.25", ["--scope", "global"], "activation"),  # whole experts, a forward-only pass
    ("block_drop", None, ["--count", "1"], "activation"),
])
def test_the_toy_pruned_out_of_core_equals_the_in_memory_pipeline(tmp_path, capsys, method, amount, extra, criterion):
    args = ["--method", method, *(["--amount", amount] if amount else []), *extra]
    fmoe.cli.main(["prune-checkpoint", str(toy.TOY_DIR), "--calibration", toy_data(), *TOY_ARGS, *args,
                   "--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert f"calibrating ({criterion}, streamed) on 16 sequences" in printed and "wrote" in printed
    assert not (tmp_path / "out.work").exists()  # the work directory goes once the output is written
    model, _, _ = toy.load()
    name = "dims" if method == "fisher" else method
    options = {"scope": "global"} if method == "reap" else {"count": 1} if method == "block_drop" else {}
    calibration = fmoe.calibrate(model, toy_batches(), criterion)
    fmoe.compress(model, name, float(amount) if amount else None, calibration, **options)
    fmoe.save_pretrained(model, tmp_path / "ref")
    assert_same(tensors(tmp_path / "out"), tensors(tmp_path / "ref"))
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == \
        json.loads((tmp_path / "ref" / "config.json").read_text())
    assert (tmp_path / "out" / "tokenizer.json").is_file()


def test_a_stopped_run_continues_where_it_stopped(tmp_path, monkeypatch, capsys):
    """Stopped mid-sweep, it resumes at the last finished layer; stopped while writing, it reuses the saved
    calibration; either way the output equals an uninterrupted run's."""
    args = ["prune-checkpoint", str(toy.TOY_DIR), "--calibration", toy_data(), *TOY_ARGS, "--method", "fisher",
            "--amount", "0.5", "--out", str(tmp_path / "out")]
    run_layer, calls, armed = streamed_module.Streamed.run_layer, [], [True]

    def failing(self, i, h, arguments):
        calls.append(i)
        if armed[0] and len(calls) == 5:  # forward sweep, layer 2 of the toy's 4, batch 1 of 2
            armed[0] = False
            raise KeyboardInterrupt
        return run_layer(self, i, h, arguments)

    monkeypatch.setattr(streamed_module.Streamed, "run_layer", failing)
    with pytest.raises(KeyboardInterrupt):
        fmoe.cli.main(args)
    assert json.loads((tmp_path / "out.work" / "sweep" / "progress.json").read_text())["layer"] == 2
    calls.clear()
    prune, stopped = offline.prune_checkpoint, []

    def failing_write(*a, **k):
        if not stopped:
            stopped.append(True)
            raise KeyboardInterrupt
        return prune(*a, **k)

    monkeypatch.setattr(offline, "prune_checkpoint", failing_write)
    with pytest.raises(KeyboardInterrupt):
        fmoe.cli.main(args)
    assert len(calls) == 2 * 2 + 4 * 2  # forward layers 2-3 and the backward sweep, 2 batches: not from layer 0
    assert not (tmp_path / "out").exists() and (tmp_path / "out.work" / "calibration" / "complete").is_file()
    capsys.readouterr()
    calls.clear()
    fmoe.cli.main(args)
    assert "calibration: reusing" in capsys.readouterr().out and not calls
    fmoe.cli.main([*args[:-1], str(tmp_path / "fresh")])
    assert_same(tensors(tmp_path / "out"), tensors(tmp_path / "fresh"))
    # stopped, then started with other arguments: the old run's work is discarded, not mixed in
    armed[0], calls[:] = True, []
    with pytest.raises(KeyboardInterrupt):
        fmoe.cli.main(args)
    capsys.readouterr()
    fmoe.cli.main([*args[:-2], "--seed", "1", "--out", str(tmp_path / "out")])
    assert "discarding" in capsys.readouterr().out


def test_bad_arguments_fail_before_calibrating(tmp_path):
    src = str(toy.TOY_DIR)
    with pytest.raises(ValueError, match="either --plan"):
        fmoe.cli.main(["prune-checkpoint", src, "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="unknown compression method 'nope'; valid: dims"):
        fmoe.cli.main(["prune-checkpoint", src, "--calibration", toy_data(), "--method", "nope", "--amount", "0.5",
                       "--out", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="amount is the share removed"):
        fmoe.cli.main(["prune-checkpoint", src, "--calibration", toy_data(), "--amount", "1.5",
                       "--out", str(tmp_path / "o")])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        fmoe.cli.main(["prune-checkpoint", src, "--calibration", str(tmp_path / "none.jsonl"), "--amount", "0.5",
                       "--out", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()


_PEAK = r"""
import json, sys
import fmoe.cli
from tests.conftest import resident_peak

src, warm, data, out = sys.argv[1:5]
common = ["--calibration", data, "--seq_len", "64", "--samples", "4", "--batch_size", "2", "--method", "fisher",
          "--amount", "0.5", "--max_shard_size", "30MB"]
fmoe.cli.main(["prune-checkpoint", warm, *common, "--out", out + "-warm"])  # lazy imports, allocator pools
print(json.dumps({"growth": resident_peak(lambda: fmoe.cli.main(["prune-checkpoint", src, *common, "--out", out]))}))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc peak-RSS reset")
def test_a_multi_shard_checkpoint_within_the_memory_bound(tmp_path):
    """The whole command (data, streamed Fisher, plan, out-of-core prune) on a random 6-layer checkpoint in 30 MB
    shards: peak resident growth <= 1.5 x (largest decoder layer's bytes + boundary bytes); output == in memory."""
    tokenizer = toy.load()[1]
    config = dict(hidden_size=256, intermediate_size=256, moe_intermediate_size=512, num_experts=16,
                  shared_expert_intermediate_size=256, num_hidden_layers=6, vocab_size=len(tokenizer))
    for name, layers in (("ckpt", 6), ("warm", 1)):
        tiny_model("qwen2_moe", **{**config, "num_hidden_layers": layers}).save_pretrained(tmp_path / name,
                                                                                           max_shard_size="30MB")
        tokenizer.save_pretrained(tmp_path / name)
    assert len(list((tmp_path / "ckpt").glob("*.safetensors"))) > 3
    groups = bytes_by_layer(tmp_path / "ckpt")
    boundaries = (6 + 1 + 2) * 4 * 64 * 256 * 4  # (layers + 1) + two gradient slots x [4 sequences, 64, 256] fp32
    bound = 1.5 * (max(n for group, n in groups.items() if group) + boundaries)
    assert sum(groups.values()) > 3 * bound  # holding the model would break the bound
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in toy.interleaved(toy.corpus_files(), "train", 40)))
    growth = peak_in_child(_PEAK, tmp_path / "ckpt", tmp_path / "warm", data, tmp_path / "out")
    assert growth <= bound, f"peak grew by {growth / 2**20:.1f} MiB, bound {bound / 2**20:.1f} MiB"
    assert len(list((tmp_path / "out").glob("*.safetensors"))) > 1
    model = fmoe.from_pretrained(tmp_path / "ckpt")
    loaded = fmoe.from_pretrained(tmp_path / "out")
    plan = fmoe.PruningPlan.load(tmp_path / "out.plan.json")
    ids = torch.randint(3, len(tokenizer), (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, fmoe.prune(model, plan)(input_ids=ids).logits)
    shutil.rmtree(tmp_path / "ckpt")
