"""Run one notebook to its end headlessly, as Kaggle's batch runner does: `python -m ... NOTEBOOK CWD`.

The server starts this in the Kaggle-like environment it built; the kernel and every `!`
command in it inherit that environment. Executed cells are written back next to the input
(`executed.ipynb`) for the test's messages. Exit 0 if every cell ran, 1 otherwise.
"""

from __future__ import annotations

import sys
from pathlib import Path

import nbclient
import nbformat

CELL_TIMEOUT_S = 300


def main(notebook: str, cwd: str) -> int:
    nb = nbformat.read(notebook, as_version=4)
    client = nbclient.NotebookClient(nb, timeout=CELL_TIMEOUT_S, kernel_name="python3",
                                     resources={"metadata": {"path": cwd}})  # fmt: skip
    try:
        client.execute()
        return 0
    except nbclient.exceptions.CellExecutionError as exc:
        print(exc, file=sys.stderr)
        return 1
    finally:
        nbformat.write(nb, str(Path(notebook).with_name("executed.ipynb")))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
