"""What a recipe run leaves in its directory besides the model: one CSV log per stage and its resolved config."""

import csv
import importlib.util
import json

import pytest
import yaml

STEPS = 20  # recovery steps: several logged rows (see log_interval)
LM_EVAL = ["--lm_eval.tasks", "[fmoe_facts]", "--lm_eval.limit", "5"] if importlib.util.find_spec("lm_eval") else []
ARGS = ["--trainer.enable_progress_bar", "false", "--data.n_samples", "16", "--task_limit", "5",
        "--recover.max_steps", str(STEPS), "--recover.val_check_interval", "10", "--prune.amount", "0.25",
        *(LM_EVAL or ["--lm_eval.tasks", "[]"])]


@pytest.fixture(scope="module")
def recipe():
    from fmoe.recipes import prune_recover

    return prune_recover


@pytest.fixture(scope="module")
def run(tmp_path_factory, recipe):
    """A run directory and the rows its run returned."""
    root = tmp_path_factory.mktemp("run")
    return root, recipe.main([*ARGS, "--trainer.default_root_dir", str(root)])


def metrics(run_dir, stage) -> list[dict]:
    """The rows of a stage's metrics.csv, empty cells left out."""
    with (run_dir / "logs" / stage / "metrics.csv").open() as f:
        return [{k: v for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def test_each_stage_logs_under_its_name(run):
    root, rows = run
    logs = root / "logs"
    assert sorted(p.name for p in logs.iterdir()) == ["calibrate", "evaluate_dense", "evaluate_pruned",
                                                      "evaluate_recovered", "recover"]
    assert not list(logs.rglob("version_*")) and all((p / "metrics.csv").is_file() for p in logs.iterdir())


def test_calibration_logs_every_step(run):
    root, _ = run
    logged = metrics(root, "calibrate")
    steps = 16 // 8  # n_samples / batch_size
    assert [int(row["step"]) for row in logged] == list(range(steps))
    assert all({"calibration_loss", "samples", "tokens", "seconds"} <= set(row) for row in logged)
    assert [float(row["samples"]) for row in logged] == [8.0 * (i + 1) for i in range(steps)]


def test_recovery_logs_its_curve_and_validations(run, recipe):
    root, _ = run
    logged = metrics(root, "recover")
    train = [row for row in logged if "train_loss" in row]
    assert len(train) == STEPS // recipe.log_interval(STEPS) > 1
    assert all("train_nll" in row for row in train)
    validations = [row for row in logged if "domain_ppl" in row]
    assert len(validations) == 2 and all({"general_ppl", "arithmetic_acc"} <= set(row) for row in validations)


def test_each_evaluation_logs_its_whole_row(run):
    root, rows = run
    assert json.loads((root / "run.json").read_text())["rows"] == json.loads(json.dumps(rows))
    for stage, row in rows.items():
        (logged,) = metrics(root, f"evaluate_{stage}")
        assert {"params", "active", "weight_MB", "domain_ppl", "facts_acc"} <= set(row)
        if LM_EVAL:  # rank 0's lm-eval scores too
            assert "fmoe_facts_exact_match" in row
        assert {k: float(v) for k, v in logged.items() if k != "step"} == pytest.approx(row)


def test_config_yaml_reproduces_the_options(run, recipe, capsys):
    root, _ = run
    saved = yaml.safe_load((root / "config.yaml").read_text())

    def printed(args):
        with pytest.raises(SystemExit) as stop:
            recipe.main([*args, "--print_config"])
        assert stop.value.code in (0, None)
        return yaml.safe_load(capsys.readouterr().out)

    assert printed(["--config", str(root / "config.yaml")]) == saved
    given = printed([*ARGS, "--trainer.default_root_dir", str(root)])
    assert isinstance(saved["seed_everything"], int)  # the seed the run drew, where the options said `true`
    assert {**given, "seed_everything": saved["seed_everything"]} == saved
    assert saved["prune"]["amount"] == 0.25 and saved["recover"]["max_steps"] == STEPS


def test_a_new_run_replaces_the_logs_of_the_last(tmp_path, recipe):
    stale = tmp_path / "logs" / "recover" / "version_0" / "metrics.csv"
    stale.parent.mkdir(parents=True)
    stale.write_text("step\n0\n")
    recipe.main(["--trainer.default_root_dir", str(tmp_path), "--trainer.enable_progress_bar", "false",
                 "--data.n_samples", "16", "--stages.evaluate", "false", "--stages.recover", "false",
                 "--stages.export", "false", "--tasks", "{}", "--lm_eval.tasks", "[]"])
    assert [p.name for p in (tmp_path / "logs").iterdir()] == ["calibrate"]
    assert (tmp_path / "config.yaml").is_file()
