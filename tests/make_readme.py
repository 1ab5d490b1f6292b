"""Write README.md from nbs/index.ipynb without Quarto (`nbdev_readme` needs Quarto).

nbdev's own directive parser drops `#| hide` cells and strips directive lines; nbconvert writes the rest as
GitHub markdown. `python tests/make_readme.py` rewrites README.md; tests/test_readme.py checks it is current.
"""
import copy
from pathlib import Path

import nbformat
from nbconvert import MarkdownExporter
from nbdev.process import extract_directives

ROOT = Path(__file__).resolve().parents[1]


def readme_text(index=ROOT / "nbs" / "index.ipynb") -> str:
    "The README markdown that `index` renders to."
    nb = nbformat.read(index, as_version=4)
    keep = []
    for cell in nb.cells:
        cell = copy.deepcopy(cell)
        if cell.cell_type == "code":
            dirs = extract_directives(cell, remove=True)
            if "hide" in dirs or "exec_doc" in dirs or not cell.source.strip(): continue
        keep.append(cell)
    nb.cells = keep
    body, _ = MarkdownExporter().from_notebook_node(nb)
    return body.strip() + "\n"


if __name__ == "__main__":
    (ROOT / "README.md").write_text(readme_text())
    print("wrote README.md")
