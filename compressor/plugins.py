"""Registries fill themselves: a package imports every module in it, and each module registers.

That is what makes adding a model family, a loss, a scheme, an aggregator or a command one new
file: nothing else is edited. Modules whose name starts with ``_`` are helpers, not plugins.
"""

from __future__ import annotations

import importlib
import pkgutil
from types import ModuleType
from typing import Iterable


def import_submodules(package: str, path: Iterable[str], skip: Iterable[str] = ()) -> list[ModuleType]:
    """Import ``package.<name>`` for every module found in ``path`` (a package's ``__path__``)."""
    skipped = set(skip)
    return [
        importlib.import_module(f"{package}.{info.name}")
        for info in pkgutil.iter_modules(path)
        if info.name not in skipped and not info.name.startswith("_")
    ]
