"""Notebook hygiene the docs render depends on.

nbdev's docs processing (`exec_show_docs`) executes every cell that holds an import, besides the export cells, so a test
cell that imports something runs a second time in the docs render, without the cells before it. Imports belong in the
notebook's hidden import cell (`#| hide`); the README's tour (`index.ipynb`) and the tutorials are read as scripts and keep
theirs."""
import ast
import re

import nbformat

from conftest import ROOT

SCRIPTS = ("index.ipynb", "tutorials/", "explanations/")   # pages a reader runs top to bottom, imports and all


def _code(src:str)->str:
    "A cell's Python, its `#|` directives and shell/magic lines dropped."
    return "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("#|", "%", "!")))


def mixed_cells(nbs=None)->list:
    "Cells, outside export and hidden cells, that hold an import beside other code: `(notebook, cell index, first line)`."
    out = []
    for p in nbs or sorted((ROOT / "nbs").rglob("*.ipynb")):
        rel = p.relative_to(ROOT / "nbs").as_posix() if p.is_relative_to(ROOT / "nbs") else p.name
        if rel.startswith(SCRIPTS) or any(part.startswith((".", "_")) for part in p.parts): continue
        for i, c in enumerate(nbformat.read(p, as_version=4).cells):
            if c.cell_type != "code" or re.match(r"\s*#\|\s*(export|exporti|exports|hide|default_exp)\b", c.source): continue
            try: nodes = list(ast.walk(ast.parse(_code(c.source))))
            except SyntaxError: continue
            if any(isinstance(n, (ast.Import, ast.ImportFrom)) for n in nodes) and any(isinstance(n, (ast.Expr, ast.Assign)) for n in nodes):
                out.append((rel, i, c.source.splitlines()[0]))
    return out


def test_no_test_cell_imports(tmp_path):
    assert not mixed_cells(), "cells that the docs render would run again; move their imports to the hidden import cell:\n" + \
        "\n".join(f"{n} cell {i}: {line}" for n, i, line in mixed_cells())
    bad = tmp_path / "nb.ipynb"   # the check itself: a test cell that imports is found
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import time\nt0 = time.time()")]), bad)
    assert [i for _, i, _ in mixed_cells([bad])] == [0]
