"""Run notebooks top to bottom through a Jupyter kernel, offline, and save them with their outputs.

    python notebooks/execute.py                              # every notebooks/*.ipynb, in place
    python notebooks/execute.py notebooks/walkthrough.ipynb  # just this one

Each notebook runs in a fresh temporary directory (the runs/ and data/ it writes are deleted after),
in a kernel of this Python (`sys.executable`) that imports this checkout's `gpt` and cannot open a
network connection, so the saved outputs are what the committed code prints for a reader offline.
tests/test_notebooks.py runs the same `execute` and checks the committed outputs against it. Needs
the test extra (`pip install -e ".[test]"`: nbclient, nbformat, ipykernel).
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import nbformat
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
from nbclient import NotebookClient

from gpt.base.atomic import atomic_file

ROOT = Path(__file__).resolve().parents[1]
CELL_TIMEOUT_S = 900  # a cell that trains may be slow on a busy machine; a hung one still ends

# Python imports `sitecustomize` at start-up from the path, before the kernel or any notebook code,
# and so does every Python process a notebook starts (they inherit PYTHONPATH): all are offline.
NO_NETWORK = '''\
"""Written by notebooks/execute.py: this Python runs a notebook offline."""
import socket


def _refuse(*args, **kwargs):
    raise OSError("network disabled: notebooks are executed offline")


socket.socket.connect = socket.socket.connect_ex = socket.create_connection = _refuse
'''


def joined(separator: str, *parts: str | None) -> str:
    """The parts that are set, joined: an environment variable's list with ours added."""
    return separator.join(part for part in parts if part)


def execute(notebook: Path, workdir: Path, then: Sequence[str] = ()) -> nbformat.NotebookNode:
    """`notebook` run top to bottom in `workdir`, with its new outputs (the file is not changed).

    `then`: code run after the last cell in the same kernel, with the notebook's variables (a test's
    assertions); left out of the result. Raises `nbclient.exceptions.CellExecutionError` at the
    first cell that fails.
    """
    nb = nbformat.read(notebook, as_version=4)
    cells = len(nb.cells)
    nb.cells += [nbformat.v4.new_code_cell(code) for code in then]
    with tempfile.TemporaryDirectory() as site:
        (Path(site) / "sitecustomize.py").write_text(NO_NETWORK)
        env = {
            **os.environ,
            "PYTHONPATH": joined(os.pathsep, site, str(ROOT), os.environ.get("PYTHONPATH")),
            # Figures as inline PNGs, also when the caller set another backend (tests use Agg).
            "MPLBACKEND": "module://matplotlib_inline.backend_inline",
            # tqdm.auto (imported by huggingface_hub) warns in any kernel without ipywidgets, with a
            # path of this machine in the message: noise, not something the notebook did.
            "PYTHONWARNINGS": joined(",", os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not "
                                                                            "found"),
        }
        # No kernel directories: "python3" is then ipykernel's own spec, which runs sys.executable,
        # never a `python3` kernel installed elsewhere (~/.local/share/jupyter) for another Python.
        kernels = KernelSpecManager(kernel_dirs=[])
        kernel = AsyncKernelManager(kernel_name="python3", kernel_spec_manager=kernels)
        client = NotebookClient(nb, km=kernel, timeout=CELL_TIMEOUT_S, record_timing=False,
                                resources={"metadata": {"path": str(workdir)}})
        client.execute(env=env)
    del nb.cells[cells:]
    return nb


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebooks", nargs="*", type=Path, help="default: every notebooks/*.ipynb")
    args = parser.parse_args(argv)
    for notebook in args.notebooks or sorted((ROOT / "notebooks").glob("*.ipynb")):
        with tempfile.TemporaryDirectory() as workdir:
            executed = execute(notebook, Path(workdir))
        with atomic_file(notebook) as out:
            out.write((nbformat.writes(executed) + "\n").encode())
        print(f"wrote {notebook} ({notebook.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
