"""Execute the analysis notebooks in place on a runs folder (default: the committed ``results/runs/mini``).

Outputs are stored with repository-relative paths and without stderr (progress-bar warnings),
so the committed notebooks show the plots on a fresh clone. ``tests/report/test_notebooks.py`` checks them.
"""

import argparse
import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", default=["singular_values", "sweeps"])
    args = parser.parse_args()
    os.environ.setdefault("MELORA_RUNS_DIR", "results/runs/mini")
    for name in args.names:
        path = ROOT / "notebooks" / f"{name}.ipynb"
        nb = nbformat.read(path, as_version=4)
        NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
        for cell in (c for c in nb.cells if c.cell_type == "code"):
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
            for out in cell.outputs:
                if "text" in out:
                    out.text = out.text.replace(f"{ROOT}/", "")
                for key, value in out.get("data", {}).items():
                    if key.startswith("text/") and isinstance(value, str):
                        out.data[key] = value.replace(f"{ROOT}/", "")
        nbformat.write(nb, path)
        print(f"{path.relative_to(ROOT)}: executed on {os.environ['MELORA_RUNS_DIR']}")


if __name__ == "__main__":
    main()
