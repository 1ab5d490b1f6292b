"""The data flows down the module map: no giblet module imports one from a later notebook, and no package imports
another that imports it back."""
import ast
import json
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _order()->dict:
    "Each exported module and the number of the notebook that writes it (`nbs/<stage>/NN_*.ipynb`)."
    out = {}
    for nb in sorted((ROOT / "nbs").glob("*/[0-9][0-9]_*.ipynb")):
        for c in json.loads(nb.read_text())["cells"]:
            m = re.search(r"^#\|\s*default_exp\s+(\S+)", "".join(c["source"]), re.M)
            if m: out["giblet." + m[1]] = int(nb.name[:2]); break
    return out


def _imports(module:str)->set:
    "Every giblet module that `module` imports, at the top or inside a function."
    path = ROOT / (module.replace(".", "/") + ".py")
    tree, pkg, found = ast.parse(path.read_text()), module.split(".")[:-1], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level: base = ".".join(pkg[:len(pkg) - node.level + 1] + ([base] if base else []))
            names = [base] + [f"{base}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import): names = [a.name for a in node.names]
        else: continue
        found |= {n for n in names if n.startswith("giblet.")}
    return found


def test_every_notebook_module_is_known():
    order = _order()
    assert {"giblet.io", "giblet.alignment.sync", "giblet.dataset", "giblet.synthetic", "giblet.cli"} <= set(order), sorted(order)


def test_no_module_imports_a_later_one():
    order = _order()
    late = [f"{m} (notebook {order[m]:02d}) imports {d} (notebook {order[d]:02d})"
            for m in order for d in _imports(m) if d in order and order[d] > order[m]]
    assert not late, "\n".join(late)


def test_packages_do_not_import_each_other_back():
    "giblet.data must not reach giblet.alignment while giblet.alignment reads giblet.data (the cycle this rule ended)."
    order = _order()
    pkg = lambda m: ".".join(m.split(".")[:2])
    edges = {(pkg(m), pkg(d)) for m in order for d in _imports(m) if d in order and pkg(d) != pkg(m)}
    cycles = sorted(f"{a} <-> {b}" for a, b in edges if (b, a) in edges and a < b)
    assert not cycles, cycles


def test_a_late_import_is_caught(tmp_path, monkeypatch):
    "The check itself: a data reader importing the trainer is reported."
    real = _imports
    monkeypatch.setitem(globals(), "_imports", lambda m: real(m) | ({"giblet.training.trainer"} if m == "giblet.data.fmri" else set()))
    with pytest.raises(AssertionError, match="giblet.data.fmri"): test_no_module_imports_a_later_one()


def _sidebar()->list:
    "The docs sidebar's pages in order (`nbs/sidebar.yml`), sections flattened."
    def walk(items): return [p for i in items for p in (walk(i["contents"]) if isinstance(i, dict) else [i])]
    return walk(yaml.safe_load((ROOT / "nbs" / "sidebar.yml").read_text())["website"]["sidebar"]["contents"])


def test_the_sidebar_lists_every_notebook_once_in_layer_order():
    "The notebook list alone tells where each stage lives: every notebook is in the sidebar once, numbers rising."
    pages = _sidebar()
    nbs = sorted(p.relative_to(ROOT / "nbs").as_posix() for p in (ROOT / "nbs").rglob("*.ipynb")
                 if not any(part.startswith((".", "_")) for part in p.relative_to(ROOT / "nbs").parts))
    assert sorted(pages) == nbs, f"missing from nbs/sidebar.yml: {sorted(set(nbs) - set(pages))}; " \
                                 f"listed but absent: {sorted(set(pages) - set(nbs))}; twice: {sorted({p for p in pages if pages.count(p) > 1})}"
    numbers = [int(Path(p).name[:2]) for p in pages if re.match(r"\d\d_", Path(p).name)]
    assert numbers == sorted(numbers), f"the sidebar's numbered notebooks are out of order: {numbers}"
    folders = [Path(p).parent.name for p in pages if re.match(r"\d\d_", Path(p).name)]
    assert all(f for f in folders), "a numbered notebook sits at the top of nbs/, outside any stage folder"
