"""Module paths of bnfold before the one-package-per-stage layout, still importable.

The docs of earlier releases told users to import ``bnfold.zoo``, ``bnfold.bench``,
``bnfold.model_io`` ... directly. ``import bnfold`` installs a finder that answers those names
with the module that holds the code now (the same module object, so ``bnfold.zoo.build_resnet``
is ``bnfold.demo.zoo.build_resnet``) and one ``DeprecationWarning`` naming the new path. Pickles
of reports made before the move load through the same aliases.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings

# old module -> where its code lives now
MOVED = {
    "bnfold.bench": "bnfold.verify.bench",
    "bnfold.fold_pass": "bnfold.folding.fold_pass",
    "bnfold.graph": "bnfold.folding.view",
    "bnfold.intermediates": "bnfold.verify.intermediates",
    "bnfold.model_io": "bnfold.io",
    "bnfold.parity": "bnfold.verify.parity",
    "bnfold.payloads": "bnfold.io.payloads",
    "bnfold.proto_wire": "bnfold.io.wire",
    "bnfold.zoo": "bnfold.demo.zoo",
}


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target

    def create_module(self, spec):
        return importlib.import_module(self.target)

    def exec_module(self, module):
        """The target module ran when it was imported; nothing to do."""


class MovedModuleFinder(importlib.abc.MetaPathFinder):
    """Finds the old names of ``MOVED`` (and nothing else)."""

    def find_spec(self, fullname, path=None, target=None):
        new = MOVED.get(fullname)
        if new is None:
            return None
        warnings.warn(f"{fullname} is now {new}; the old name will be removed", DeprecationWarning, stacklevel=2)
        return importlib.util.spec_from_loader(fullname, _AliasLoader(new))


def install() -> None:
    if not any(isinstance(finder, MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(MovedModuleFinder())
