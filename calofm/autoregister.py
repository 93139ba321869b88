"""``import calofm`` makes ``transformers.AutoModel.from_pretrained`` know CaloDiT models, without importing
transformers (and torch) itself: ``calofm --help`` stays fast.

If transformers is already imported, the registration (``calofm.models``) runs now; otherwise a finder on
``sys.meta_path`` waits for the first ``import transformers`` and runs it right after transformers has loaded.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys

TARGET = "transformers"


class _AfterTransformers(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the real loader of ``transformers`` so calofm.models registers afterwards."""

    def find_spec(self, name, path=None, target=None):
        if name != TARGET:
            return None
        sys.meta_path.remove(self)  # once; and the real finders below find the real spec
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            importlib.import_module("calofm.models")  # AutoConfig/AutoModel.register

        spec.loader.exec_module = exec_then_register
        return spec


def install() -> None:
    if TARGET in sys.modules:
        importlib.import_module("calofm.models")
    elif not any(isinstance(f, _AfterTransformers) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterTransformers())
