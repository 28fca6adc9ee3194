"""``make demo``: run the quickstart notebook end to end and keep what it produced.

Executes ``example_notebooks/01_quickstart.ipynb`` in a real Jupyter kernel and writes the executed
notebook, the ε plot and the encrypted model into ``demo-output/``, then prints their paths and the
final ε and accuracy.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    import nbformat
    from nbclient import NotebookClient

    root = Path(__file__).resolve().parent.parent
    notebook = root / "example_notebooks" / "01_quickstart.ipynb"
    out_dir = Path(os.environ.get("KPRIVACY_NB_DEMO_OUT", root / "demo-output")).resolve()
    out_dir.mkdir(exist_ok=True)
    nb = nbformat.read(notebook, as_version=4)
    env = dict(os.environ, KPRIVACY_NB_DEMO_OUT=str(out_dir))
    start = time.perf_counter()
    print(f"Running {notebook.relative_to(root)} in a Jupyter kernel…", flush=True)
    client = NotebookClient(
        nb, timeout=1800, kernel_name="python3", resources={"metadata": {"path": str(out_dir)}}
    )
    client.execute(env=env)
    executed = out_dir / "01_quickstart.executed.ipynb"
    nbformat.write(nb, executed)
    summary_file = out_dir / "summary.json"
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else {}
    print(f"Done in {time.perf_counter() - start:.0f}s.")
    print(f"  executed notebook: {executed}")
    for key in ("epsilon_plot", "encrypted_model"):
        if key in summary:
            print(f"  {key.replace('_', ' ')}: {summary[key]}")
    for key in ("epsilon", "delta", "dp_accuracy", "non_dp_accuracy"):
        if key in summary:
            print(f"  {key}: {summary[key]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
