"""The docs site, checked without Quarto: nbdev processes every notebook, nbconvert renders it to HTML.

Quarto cannot be installed on the CI machine, so this is the offline stand-in for `nbdev_docs`: the same
nbdev processors run (show_doc cells added and executed, directives stripped), then each page is rendered.
"""
import importlib
import logging
import re
import shutil
from pathlib import Path

import nbformat
import pytest
from nbconvert import HTMLExporter

from conftest import ROOT

# the slow lane: every notebook's doc cells run again and every page is rendered (about a minute)
pytestmark = pytest.mark.slow

TRACEBACK = re.compile(r"Traceback \(most recent call last\)|\w+Error: ")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    "Process the notebooks with nbdev (`proc_nbs`) and render each to HTML; returns {notebook: html}."
    from nbdev.config import get_config
    from nbdev.serve import proc_nbs
    cfg = get_config(path=ROOT)
    # two worker processes: the slow lane runs one test at a time, and CI's second core would idle through the notebooks
    proc = proc_nbs(path=str(cfg.nbs_path), n_workers=2, force=True)
    exporter = HTMLExporter(template_name="basic")
    pages = {}
    for nb_path in sorted(Path(proc).rglob("*.ipynb")):
        nb = nbformat.read(nb_path, as_version=4)
        html, _ = exporter.from_notebook_node(nb)
        pages[nb_path.relative_to(proc).as_posix()] = html
    out = tmp_path_factory.mktemp("site")
    for name, html in pages.items():
        dest = out / name.replace(".ipynb", ".html")
        dest.parent.mkdir(parents=True, exist_ok=True)
        dest.write_text(html)
    yield pages
    shutil.rmtree(proc, ignore_errors=True)


def exported_names():
    "Every public name the package exports, module by module, from nbdev's index."
    from giblet._modidx import d
    names = {}
    for mod in d["syms"]:
        m = importlib.import_module(mod)
        names[mod] = [n for n in getattr(m, "__all__", [])
                      if not n.startswith("_") and not isinstance(getattr(m, n), logging.Logger)]
    return names


def test_every_notebook_renders(rendered):
    nbs = {p.relative_to(ROOT / "nbs").as_posix() for p in (ROOT / "nbs").rglob("*.ipynb")
           if not any(part.startswith((".", "_")) for part in p.relative_to(ROOT / "nbs").parts)}
    assert nbs and nbs <= set(rendered), f"not rendered: {sorted(nbs - set(rendered))}"
    for name, html in rendered.items():
        assert len(html) > 1000, name
        assert 'class="output_error"' not in html and "jp-RenderedText\" data-mime-type=\"application/vnd.jupyter.stderr" not in html, name
        assert not TRACEBACK.search(html), f"{name}: an error or traceback is in the rendered page"


def test_every_public_name_is_documented(rendered):
    text = "\n".join(rendered.values())
    missing = [f"{mod}.{n}" for mod, ns in exported_names().items() for n in ns if n not in text]
    assert not missing, f"exported but absent from the rendered docs: {missing}"
