"""Lazy re-exports for package `__init__` modules.

A package's `__init__` runs whenever any of its modules is imported, so re-exporting the heavy
modules eagerly (torch, transformers) made `bpo --help` import them just to read the config
schemas. `lazy_exports` keeps `from bpo.models import load_model_and_processor` working while
importing the defining module only on first access (PEP 562 module `__getattr__`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """`__getattr__` and `__dir__` for `package`, resolving each name from its module.

    exports: public name -> the submodule (relative to `package`) that defines it.
    """
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(exports))

    return __getattr__, __dir__
