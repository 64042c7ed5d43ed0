"""The import graph keeps its one-way rooms (docs/ARCHITECTURE.md): read from the source with `ast`,
imports inside functions included, so a shortcut that would bend the layering fails here."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "pr1_jax")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def _imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """Project modules and third-party top-level packages `path` imports, anywhere in the file.
    `from pkg import name` counts as importing `pkg.name` when that is a module."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                out.add(sub if sub in modules else node.module)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, modules) for name, path in modules.items()}


def _reachable(graph, start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for nxt in graph.get(todo.pop(), ()):
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_no_import_cycles(graph):
    cycles = sorted(m for m in graph if m in _reachable(graph, m))
    assert not cycles, f"modules that import themselves back: {cycles}"


def test_models_know_nothing_of_the_training_system(graph):
    for m in graph:
        if m.startswith("models"):
            assert not any(x.startswith("pr1_jax") for x in graph[m]), m


def test_sampling_side_does_not_depend_on_the_update(graph):
    for m in ("pr1_jax.sampling", "pr1_jax.rollout", "pr1_jax.judge"):
        assert "pr1_jax.learner" not in _reachable(graph, m), m


def test_rewards_have_no_jax(graph):
    """Reward workers import `pr1_jax.rewards` in fresh processes: it must stay light."""
    reached = _reachable(graph, "pr1_jax.rewards")
    assert not any(x.split(".")[0] in ("jax", "flax", "optax", "models") for x in reached), reached


ENTRY_POINTS = ("pr1_jax.train", "pr1_jax.export", "pr1_jax.evaluate", "pr1_jax.mcnemar")


def test_the_evaluation_room_is_below_its_entry_points(graph):
    """`pr1_jax.evaluation` imports no entry point (McNemar lives inside it; `pr1_jax.mcnemar` is
    the command's alias), and only the evaluation commands import it."""
    room = [m for m in graph if m.startswith("pr1_jax.evaluation")]
    assert "pr1_jax.evaluation.mcnemar" in room
    for m in room:
        assert not set(graph[m]) & set(ENTRY_POINTS), m
    users = sorted(m for m, deps in graph.items()
                   if m not in room and any(x.startswith("pr1_jax.evaluation") for x in deps))
    assert users == ["pr1_jax.evaluate", "pr1_jax.mcnemar"]


def test_only_the_entry_point_reaches_the_embedded_default(graph):
    users = sorted(m for m, deps in graph.items()
                   if not m.startswith("pr1_jax.tiny") and any(x.startswith("pr1_jax.tiny") for x in deps))
    assert users == ["pr1_jax.train"]
