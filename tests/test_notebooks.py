"""The notebooks run through a Jupyter kernel, offline, and are committed with the outputs their
code prints.

Each runs once (`notebooks/execute.py`, the command that saves their outputs) in a fresh directory;
the tests then compare the run with the committed file.
"""

import functools
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
# the notebook with its new outputs, the directory it ran in
Executed = tuple[nbformat.NotebookNode, Path]

_spec = importlib.util.spec_from_file_location("execute_notebooks",
                                               ROOT / "notebooks" / "execute.py")
assert _spec is not None and _spec.loader is not None
notebook_runner = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(notebook_runner)


# What a notebook's run must have computed, asserted in its kernel after its last cell.
KERNEL_CHECKS = {
    # 20 steps take the loss from ~10.5 to ~4.6.
    "walkthrough.ipynb": ["assert result.best_val_loss < 6.0, result.best_val_loss"],
    # A run on records takes its template from them; the notebook's settings name none.
    "finetune_qa.ipynb": ["assert result.step > 0 and cfg.prompt_template is None, (result, cfg)"],
}


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> Callable[[Path], Executed]:
    """Run a notebook and its `KERNEL_CHECKS` (once per test module, however many tests look at it).
    """

    @functools.cache
    def run(notebook: Path) -> Executed:
        workdir = tmp_path_factory.mktemp(notebook.stem)
        return notebook_runner.execute(notebook, workdir, then=KERNEL_CHECKS.get(notebook.name,
                                                                                 ())), workdir

    return run


def code_cells(nb: nbformat.NotebookNode) -> list[nbformat.NotebookNode]:
    return [cell for cell in nb.cells if cell.cell_type == "code"]


def output_kinds(cell: nbformat.NotebookNode) -> set[str]:
    """What a cell shows: `stream:stdout`, `display_data:image/png`, ... Standard error is left out:
    its progress bars and warnings depend on the machine, not on the code."""
    kinds = set()
    for output in cell.outputs:
        if output.output_type == "stream":
            if output.name == "stdout":
                kinds.add("stream:stdout")
        else:
            kinds.update(f"{output.output_type}:{mime}" for mime in output.get("data", {"": None}))
    return kinds


def stdout_text(cell: nbformat.NotebookNode) -> str:
    return "".join(o.text for o in cell.outputs if o.output_type == "stream" and o.name == "stdout")


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs_through_a_kernel_and_shows_what_its_committed_outputs_show(
        notebook: Path, executed: Callable[[Path], Executed]) -> None:
    committed = nbformat.read(notebook, as_version=4)
    rerun, _ = executed(notebook)  # raises CellExecutionError at the first failing cell
    assert [c.cell_type for c in rerun.cells] == [c.cell_type for c in committed.cells]
    old, new = code_cells(committed), code_cells(rerun)
    assert old, "a notebook without code cells"
    # Saved from one top-to-bottom run in a fresh kernel, not from cells run out of order or edited
    # after.
    assert [c.execution_count for c in old] == list(range(1, len(old) + 1)), (
        f"{notebook.name} was not saved from one run; re-execute it: python notebooks/execute.py")
    for i, (before, after) in enumerate(zip(old, new, strict=True)):
        assert output_kinds(before) == output_kinds(after), (
            f"{notebook.name} code cell {i + 1} now shows {sorted(output_kinds(after))}, committed "
            f"{sorted(output_kinds(before))}; re-execute it: python notebooks/execute.py")
        assert all(o.output_type != "error" for o in before.outputs)


def test_walkthrough_writes_its_run_and_token_cache(executed: Callable[[Path], Executed]) -> None:
    nb, workdir = executed(ROOT / "notebooks" / "walkthrough.ipynb")
    printed = "".join(stdout_text(cell) for cell in code_cells(nb))
    assert "best validation loss" in printed
    assert (workdir / "runs" / "notebook" / "best" / "model.safetensors").is_file()
    assert any((workdir / "data" / "cache").iterdir())


def test_finetune_run_keeps_the_template_of_its_records(executed: Callable[[Path],
                                                                           Executed]) -> None:
    _, workdir = executed(ROOT / "notebooks" / "finetune_qa.ipynb")
    run = workdir / "runs" / "notebook"
    assert (run / "best" / "model.safetensors").is_file()
    assert '"prompt_template": "qa"' in (run / "train_config.json").read_text()


def test_a_failed_kernel_check_fails_the_run_and_checks_are_not_kept(tmp_path: Path) -> None:
    path = tmp_path / "two.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("x = 1")]), path)
    assert len(notebook_runner.execute(path, tmp_path, then=["assert x == 1"]).cells) == 1
    with pytest.raises(CellExecutionError, match="AssertionError"):
        notebook_runner.execute(path, tmp_path, then=["assert x == 2"])


CONNECT = """import socket
try:
    socket.create_connection(("127.0.0.1", 9), timeout=1)
except OSError as error:
    print(error)"""


def run_probe(tmp_path: Path, *sources: str) -> list[nbformat.NotebookNode]:
    """The code cells of a notebook made of `sources`, after `execute`."""
    path = tmp_path / "probe.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(s) for s in sources]),
                   path)
    return code_cells(notebook_runner.execute(path, tmp_path))


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> list[nbformat.NotebookNode]:
    """One kernel's run of what the two tests below look at (a kernel start each would add nothing):
    the Python and `gpt` it imports, then a connection attempt from it and from a Python it
    starts."""
    return run_probe(
        tmp_path_factory.mktemp("probe"), "import sys, "
                                          "gpt\nprint(sys.executable)\nprint(gpt.__file__)",
        CONNECT, f"import subprocess, sys\nprint(subprocess.run([sys.executable, '-c', "
                 f"{CONNECT!r}], "
        "capture_output=True, text=True).stdout)")


def test_kernel_is_this_python_importing_this_checkout(probe: list[nbformat.NotebookNode]) -> None:
    executable, gpt_file = stdout_text(probe[0]).splitlines()
    assert Path(executable) == Path(sys.executable)
    assert Path(gpt_file).parent == ROOT / "gpt"


def test_kernel_and_the_pythons_it_starts_cannot_open_a_connection(
        probe: list[nbformat.NotebookNode]) -> None:
    # Port 9 of this machine: with the network open the attempt is refused, a different message.
    _, kernel, child = probe
    assert "network disabled" in stdout_text(kernel)
    assert "network disabled" in stdout_text(child)


def test_a_cell_that_raises_fails_the_run(tmp_path: Path) -> None:
    with pytest.raises(CellExecutionError, match="ZeroDivisionError"):
        run_probe(tmp_path, "print('fine')", "1 / 0", "print('never reached')")
