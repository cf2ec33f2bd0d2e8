import contextlib
import importlib.util
import io
import itertools
import json
import logging
import os
import sys
from pathlib import Path

import lightning.pytorch
import pytest
import torch

import fmoe
from fmoe.lightning.data import TextDataModule, _Sequences, load_texts, tokenize_to_sequences
from fmoe import toy

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def recipe():
    from fmoe.recipes import prune_recover

    return prune_recover


def test_recipe_default_end_to_end(tmp_path, recipe):
    export = tmp_path / "export"
    rows = recipe.main(["--export_dir", str(export), "--trainer.default_root_dir", str(tmp_path),
                        "--trainer.enable_progress_bar", "false", "--recover.max_steps", "40",
                        "--recover.val_check_interval", "20", "--task_limit", "40"])
    assert list(rows) == ["dense", "pruned", "recovered"]
    assert rows["dense"]["arithmetic_acc"] > 0.8 and {"facts_acc", "general_acc"} <= set(rows["pruned"])
    if importlib.util.find_spec("lm_eval"):  # the toy's default lm-eval task scores the same 40 records
        assert all(row["fmoe_arithmetic_exact_match"] == pytest.approx(row["arithmetic_acc"]) for row in rows.values())
    assert rows["pruned"]["weight_MB"] < 0.8 * rows["dense"]["weight_MB"]
    assert rows["recovered"]["domain_ppl"] < rows["pruned"]["domain_ppl"]  # recovery reduces held-out domain loss
    assert json.loads((export / "results.json").read_text()) == json.loads(json.dumps(rows))
    assert (tmp_path / "plan.json").is_file() and (tmp_path / "scores" / "scores.json").is_file()
    model = fmoe.from_pretrained(export)
    assert not any("lora" in n for n, _ in model.named_parameters())  # adapters merged
    widths = {n: fmoe.model.experts.expert_widths(m) for n, m in fmoe.find_experts(model).items()}
    plan = fmoe.PruningPlan.load(tmp_path / "plan.json")
    assert widths == plan.kept_widths()
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG  # next to plan.json
    logs = tmp_path / "logs"  # the default logger: a CSVLogger per stage under <default_root_dir>/logs
    assert (logs / "recover" / "metrics.csv").is_file() and (tmp_path / "config.yaml").is_file()


PNG = b"\x89PNG\r\n\x1a\n"


def test_recipe_lm_eval_tasks_in_every_row(tmp_path, recipe):
    pytest.importorskip("lm_eval")
    rows = recipe.main(["--export_dir", str(tmp_path / "e"), "--trainer.default_root_dir", str(tmp_path),
                        "--trainer.enable_progress_bar", "false", "--stages.recover", "false", "--tasks", "{}",
                        "--lm_eval.tasks", "[fmoe_facts]", "--lm_eval.limit", "10"])  # any toy task, by name
    assert list(rows) == ["dense", "pruned"]
    key = "fmoe_facts_exact_match"
    assert all(0.0 <= rows[stage][key] <= 1.0 for stage in rows)
    assert json.loads((tmp_path / "e" / "results.json").read_text()) == json.loads(json.dumps(rows))
    assert (tmp_path / "report.png").read_bytes()[:8] == PNG


def test_recipe_distills_from_cached_top_k_logits_into_tuned_experts(tmp_path, recipe):
    from safetensors import safe_open

    rows = recipe.main(["--export_dir", str(tmp_path / "e"), "--trainer.default_root_dir", str(tmp_path),
                        "--trainer.enable_progress_bar", "false", "--tasks", "{}", "--lm_eval.tasks", "[]",
                        "--recover.max_steps", "12",
                        "--recover.val_check_interval", "6", "--trainer.log_every_n_steps", "1",
                        "--recover.distill", "true", "--recover.teacher", "cached", "--recover.top_k", "8",
                        "--recover.tune_experts", "true", "--recover.r", "0", "--recover.lr", "1e-4"])
    assert rows["recovered"]["domain_ppl"] < rows["pruned"]["domain_ppl"]
    with safe_open(str(tmp_path / "teacher.safetensors"), framework="pt") as f:  # next to plan.json
        assert f.get_slice("values").get_shape()[1] == 8 and f.get_slice("ids").get_shape()[1] == 8
    import csv

    log = tmp_path / "logs" / "recover" / "metrics.csv"
    logged = [row for row in csv.DictReader(log.open()) if row.get("train_kd")]
    # every one of the 12 steps ran, although max_epochs is now the epochs they take (3), not -1
    assert [int(row["step"]) for row in logged] == list(range(12))
    with pytest.raises(ValueError, match="live or cached"):
        recipe.main(["--export_dir", str(tmp_path / "x"), "--recover.teacher", "disk"])


def test_recovery_epochs_cover_the_steps():
    from types import SimpleNamespace

    from fmoe.lightning.recovery import epochs_for

    def epochs(steps, world=1, accumulate=1, limit=1.0):
        fit = SimpleNamespace(world_size=world, accumulate_grad_batches=accumulate, limit_train_batches=limit)
        return epochs_for(steps, 64, 8, fit)

    assert [epochs(20), epochs(16), epochs(20, world=2), epochs(20, accumulate=3)] == [3, 2, 5, 7]
    assert [epochs(20, limit=0.5), epochs(20, limit=2), epochs(1)] == [5, 10, 1]


def test_write_report_without_a_plan(tmp_path):
    from fmoe.evaluation.report import write_report

    rows = {"dense": {"params": 10, "domain_ppl": 3.0, "arithmetic_acc": 0.9}, "pruned": {"params": 5}}
    assert write_report(rows, None, tmp_path / "r" / "report.png").read_bytes()[:8] == PNG
    assert [p.name for p in (tmp_path / "r").iterdir()] == ["report.png"]


@pytest.fixture(scope="module")
def help_text():
    """`fmoe prune-recover --help`, run once."""
    from fmoe import cli

    out = io.StringIO()
    with pytest.raises(SystemExit) as stop, contextlib.redirect_stdout(out):
        cli.main(["prune-recover", "--help"])
    assert stop.value.code in (0, None)
    return out.getvalue()


def described(text: str) -> dict[str, str]:
    """{option: its description} of every option a --help lists: the text before jsonargparse's "(type: ...)"."""
    options, lines = {}, text.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("  --"):
            invocation, _, first = line.strip().partition("  ")  # the invocation holds single spaces only
            more = itertools.takewhile(lambda follow: follow.startswith(" " * 8), lines[i + 1:])
            words = " ".join([first, *more]).split()
            options[invocation.split()[0].rstrip(",")] = " ".join(words).split("(type:")[0].split("(required")[0]
    return options


FMOE_GROUPS = ("--model.", "--data.", "--stages.", "--prune.", "--recover.", "--lm_eval.")
FMOE_TOP_LEVEL = ("--export_dir", "--tasks", "--task_limit", "--verbose")


def test_prune_recover_help_explains_every_option(help_text):
    from fmoe.calibration.criteria import PASS_CRITERIA

    assert help_text.startswith("usage: fmoe prune-recover")
    assert "Calibrate -> prune -> recover" in help_text  # the recipe's own description
    options = described(help_text)
    ours = [o for o in options if o.startswith(FMOE_GROUPS) or o in FMOE_TOP_LEVEL]
    assert len(ours) > 50 and {"--model.criterion", "--prune.amount", "--data.train"} <= set(ours)
    assert not [o for o in ours if not options[o].strip()], "options without a description"
    assert "--prune.method {" + ",".join(fmoe.methods.METHODS) + "}" in help_text  # the compression methods
    criterion = options["--model.criterion"]  # what it accepts
    assert all(c in criterion for c in PASS_CRITERIA) and "rank_mean(" in criterion
    assert "(required" not in help_text  # the recipe's defaults stand for TextDataModule's required tokenizer, train
    assert "--optimizer" not in help_text and "--lr_scheduler" not in help_text


def test_the_command_refuses_what_it_does_not_use_and_takes_earlier_option_names(recipe, capsys):
    import yaml

    for args, refusal in ((["--optimizer", "torch.optim.SGD"], "unrecognized arguments: --optimizer"),
                          (["--lr_scheduler", "torch.optim.lr_scheduler.StepLR"], "unrecognized arguments"),
                          (["--prune.method", "nosuch"], "'dims', 'expert_drop'")):
        with pytest.raises(SystemExit) as stop:
            recipe.main(args)
        assert stop.value.code == 2 and refusal in capsys.readouterr().err
    with pytest.warns(FutureWarning) as caught, pytest.raises(SystemExit):
        recipe.main(["--model.method", "magnitude", "--prune.ratio=0.3", "--print_config"])
    assert [str(w.message) for w in caught if w.category is FutureWarning] == [
        "--model.method is deprecated: use --model.criterion", "--prune.ratio is deprecated: use --prune.amount"]
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["criterion"] == "magnitude" and printed["prune"]["amount"] == 0.3


def test_recipe_prune_only(tmp_path, recipe, caplog, recwarn):
    caplog.set_level(logging.INFO)
    rows = recipe.main(["--export_dir", str(tmp_path / "e"), "--trainer.default_root_dir", str(tmp_path),
                        "--trainer.enable_progress_bar", "false", "--stages.recover", "false",
                        "--prune.scope", "expert", "--tasks", "{}", "--lm_eval.tasks", "[]",
                        "--trainer.logger", "false"])
    assert not (tmp_path / "logs").exists()  # --trainer.logger false turns the default CSV logs off
    assert "litlogger" not in caplog.text and "IntermediatePruning" in caplog.text  # the tip goes, fmoe's lines stay
    assert not any("in eval mode" in str(w.message) for w in recwarn)
    assert list(rows) == ["dense", "pruned"] and not any(k.endswith("_acc") for k in rows["dense"])
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "e")  # uniform: stock transformers loads it
    assert stock.config.intermediate_size == 64  # half of the toy model's 128


def test_recipe_under_fsdp2_on_two_processes(tmp_path):
    """`fmoe prune-recover` with every stage under ModelParallelStrategy (a fresh strategy per stage), recovery by
    distillation from the dense model sharded like the student, and lm-eval scores (rank 0) in every row."""
    import subprocess

    export = tmp_path / "export"
    import shutil
    import sysconfig

    # the console script (DDP/FSDP2 relaunch it as is); `python -m fmoe` where it is not installed
    script = shutil.which("fmoe", path=os.pathsep.join([sysconfig.get_path("scripts"), os.environ.get("PATH", "")]))
    command = [script] if script else [sys.executable, "-m", "fmoe"]
    scores = []
    try:
        import lm_eval  # noqa: F401 (the eval extra)

        from fmoe.toy import toy_tasks_dir

        scores = ["--lm_eval.tasks", "[fmoe_arithmetic]", "--lm_eval.include_path", str(toy_tasks_dir()),
                   "--lm_eval.limit", "5"]
    except ImportError:
        pass
    subprocess.run([*command, "prune-recover", "--export_dir", str(export),
                    "--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                    "--trainer.accelerator", "cpu", "--trainer.devices", "2",
                    "--trainer.strategy", "lightning.pytorch.strategies.ModelParallelStrategy",
                    "--trainer.strategy.data_parallel_size", "2", "--trainer.strategy.tensor_parallel_size", "1",
                    "--recover.max_steps", "6", "--recover.val_check_interval", "3", "--task_limit", "20",
                    "--data.n_samples", "16", "--recover.distill", "true", "--recover.kd_weight", "0.5",
                    *scores], check=True, timeout=600, cwd=tmp_path)
    rows = json.loads((export / "results.json").read_text())
    assert list(rows) == ["dense", "pruned", "recovered"]
    assert rows["recovered"]["domain_ppl"] < rows["pruned"]["domain_ppl"]  # distilled from the sharded dense model
    if scores:  # computed by rank 0 while rank 1 waits, in every row
        assert all(0.0 <= rows[stage]["fmoe_arithmetic_exact_match"] <= 1.0 for stage in rows)
    model = fmoe.from_pretrained(export)
    widths = {n: fmoe.model.experts.expert_widths(m) for n, m in fmoe.find_experts(model).items()}
    assert widths == fmoe.PruningPlan.load(tmp_path / "plan.json").kept_widths()


def test_fmoe_command_and_recipe_scripts(capsys):
    import subprocess

    from fmoe import cli

    cli.main([])
    assert "prune-recover" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown command 'prune'; valid: prune-recover, train-toy"):
        cli.main(["prune"])
    with pytest.raises(SystemExit) as stop:
        cli.main(["train-toy", "--print_config"])
    assert stop.value.code in (0, None) and "toy:" in capsys.readouterr().out
    for script in ("prune_recover.py", "train_toy_moe.py"):  # the thin scripts in recipes/ reach the same CLIs
        out = subprocess.run([sys.executable, str(ROOT / "recipes" / script), "--print_config"], check=True,
                             capture_output=True, text=True, timeout=120).stdout
        assert ("recover:" in out) if script == "prune_recover.py" else ("toy:" in out)


def test_data_module_reproducible_and_clear_errors(tmp_path):
    files = toy.corpus_files()
    train, test = str(files["arithmetic"]["train"]), str(files["arithmetic"]["test"])
    dm = TextDataModule(str(toy.TOY_DIR), train, test, seq_len=32, n_samples=16)
    dm.setup()
    again = TextDataModule(str(toy.TOY_DIR), train, seq_len=32, n_samples=16)
    again.setup()
    assert torch.equal(dm.train_set.rows, again.train_set.rows) and dm.train_set.rows.shape == (16, 32)
    assert dm.eval_names == ["domain"]
    (tmp_path / "empty.jsonl").write_text(json.dumps({"text": ""}) + "\n")
    with pytest.raises(ValueError, match="no non-empty"):
        load_texts(str(tmp_path / "empty.jsonl"))
    with pytest.raises(KeyError, match="no field 'body'"):
        load_texts(train, text_field="body")
    with pytest.raises(FileNotFoundError):
        load_texts(str(tmp_path / "missing.jsonl"))
    with pytest.raises(ValueError, match="too short"):
        tokenize_to_sequences(["one two"], dm.tokenizer, seq_len=64)
    for name, text in (("none.jsonl", ""), ("blank.jsonl", "\n\n"), ("none.txt", "")):
        (tmp_path / name).write_text(text)
        with pytest.raises(ValueError, match="holds no|no non-empty"):
            load_texts(str(tmp_path / name))
    few = tmp_path / "few.jsonl"
    few.write_text("".join(json.dumps({"text": f"record {i}"}) + "\n" for i in range(3)))
    with pytest.warns(UserWarning, match="n_samples=64 sequences asked, but .* gives 3"):
        TextDataModule(str(toy.TOY_DIR), str(few), seq_len=8, n_samples=64, pack=False).setup()
    (tmp_path / "qa.jsonl").write_text(json.dumps({"q": "2 + 2", "a": "4"}) + "\n")
    assert load_texts(str(tmp_path / "qa.jsonl"), template="{q} = {a}") == ["2 + 2 = 4"]


def test_data_splits_evenly_over_processes():
    """No sequence is repeated to even out ranks (Lightning's DistributedSampler would count it twice)."""
    from types import SimpleNamespace

    files = toy.corpus_files()
    train, test = str(files["arithmetic"]["train"]), str(files["arithmetic"]["test"])
    dm = TextDataModule(str(toy.TOY_DIR), train, test, seq_len=80, pack=False, n_samples=16, max_eval_samples=10)
    dm.setup()
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 3}))
    with pytest.warns(UserWarning, match="using the first 15"):
        loader = dm.train_dataloader()
    assert len(loader.dataset) == 15 and torch.equal(loader.dataset[14]["input_ids"], dm.train_set[14]["input_ids"])
    with pytest.warns(UserWarning, match="using the first 9"):
        assert [len(v.dataset) for v in dm.val_dataloader()] == [9]
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 2}))
    assert dm.train_dataloader().dataset is dm.train_set
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(distributed_sampler_kwargs={"num_replicas": 32}))
    with pytest.raises(ValueError, match="fewer than the 32 processes"):
        dm.train_dataloader()


def test_unpacked_documents_are_padded_and_masked_out_of_the_loss():
    model, tokenizer, _ = toy.load()
    texts = ["Q: where did Bo go ?\nA: #### the park", "Q: what is the job of Kasa ?\nA: #### doctor"]
    rows, lengths = tokenize_to_sequences(texts, tokenizer, seq_len=32, pack=False)
    assert rows.shape == (2, 32) and int(lengths.max()) < 32
    item, n = _Sequences(rows, lengths)[0], int(lengths[0])
    assert int(item["attention_mask"].sum()) == n and rows[0, n - 1] == tokenizer.eos_token_id
    assert (item["labels"][n:] == -100).all() and torch.equal(item["labels"][:n], rows[0, :n])
    alone = model(input_ids=rows[:1, :n], labels=rows[:1, :n]).loss  # the document by itself
    padded = model(input_ids=rows[:1], attention_mask=item["attention_mask"][None], labels=item["labels"][None]).loss
    assert torch.allclose(alone, padded, atol=1e-5)


@pytest.mark.parametrize("config", sorted((ROOT / "recipes" / "configs").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_config_parses(recipe, config, capsys):
    with pytest.raises(SystemExit) as stop:
        recipe.main(["--config", str(config), "--print_config"])
    assert stop.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "stages:" in printed and ("pack: true" in printed) == (config.stem != "default")


OVERLAYS = sorted((ROOT / "recipes" / "configs").glob("*/*.yaml"))  # methods/ and recovery/


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_every_overlay_config_layers_on_a_model_config(recipe, overlay, capsys):
    import yaml

    with pytest.raises(SystemExit) as stop:
        recipe.main(["--config", str(ROOT / "recipes" / "configs" / "mixtral-8x7b.yaml"), "--config", str(overlay),
                     "--print_config"])
    assert stop.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    for section, wanted in yaml.safe_load(overlay.read_text()).items():
        assert {k: printed[section][k] for k in wanted} == wanted
    assert printed["model"]["model"] == "mistralai/Mixtral-8x7B-v0.1"  # the model config's choices stay


STAGES_SEEN = []


class Recorder(lightning.pytorch.Callback):
    """Records, for every Trainer a recipe stage runs, the options a user passed with --trainer.*."""

    def __init__(self, tag: str = ""):
        self.tag = tag

    def setup(self, trainer, pl_module, stage):
        from lightning.pytorch.callbacks import Timer
        from lightning.pytorch.loggers import CSVLogger

        STAGES_SEEN.append({"fn": stage, "module": type(pl_module).__name__, "tag": self.tag,
                            "accumulate": trainer.accumulate_grad_batches, "clip": trainer.gradient_clip_val,
                            "timer": any(isinstance(c, Timer) for c in trainer.callbacks),
                            "csv": isinstance(trainer.logger, CSVLogger), "recorder": id(self)})


def test_recipe_honours_every_trainer_option(tmp_path, recipe):
    STAGES_SEEN.clear()
    rows = recipe.main(["--export_dir", str(tmp_path / "e"), "--trainer.default_root_dir", str(tmp_path),
                        "--trainer.enable_progress_bar", "false", "--tasks", "{}", "--lm_eval.tasks", "[]",
                        "--data.n_samples", "16",
                        "--recover.max_steps", "4", "--recover.val_check_interval", "2",
                        "--trainer.accumulate_grad_batches", "2", "--trainer.gradient_clip_val", "0.5",
                        "--trainer.max_time", "00:01:00:00",
                        "--trainer.logger", "lightning.pytorch.loggers.CSVLogger",
                        "--trainer.logger.save_dir", str(tmp_path / "logs"),
                        "--trainer.callbacks+=tests.test_recipe.Recorder", "--trainer.callbacks.tag", "mine"])
    assert list(rows) == ["dense", "pruned", "recovered"]
    modules = [s["module"] for s in STAGES_SEEN]
    assert modules == ["Evaluation", "CalibrationModule", "Evaluation", "LoRARecovery", "Evaluation"]
    assert all(s["tag"] == "mine" and s["timer"] and s["csv"] for s in STAGES_SEEN)
    assert len({s["recorder"] for s in STAGES_SEEN}) == len(STAGES_SEEN)  # a fresh callback for every Trainer
    recover = STAGES_SEEN[3]
    assert recover["accumulate"] == 2 and recover["clip"] == 0.5  # training options reach the training stage
    calibrate = STAGES_SEEN[1]  # a calibration steps no weights: no accumulation or clipping there
    assert calibrate["accumulate"] == 1 and calibrate["clip"] is None
    assert (tmp_path / "logs").is_dir()


def test_recipe_checks_every_option_before_any_stage(tmp_path, recipe, monkeypatch):
    def no_stage(*args, **kwargs):
        raise AssertionError("a stage ran before the options were checked")

    monkeypatch.setattr(recipe, "evaluate", no_stage)
    monkeypatch.setattr(recipe.TextDataModule, "setup", no_stage)
    earlier = {tmp_path / "plan.json": "{}", tmp_path / "export" / "config.json": "{}",
               tmp_path / "export" / "results.json": "{}"}  # a finished run's files
    for path, text in earlier.items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
    common = ["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false"]
    for bad, match in ((["--prune.amount", "1.5"], "amount"), (["--prune.amount", "-0.1"], "amount"),
                       (["--prune.method", "reap", "--prune.scope", "expert"], "valid: layer, global"),
                       (["--prune.scope", "model"], "valid: expert, layer, global"),
                       (["--export_dir", str(tmp_path)], "would replace the run directory"),
                       (["--export_dir", str(tmp_path.parent)], "would replace the run directory"),
                       (["--model.criterion", "magnitude", "--trainer.strategy",
                         "lightning.pytorch.strategies.ModelParallelStrategy",
                         "--trainer.strategy.data_parallel_size", "1"], "only rank 0 holds")):
        with pytest.raises(ValueError, match=match):
            recipe.main([*common, *bad])
    if importlib.util.find_spec("lm_eval"):
        with pytest.raises(ValueError, match=r"unknown lm-eval task\(s\) \['nosuch'\]"):
            recipe.main([*common, "--lm_eval.tasks", "[fmoe_facts, nosuch]"])
    assert all(path.read_text() == text for path, text in earlier.items())  # a refused run removes nothing


def test_one_run_directory_per_run_whose_files_agree(tmp_path, recipe, monkeypatch):
    quick = ["--trainer.enable_progress_bar", "false", "--stages.evaluate", "false", "--data.n_samples", "16",
             "--tasks", "{}", "--lm_eval.tasks", "[]", "--stages.recover", "false"]
    for root, amount in ((tmp_path / "a", "0.25"), (tmp_path / "b", "0.5")):  # no --export_dir: under the root
        recipe.main([*quick, "--trainer.default_root_dir", str(root), "--prune.amount", amount])
    for root, amount in ((tmp_path / "a", 0.25), (tmp_path / "b", 0.5)):
        plan = fmoe.PruningPlan.load(root / "plan.json")
        assert plan.meta["ratio"] == amount and (root / "scores").is_dir() and (root / "report.png").is_file()
        model = fmoe.from_pretrained(root / "export")
        assert {n: fmoe.model.experts.expert_widths(m) for n, m in fmoe.find_experts(model).items()} == plan.kept_widths()
        assert json.loads((root / "run.json").read_text())["status"] == "complete"

    class Interrupted(recipe.LoRARecovery):  # the run stops during recovery
        def training_step(self, batch, batch_idx):
            raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "LoRARecovery", Interrupted)
    root = tmp_path / "a"  # again into a finished run's directory, with another amount
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        recipe.main([*quick, "--trainer.default_root_dir", str(root), "--prune.amount", "0.5",
                     "--stages.recover", "true"])
    assert json.loads((root / "run.json").read_text())["status"] == "running"
    assert fmoe.PruningPlan.load(root / "plan.json").meta["ratio"] == 0.5
    assert not (root / "export").exists()  # the 0.25 export is gone, not left beside the 0.5 plan
    keep = tmp_path / "mine"  # an --export_dir that holds no export of a run is left until the export replaces it
    (keep / "notes.txt").parent.mkdir()
    (keep / "notes.txt").write_text("mine")
    with pytest.raises((KeyboardInterrupt, SystemExit)):
        recipe.main([*quick, "--trainer.default_root_dir", str(root), "--export_dir", str(keep),
                     "--stages.recover", "true"])
    assert (keep / "notes.txt").read_text() == "mine"


def test_compressed_experts_run_saves_its_plan(tmp_path, recipe):
    recipe.main(["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                 "--stages.evaluate", "false", "--stages.recover", "false", "--tasks", "{}", "--lm_eval.tasks", "[]",
                 "--prune.method", "compressed_experts"])
    plan = fmoe.load_plan(tmp_path / "plan.json")
    assert plan.main == 1 and fmoe.from_pretrained(tmp_path / "export").config.fmoe_compressed == {"main": 1}


def test_recipe_takes_a_combined_criterion_and_refuses_a_bad_one_first(tmp_path, recipe, monkeypatch):
    base = ["--export_dir", str(tmp_path / "e"), "--trainer.default_root_dir", str(tmp_path),
            "--trainer.enable_progress_bar", "false", "--stages.recover", "false", "--stages.evaluate", "false",
            "--data.n_samples", "16", "--tasks", "{}", "--lm_eval.tasks", "[]"]
    rows = recipe.main([*base, "--model.criterion", "rank_mean(compensated, router)"])
    assert list(rows) == ["dense", "pruned"]
    assert fmoe.Scores.load(tmp_path / "scores").criterion == "rank_mean(compensated,router)"

    def evaluated(*args, **kwargs):
        raise AssertionError("the dense model was evaluated before the criterion was checked")

    monkeypatch.setattr(recipe, "evaluate", evaluated)
    monkeypatch.setattr(recipe, "sizes", evaluated)
    for bad in ("nosuch", "rank_mean(compensated, router"):
        with pytest.raises(ValueError, match="valid: fisher"):
            recipe.main([*base, "--stages.evaluate", "true", "--model.criterion", bad])
