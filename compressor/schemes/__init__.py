"""Schemes: how models learn together (vanilla, offline, online cohorts, self, chains).

Every module in this package registers its builders on import (``@register_scheme``).
"""

import importlib
import pkgutil

from compressor.schemes.base import Scheme
from compressor.schemes.registry import SchemeRequest, build_scheme, list_schemes, register_scheme

for _info in pkgutil.iter_modules(__path__):
    if _info.name not in ("base", "registry") and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

from compressor.schemes.vanilla import Vanilla  # noqa: E402

__all__ = ["Scheme", "SchemeRequest", "Vanilla", "build_scheme", "list_schemes", "register_scheme"]
