"""The recipe's console: stage headers, progress bars, results and the final table, and nothing else unless --verbose;
the filters of fmoe.console drop exactly the messages they name."""

import logging
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from fmoe import console

ROOT = Path(__file__).resolve().parents[1]
STAGES = "load|evaluate|distill|calibrate|prune|recover|export"
ALLOWED = [re.compile(p) for p in (
    r"",
    r"Seed set to \d+",
    rf"\[({STAGES})\] (?!done in ).+",  # a stage's header
    rf"\[({STAGES})\] done in \d+\.\d s: .+",  # its result
    r"(IntermediatePruning|Compression) \(\w+\): parameters [\d,]+ -> [\d,]+, weights .+",  # the prune result
    r"(Loading weights|Running \w+ requests): +\d+%\|.*\| *\d+/\d+ \[.*\]",  # tqdm bars
    r"Generating \w+ split: \d+ examples \[.*\]",  # datasets, building an lm-eval task's splits once
    r"Epoch \d+/\d+ +[━╸╺ ]*\d+/\d+ .*",  # Lightning's (rich) bar, its metrics wrapped on the lines below it
    r" {20,}[\w.: ]+",
    r"stage +params +active +weight_MB( +\w+)*",  # the table
    r"(dense|pruned|recovered) +\d+ +\d+( +([\d.]+|-))+",
)]
QUICK = ["--recover.max_steps", "4", "--recover.val_check_interval", "4", "--data.n_samples", "16",
         "--data.max_eval_samples", "16", "--task_limit", "5"]


def prune_recover(tmp_path: Path, *args: str) -> list[str]:
    """The lines `fmoe prune-recover ARGS` prints, stdout and stderr merged as a terminal shows them (progress bars'
    carriage returns split too), run outside any git repository."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, "-m", "fmoe", "prune-recover", "--trainer.default_root_dir", str(tmp_path),
                          *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stdout
    return re.split(r"\r\n|\r|\n", out.stdout)


@pytest.fixture(scope="module")
def default_run(tmp_path_factory) -> list[str]:
    return prune_recover(tmp_path_factory.mktemp("console"), *QUICK)


def test_the_default_run_prints_stages_bars_results_and_the_table_only(default_run):
    unexpected = [line for line in default_run if not any(p.fullmatch(line.rstrip()) for p in ALLOWED)]
    assert not unexpected, "lines outside the console's allow-list:\n" + "\n".join(unexpected)
    headers = [m[1] for line in default_run if (m := re.match(rf"\[({STAGES})\] (?!done in )", line))]
    assert headers == ["load", "evaluate", "calibrate", "evaluate", "recover", "evaluate", "export"]
    assert any(line.startswith("recovered ") for line in default_run)


def test_verbose_shows_what_the_filters_drop(tmp_path):
    lines = prune_recover(tmp_path, "--verbose", "--stages.recover", "false", "--stages.evaluate", "false",
                          "--data.n_samples", "16", "--tasks", "{}", "--lm_eval.tasks", "[]")
    assert any(line.startswith("GPU available: ") for line in lines)
    assert any(line.startswith("TPU available: ") for line in lines)
    assert any("No seed found, seed set to 0" in line for line in lines)
    assert any(line.startswith("[calibrate] ") for line in lines)


def collected(name: str) -> list[logging.LogRecord]:
    """A list that receives every record logger `name` handles (its filters applied)."""
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger(name).addHandler(handler)
    return records


def test_log_filters_drop_their_messages_only():
    lightning, fmoe_log = "lightning.pytorch.utilities.rank_zero", "fmoe.test_console"
    seen, fmoe_seen = collected(lightning), collected(fmoe_log)
    logger = logging.getLogger(lightning)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        with console.quiet():
            logger.info("GPU available: False, used: False")  # dropped
            logger.info("IntermediatePruning (dims): parameters 10 -> 5")  # another message of the logger
            logger.error("GPU available: True (cuda), used: False")  # an error always shows
            logging.getLogger(fmoe_log).warning("GPU available: False, used: False")  # another logger
        logger.info("TPU available: False, using: 0 TPU cores")  # after the block: shows
    finally:
        logger.setLevel(level)
        logger.handlers.pop()
        logging.getLogger(fmoe_log).handlers.pop()
    assert [r.getMessage().split(":")[0] for r in seen] == ["IntermediatePruning (dims)", "GPU available",
                                                            "TPU available"]
    assert len(fmoe_seen) == 1 and not logger.filters


def test_warning_filters_drop_their_category_and_message_only():
    before = list(warnings.filters)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        with console.quiet():
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)  # dropped
            warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", UserWarning)  # another category
            warnings.warn("a top-k teacher cache constrains the student only on ...", UserWarning)  # fmoe's own
        warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)  # after the block: shows
        with console.quiet(verbose=True):
            warnings.warn("`is_gradient_checkpointing` is deprecated", FutureWarning)  # verbose: shows
    assert [w.category for w in seen] == [UserWarning, UserWarning, FutureWarning, FutureWarning]
    assert warnings.filters == before


def test_lm_eval_records_no_git_complaint_outside_a_repository(tmp_path, monkeypatch, capfd):
    pytest.importorskip("lm_eval")
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    import lm_eval.evaluator

    monkeypatch.chdir(tmp_path)
    with console.quiet_lm_eval():  # outside quiet(): lm-eval as it is
        assert lm_eval.evaluator.get_git_commit_hash() is None
    assert "fatal: not a git repository" in capfd.readouterr().err
    with console.quiet(), console.quiet_lm_eval():
        assert lm_eval.evaluator.get_git_commit_hash() is None
    assert capfd.readouterr().err == ""


def test_stage_lines_on_rank_zero_only(capsys, monkeypatch):
    console.header("prune", "dims, amount 0.5")
    console.result("prune", console.metrics({"domain_ppl": 1.5, "steps": 4}))
    monkeypatch.setattr(console.rank_zero_only, "rank", 1)
    console.header("prune", "on another rank")
    assert capsys.readouterr().out == "[prune] dims, amount 0.5\n[prune] done in 0.0 s: domain_ppl 1.500, steps 4\n"
