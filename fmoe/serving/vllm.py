"""Run fmoe's exports in vLLM, whose environment (its own transformers and torch pins) is not fmoe's.

    fmoe serve runs/prune_recover/export                         # vLLM's OpenAI-compatible server
    fmoe serve runs/prune_recover/export --python /opt/vllm/bin/python -- --port 8001 --dtype bfloat16

Exports in the stock layout serve in stock vLLM; fused exports (ragged widths, per-layer expert counts, removed MoE
sublayers) need fmoe's plugin, `pip install --no-deps ./plugins/vllm` in vLLM's environment. `generate` runs
greedy generation there (fmoe/serving/vllm_worker.py, one engine per model in one process) for tests and benchmarks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from ..model.checkpoint import FORMAT_FIELD, SERVED_PREFIX

PYTHON_ENV = "FMOE_VLLM_PYTHON"  # the Python of an environment with vLLM (and the plugin) installed
WORKER = Path(__file__).with_name("vllm_worker.py")
PLUGIN = Path(__file__).resolve().parents[2] / "plugins" / "vllm"  # in a source checkout


def vllm_python() -> str | None:
    """The Python of vLLM's environment: $FMOE_VLLM_PYTHON, else the interpreter next to a `vllm` on PATH."""
    if os.environ.get(PYTHON_ENV):
        return os.environ[PYTHON_ENV]
    found = shutil.which("vllm")
    if found is None:
        return None
    python = Path(found).with_name("python")
    return str(python) if python.exists() else None


def needs_plugin(directory: str | Path) -> bool:
    """Does this export need fmoe's vLLM plugin (fused layout), or does stock vLLM serve it?"""
    config = json.loads((Path(directory) / "config.json").read_text())
    names = config.get("architectures") or []
    return config.get(FORMAT_FIELD) == "fused" or any(a.startswith(SERVED_PREFIX) for a in names)


def serve_command(directory: str | Path) -> str:
    """The shell command that serves an export (printed by the recipe after its export)."""
    plugin = f"  # needs fmoe's plugin: pip install --no-deps {PLUGIN}" if needs_plugin(directory) else ""
    return f"fmoe serve {directory}{plugin}"


def generate(models: list[dict], engine: dict | None = None, python: str | None = None, env: dict | None = None,
             timeout: float = 1800) -> list[dict]:
    """Greedy generation in vLLM for each {"path", "prompts" (token id lists), "max_tokens"}: a list of
    {"path", "tokens", "logprobs", "load_s", "generate_s", "error"} (see vllm_worker.py). `env`: extra
    environment variables for vLLM (e.g. VLLM_PLUGINS)."""
    python = python or vllm_python()
    if python is None:
        raise RuntimeError(f"no vLLM environment: set {PYTHON_ENV} to the Python of one (see docs/serving.md)")
    engine = {"dtype": "float32", "seed": 0, **(engine or {})}
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "out.json"
        job.write_text(json.dumps({"models": models, "engine": engine}))
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
               "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
        # -P: the worker directory must not shadow the `vllm` package with this module
        run = subprocess.run([python, "-P", str(WORKER), str(job), str(out)], env=env, capture_output=True, text=True,
                             timeout=timeout)
        if not out.is_file():
            raise RuntimeError(f"the vLLM worker failed (exit {run.returncode}):\n{run.stderr[-4000:]}")
        return json.loads(out.read_text())["results"]


SERVER = "vllm.entrypoints.launchers.api_server.entry"  # what `vllm serve` runs (vllm-cpu 0.32's `vllm` command
# looks up the distribution "vllm" and fails: that package is named vllm-cpu)


def serve(argv: list[str] | None = None, prog: str = "fmoe serve") -> None:
    """`fmoe serve DIR [--python PATH] [-- vLLM server options]`: vLLM's OpenAI-compatible server on an export."""
    import argparse

    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(prog=prog, description=serve.__doc__)
    parser.add_argument("directory", help="an fmoe export (or any checkpoint vLLM serves)")
    parser.add_argument("--python", default=None, help=f"the Python of vLLM's environment (default: ${PYTHON_ENV}, "
                        "else the one next to a `vllm` on PATH)")
    args = parser.parse_args(argv)
    if not (Path(args.directory) / "config.json").is_file():
        raise SystemExit(f"{prog}: {args.directory} has no config.json: not a model directory")
    python = args.python or vllm_python()
    if python is None or not Path(python).exists():
        raise SystemExit(f"{prog}: vLLM not found; install it in its own environment and pass --python or set "
                         f"{PYTHON_ENV} (docs/serving.md)")
    if needs_plugin(args.directory):
        print(f"{prog}: {args.directory} is a fused export; vLLM serves it with fmoe's plugin "
              f"(pip install --no-deps {PLUGIN}) installed in its environment", file=sys.stderr)
    os.execv(python, [python, "-m", SERVER, "--model", str(args.directory), *extra])
