"""The package reads as the pipeline: each stage imports only itself and the stages before it, and no module
imports itself back through others (imports inside functions included)."""

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest

import fmoe

ROOT = Path(fmoe.__file__).parent
# the pipeline's stages, in order: a module may import from its own stage and the ones before it
STAGES = ["io", "console", "model", "calibration", "methods", "recovery", "evaluation", "serving", "toy", "lightning",
          "recipes", "cli"]


def module_name(path: Path) -> str:
    parts = ("fmoe",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str) -> set[str]:
    """The fmoe modules `name` imports anywhere in its code (a package's __init__ counts as the package)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parent + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != "fmoe"}
    return found


GRAPH = {name: imports(name) for name in MODULES if name != "fmoe"}


def stage(name: str) -> str:
    return name.split(".")[1] if name.count(".") >= 1 else name


def test_every_module_belongs_to_a_stage():
    private = {"fmoe._aliases", "fmoe.__main__"}
    assert {stage(n) for n in GRAPH if n not in private} <= set(STAGES)


def test_no_import_cycle():
    state, path = {}, []

    def visit(node):
        state[node] = "open"
        path.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == "open":
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = "done"

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_stages_import_only_earlier_stages():
    order = {s: i for i, s in enumerate(STAGES)}
    upward = [f"{a} -> {b}" for a, targets in GRAPH.items() for b in targets
              if stage(a) in order and stage(b) in order and order[stage(b)] > order[stage(a)]]
    assert not upward, "imports against the pipeline's order:\n" + "\n".join(sorted(upward))


def test_the_flat_layouts_module_paths_still_import_with_a_warning():
    from fmoe._aliases import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
            module = importlib.import_module(old)
        assert module is importlib.import_module(new)
    assert callable(fmoe.prune) and callable(fmoe.reconstruct)  # the functions, never shadowed by a module
    assert fmoe.scores.rank_mean is importlib.import_module("fmoe.calibration.scores").rank_mean
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fmoe.nothing


def test_the_docs_layout_page_names_every_module_of_each_stage():
    page = (ROOT.parent / "docs" / "layout.md").read_text()
    tree = page.split("```")[1]
    sections, current = {}, None
    for line in tree.splitlines():
        folder = re.match(r"^ {2,4}(\w+)/", line)
        if folder:
            current = folder.group(1)
        if current:
            sections[current] = sections.get(current, "") + line + "\n"
    for stage in ("model", "calibration", "methods", "dims", "recovery", "evaluation", "toy"):
        folder = ROOT / ("methods/dims" if stage == "dims" else stage)
        modules = {p.stem for p in folder.glob("*.py") if p.name != "__init__.py"}
        missing = [m for m in sorted(modules) if not re.search(rf"\b{m}\b", sections.get(stage, ""))]
        assert not missing, f"docs/layout.md does not name fmoe/{folder.relative_to(ROOT)}/{missing}"
