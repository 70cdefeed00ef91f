"""The import direction written in ARCHITECTURE.md, checked on the source (every import, function-local
ones too; ``if TYPE_CHECKING:`` blocks are left out because they never run).

Run with ``-s`` to print the graph.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

PACKAGES = ("engine", "tui")

# engine/, bottom to top: a module may import modules of its own layer or below, never above.
ENGINE_LAYERS = [
    ["errors", "events", "prompts", "loggers"],
    ["model", "model_config", "tokenizer", "device", "corpus", "recorder", "tf_checkpoint"],
    ["config", "corpora", "checkpoint", "checkpoint.io", "checkpoint.format"],
    ["data", "sampling", "lora", "pretrained", "commands", "guard", "steps", "runs"],
    ["weights", "inference", "strategy", "hf_export", "optim"],
    ["task", "instruct", "setup", "run_state", "inspect_tokens"],
    ["trainer", "distributed", "control"],
    ["runner", "bench"],
]

# tui/: cli -> cmd_* -> launch -> {app, headless} -> widgets -> format (the sampling screens beside them).
TUI_LAYERS = [
    ["format", "keys", "common", "entry", "forecast", "live"],
    ["widgets", "headless", "sample_panel", "sample_views", "system", "steer"],
    ["app", "compare", "web"],
    ["engine_process"],
    ["launch", "detach"],
    ["cmd_train", "cmd_gpt2", "cmd_sample", "cmd_speed", "cmd_dist", "cmd_prepare", "cmd_runs", "cmd_logs",
     "cmd_export", "cmd_compare"],
    ["cli"],
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                lines.update(range(sub.lineno, (sub.end_lineno or sub.lineno) + 1))
    return lines


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (at module level or inside functions)."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (REPO / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skip = _type_checking_lines(tree)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(tree):
            if getattr(node, "lineno", None) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                # ``from pkg import submodule`` imports the submodule; a package's own __init__ is no cycle
                targets = subs if subs and mod.startswith(base + ".") else [base, *subs]
            for t in targets:
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def _layer_of(layers: list[list[str]], pkg: str) -> dict[str, int]:
    return {f"{pkg}.{m}": i for i, names in enumerate(layers) for m in names}


def test_no_import_cycles() -> None:
    assert _cycle(import_graph()) is None, f"import cycle: {' -> '.join(_cycle(import_graph()) or [])}"


def test_engine_never_imports_tui_and_nothing_imports_the_cli() -> None:
    graph = import_graph()
    assert not [(m, t) for m, ts in graph.items() if m.startswith("engine") for t in ts if t.startswith("tui")]
    assert [m for m, ts in graph.items() if "tui.cli" in ts] == []


def test_every_import_goes_down_the_layers(capsys) -> None:
    graph = import_graph()
    layer = {**_layer_of(ENGINE_LAYERS, "engine"), **_layer_of(TUI_LAYERS, "tui")}
    unplaced = sorted(m for m in graph if m not in layer and m not in PACKAGES)
    assert not unplaced, f"modules not placed in a layer of tests/test_architecture.py: {unplaced}"
    upward = [(m, t) for m, ts in graph.items() for t in ts
              if m in layer and t in layer and m.split(".")[0] == t.split(".")[0] and layer[t] > layer[m]]
    assert not upward, f"imports that go up a layer: {upward}"
    with capsys.disabled():
        print("\nimport graph (module: what it imports)")
        for m in sorted(graph, key=lambda x: (x.split(".")[0], layer.get(x, -1), x)):
            if graph[m]:
                print(f"  L{layer.get(m, '-')} {m}: {', '.join(sorted(graph[m]))}")


def test_the_command_line_starts_without_torch() -> None:
    """Shell commands (status, pause, runs, --help) answer at once: importing the CLI imports no torch."""
    import subprocess
    import sys

    code = "import sys, tui.cli; print(sorted(m for m in ('torch', 'numpy', 'textual') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=str(REPO), timeout=60)
    assert r.returncode == 0, r.stderr
    assert "torch" not in r.stdout, r.stdout


def test_every_controller_implements_the_whole_contract() -> None:
    """The dashboard is typed against ``RunController``: each controller it may be given answers every
    member (a missing one is an AttributeError in the middle of a session, as a settings form once hit)."""
    import inspect

    from engine.commands import LocalController, RunController
    from engine.control import ReadOnlyController, RemoteController
    from engine.trainer import Trainer
    from tui.engine_process import ChildRun
    from tui.launch import StartingRun

    members = {n for n, _ in inspect.getmembers(RunController) if not n.startswith("_")}
    assert {"pause", "change", "change_many", "stop", "paused", "template"} <= members
    for cls in (LocalController, Trainer, StartingRun, RemoteController, ReadOnlyController, ChildRun):
        init = "".join(inspect.getsource(k.__init__) for k in cls.__mro__[:-1] if "__init__" in vars(k))  # plain attributes
        missing = sorted(m for m in members if not hasattr(cls, m) and f"self.{m}:" not in init and f"self.{m} =" not in init)
        assert not missing, f"{cls.__name__} lacks {missing}"
