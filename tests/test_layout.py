"""The package layout keeps its rules (docs/architecture.md): stages talk through their package,
nobody imports another module's private names, stages depend on each other one way, and the
architecture document names every module."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "bnfold"
STAGES = ("io", "folding", "verify", "calibration", "demo", "cli")
# Which stage may import which (the data flow: io <- folding <- verify <- calibration <- demo <- cli).
ALLOWED = {
    "io": set(),
    "folding": {"io"},
    "verify": {"io", "folding"},
    "calibration": {"io", "folding", "verify"},
    "demo": {"io", "folding", "verify", "calibration"},
    "cli": {"io", "folding", "verify", "calibration", "demo"},
}


def _imports():
    """(file, its stage or None, imported module, imported names) for every ``from bnfold...``."""
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).parts
        stage = parts[0] if len(parts) > 1 else None
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bnfold":
                yield path.relative_to(ROOT), stage, node.module, [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("bnfold."):
                        yield path.relative_to(ROOT), stage, alias.name, []


def _is_module(module: str, name: str) -> bool:
    """``from bnfold import _openmp``: a (private) module of the package, compiled or not, is not a
    private name of another module."""
    folder = ROOT.joinpath(*module.split("."))
    return (folder / f"{name}.py").exists() or (module == "bnfold" and (ROOT / "src_cy" / f"{name}.pyx").exists())


def test_the_walker_sees_the_imports():
    found = list(_imports())
    assert len(found) > 100
    assert any(module == "bnfold.io" for _, stage, module, _ in found if stage == "folding")


def test_stages_import_other_stages_only_through_their_package():
    wrong = []
    for path, stage, module, _ in _imports():
        parts = module.split(".")
        if len(parts) >= 3 and parts[1] in STAGES and parts[1] != stage:
            wrong.append(f"{path}: {module}")
    assert not wrong, "import the package (from bnfold.<stage> import name), not its modules:\n" + "\n".join(wrong)


def test_no_module_imports_private_names_of_another():
    wrong = []
    for path, _, module, names in _imports():
        for name in names:
            if name.startswith("_") and not name.startswith("__") and not _is_module(module, name):
                wrong.append(f"{path}: from {module} import {name}")
    assert not wrong, "make the name public where it is defined:\n" + "\n".join(wrong)


def test_stages_depend_on_each_other_one_way():
    wrong = []
    for path, stage, module, _ in _imports():
        target = module.split(".")[1] if module.count(".") >= 1 else None
        if stage in ALLOWED and target in STAGES and target != stage and target not in ALLOWED[stage]:
            wrong.append(f"{path}: {stage} imports {module}")
    assert not wrong, "\n".join(wrong)


def test_each_package_exports_what_the_other_stages_import():
    import importlib

    for _, stage, module, names in _imports():
        if module.count(".") != 1:
            continue
        target = module.split(".")[1]
        if target in STAGES and target != stage:
            package = importlib.import_module(module)
            for name in names:
                assert name in package.__all__, f"{module}.__all__ lacks {name!r}, which {stage or 'bnfold'} imports"


def test_architecture_names_every_module():
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    missing = [
        str(path.relative_to(ROOT))
        for path in sorted(PACKAGE.rglob("*.py"))
        if path.name not in ("__init__.py", "__main__.py", "_version.py") and path.name not in text
    ]
    assert not missing, f"docs/architecture.md does not mention {missing}"


def test_old_module_paths_still_import_with_a_deprecation_warning():
    import importlib
    import sys
    import warnings

    import bnfold
    from bnfold._moved import MOVED

    for old, new in MOVED.items():
        sys.modules.pop(old, None)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            module = importlib.import_module(old)
        assert module is importlib.import_module(new), old
        assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught), old
    from bnfold.zoo import build_demo_cnn

    assert build_demo_cnn is bnfold.demo.zoo.build_demo_cnn
    assert bnfold.fold is bnfold.folding.fold  # the aliases shadow no public function
