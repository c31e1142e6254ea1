"""Data flows one way (STYLE.md, Layout): data -> model -> step -> kernels; eval reads data and model;
telemetry imports nothing upstream; engine composes; only cli and api (the front ends) import engine. The kernels
(``kernels/``, installed as ``fastbyol.kernels``) call the step's pure functions as their references, so step never
imports them: the engine hands them in. Read from the source, so a wrong import fails here, and no two modules or
layers import each other."""

from __future__ import annotations

import ast
import math
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASE = {"fastbyol.config", "fastbyol.config_checks", "fastbyol.config_parse", "fastbyol.config_traits",
        "fastbyol.presets", "fastbyol.errors",
        "fastbyol.files", "fastbyol.lr"}
ALLOWED = {
    "data": BASE | {"fastbyol.data"},
    "model": BASE | {"fastbyol.data", "fastbyol.model"},
    "step": BASE | {"fastbyol.data", "fastbyol.model", "fastbyol.step"},
    "telemetry": {"fastbyol.telemetry", "fastbyol.errors", "fastbyol.files"},
    "eval": BASE | {"fastbyol.data", "fastbyol.model", "fastbyol.eval"},
    "engine": BASE | {"fastbyol.data", "fastbyol.model", "fastbyol.step", "fastbyol.telemetry", "fastbyol.eval",
                      "fastbyol.engine", "fastbyol.kernels"},
    "kernels": BASE | {"fastbyol.kernels", "fastbyol.step"},
}


def _fastbyol_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fastbyol"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fastbyol")}
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2])


def test_imports_follow_the_layers() -> None:
    bad = []
    for layer, allowed in ALLOWED.items():
        folder = ROOT / "kernels" if layer == "kernels" else ROOT / "fastbyol" / layer
        for path in sorted(folder.glob("*.py")):
            for module in _fastbyol_imports(path):
                if _layer(module) not in allowed:
                    bad.append(f"{path.relative_to(ROOT)} imports {module}")
    assert not bad, bad


def test_only_cli_imports_engine() -> None:
    importers = [p.name for p in (ROOT / "fastbyol").glob("*.py")
                 if any(_layer(m) == "fastbyol.engine" for m in _fastbyol_imports(p))]
    assert sorted(importers) == ["api.py", "cli.py"]  # the two front ends: the command line and the Python API
    for name in ("config.py", "config_checks.py", "config_parse.py", "config_traits.py", "presets.py"):
        assert not any(_layer(m) == "fastbyol.engine" for m in _fastbyol_imports(ROOT / "fastbyol" / name))


def test_config_is_split_by_concern() -> None:
    """Issue 31: the sections in config.py (under 600 lines), the presets and the parsing in modules of their own."""
    assert len((ROOT / "fastbyol" / "config.py").read_text().splitlines()) < 600
    config = _fastbyol_imports(ROOT / "fastbyol" / "config.py")
    assert "fastbyol.presets" not in config and "fastbyol.config_parse" not in config
    assert {"fastbyol.config", "fastbyol.presets"} <= _fastbyol_imports(ROOT / "fastbyol" / "config_parse.py")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "kernels":  # installed as fastbyol.kernels
        parts = ["fastbyol", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at module level or inside a function alike)."""
    paths = [*(ROOT / "fastbyol").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]
    modules = {_module_name(p): p for p in paths}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for module in _fastbyol_imports(path):
            while module and module not in modules:  # `from fastbyol.x import y` names the package x
                module = module.rpartition(".")[0]
            if module and module != name and not name.startswith(module + "."):
                deps.add(module)
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (depth-first search), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_between_modules_or_layers() -> None:
    """Not between two modules (kernels/ included, as fastbyol.kernels), and not between two layers: the
    kernels sit above step (their references call the step's pure functions), so step never imports them."""
    graph = _import_graph()
    assert "fastbyol.kernels.ema" in graph and "fastbyol.step.ema" in graph["fastbyol.kernels.ema"]
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])
    layers: dict[str, set[str]] = {}
    for module, deps in graph.items():
        layer = ".".join(module.split(".")[:2])
        layers.setdefault(layer, set()).update(d for dep in deps if (d := ".".join(dep.split(".")[:2])) != layer)
    assert _cycle(layers) is None, " -> ".join(_cycle(layers) or [])


def test_the_cycle_finder_finds_one() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_trainer_is_small_and_never_asks_which_engine_or_method_runs() -> None:
    """Issue 17's shape, kept: ``Trainer.__init__`` under 50 lines, no method of the Trainer over 40, and no
    ``if`` in trainer.py on the engine or the method (they are chosen once: ``build_update``,
    ``build_method``)."""
    tree = ast.parse((ROOT / "fastbyol" / "engine" / "trainer.py").read_text())
    trainer = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Trainer")
    sizes = {f.name: (f.end_lineno or f.lineno) - f.lineno + 1 for f in trainer.body if isinstance(f, ast.FunctionDef)}
    assert sizes["__init__"] < 50, sizes["__init__"]
    assert not {name: n for name, n in sizes.items() if n > 40 and name != "__init__"}
    asks = [f"line {n.lineno}: {ast.unparse(n.test)}" for n in ast.walk(tree) if isinstance(n, (ast.If, ast.IfExp))
            and re.search(r"engine|method|simclr|byol|deepspeed|ddp|zero", ast.unparse(n.test), re.IGNORECASE)]
    assert not asks, asks


def _sources() -> dict[str, str]:
    return {str(p.relative_to(ROOT)): p.read_text() for p in [*(ROOT / "fastbyol").rglob("*.py"),
                                                               *(ROOT / "kernels").glob("*.py")]}


def test_one_cosine_one_lr_loop_one_tau_write() -> None:
    """Issue 31: the half cosine is written once (``fastbyol/lr.py``; training's lr and tau, the linear probe and
    fine-tuning call it), the lr reaches an optimizer's groups through one loop (``set_lr``), and tau reaches
    the device in one place (``FlatEmaUpdate.tau_on_device``). The procedural shapes' drawing is not a decay."""
    found: dict[str, list[str]] = {"cosine": [], "lr loop": [], "tau write": []}
    for path, text in _sources().items():
        for line in text.splitlines():
            where = path  # one entry per line found
            if "math.cos(" in line and path != "fastbyol/data/procedural.py" or "torch.cos(" in line:
                found["cosine"].append(where)
            if re.search(r"\[\s*[\"']lr[\"']\s*\]\s*=[^=]", line):
                found["lr loop"].append(where)
            if re.search(r"tau\w*\.(fill_|copy_)\(|\.(fill_|copy_)\(\s*tau", line):
                found["tau write"].append(where)
    assert found == {"cosine": ["fastbyol/lr.py"], "lr loop": ["fastbyol/lr.py"],
                     "tau write": ["fastbyol/engine/update.py"]}, found


def test_half_cosine_and_set_lr() -> None:
    import torch

    from fastbyol.lr import half_cosine, set_lr
    from fastbyol.step.schedules import lr_at, tau_at

    assert (half_cosine(0, 10), half_cosine(5, 10), half_cosine(10, 10), half_cosine(12, 10)) == (1.0, 0.5, 0.0, 0.0)
    assert lr_at(7, total_steps=10, warmup_steps=2, peak_lr=3.0) == 0.5 * 3.0 * (1 + math.cos(math.pi * 5 / 8))
    assert tau_at(3, total_steps=10, tau_base=0.99) == 1 - 0.01 * (math.cos(math.pi * 3 / 10) + 1) / 2
    opt = torch.optim.SGD([{"params": [torch.zeros(1)]}, {"params": [torch.zeros(1)], "lr_mult": 10.0}], lr=0.0)
    set_lr(opt, 0.25)
    assert [g["lr"] for g in opt.param_groups] == [0.25, 2.5]


def _long_functions(path: Path, limit: int) -> dict[str, int]:
    sizes = {f"{path.name}:{n.name}": (n.end_lineno or n.lineno) - n.lineno + 1
             for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    return {name: size for name, size in sizes.items() if size > limit}


def test_the_cli_is_one_small_function_per_subcommand() -> None:
    """Issue 31: no function in cli.py over 40 lines (the parser is built from one function per subcommand)."""
    assert _long_functions(ROOT / "fastbyol" / "cli.py", 40) == {}


def test_no_isinstance_of_a_network_class_outside_the_model() -> None:
    """Issue 31's method seam: the engine and the step ask the method and ``Network``, never which network class
    runs (``fastbyol.model`` alone may)."""
    found = []
    for path, text in _sources().items():
        if path.startswith("fastbyol/model/"):
            continue
        found += [f"{path}: {ast.unparse(node)}" for node in ast.walk(ast.parse(text)) if isinstance(node, ast.Call)
                  and ast.unparse(node.func) == "isinstance"
                  and re.search(r"\b(ByolPair|SimclrNet|Tower)\b", ast.unparse(node.args[1]))]
    assert not found, found


def test_no_function_in_the_package_over_80_lines() -> None:
    """Issue 31: long functions were split by concern; this keeps them so."""
    long = {}
    for path in [*(ROOT / "fastbyol").rglob("*.py"), *(ROOT / "kernels").glob("*.py")]:
        long.update(_long_functions(path, 80))
    assert long == {}
