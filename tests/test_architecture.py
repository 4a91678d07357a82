"""The package's shape: sub-packages whose imports point one way, and no import cycle.

Every import of every module under gpt/ is read with `ast` (those under `if TYPE_CHECKING:` and
inside functions included) and resolved to the gpt module it names.
"""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "gpt"
LAYERS = ("base", "model", "data", "checkpoints", "eval", "training", "objectives", "cli", "serve")
"""The sub-packages, lowest first: a module may import from its own sub-package and the ones
before it, never from one after it (gpt/__init__.py and gpt/__main__.py stand above them all)."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(path: Path, known: set[str]) -> set[str]:
    """The gpt modules `path` imports (a name imported from a package counts as its module when
    there is one: `from gpt.objectives import lm` imports gpt.objectives.lm)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in known}


def layer(module: str) -> int | None:
    """The index in `LAYERS` of the sub-package `module` is in; None for the top (gpt,
    gpt.__main__)."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imported(path, set(found)) - {name} for name, path in found.items()}


def test_every_module_sits_in_a_documented_sub_package() -> None:
    stray = [name for name in modules() if layer(name) is None and name not in ("gpt",
                                                                                "gpt.__main__")]
    assert stray == []


def test_every_sub_package_says_what_it_holds_and_what_it_may_import() -> None:
    for name in LAYERS:
        doc = ast.get_docstring(ast.parse((PACKAGE / name / "__init__.py").read_text()))
        assert doc and "Import" in doc, name


def test_imports_point_down_the_layers_only() -> None:
    upward = [(module, target) for module, targets in graph().items() for target in targets
              if layer(module) is not None and (layer(target) is None
                                                or layer(target) > layer(module))]
    assert upward == []


def test_there_is_no_import_cycle() -> None:
    edges = graph()
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            if state.get(target) == "open":
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("source", [
    "from gpt.training.trainer import train\n",
    "if TYPE_CHECKING:\n    from gpt.cli import generate\n",
    "def f():\n    import gpt.objectives.dpo\n",
])
def test_the_reader_finds_upward_imports_wherever_they_are_written(tmp_path, source) -> None:
    path = tmp_path / "probe.py"
    path.write_text(source)
    targets = imported(path, set(modules()))
    assert targets and all(layer(t) > LAYERS.index("model") for t in targets)


def test_no_module_outside_an_objective_names_it() -> None:
    """The loop, metrics, report, settings and distributed code know no objective by name."""
    others = [path for path in PACKAGE.rglob("*.py") if path != PACKAGE / "objectives" / "dpo.py"]
    assert len(others) > 30
    named = [path.name for path in others if '"dpo"' in path.read_text()
             or "'dpo'" in path.read_text()]
    assert named == []
