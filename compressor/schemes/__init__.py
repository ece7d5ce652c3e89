"""Schemes: how models learn together (vanilla, offline, online cohorts, self, chains).

Every module in this package registers its builders on import (``@register_scheme``).
"""


from compressor.plugins import import_submodules
from compressor.schemes.base import Scheme
from compressor.schemes.registry import SchemeRequest, build_scheme, list_schemes, register_scheme

import_submodules(__name__, __path__, skip=("base", "registry"))

from compressor.schemes.vanilla import Vanilla  # noqa: E402

__all__ = ["Scheme", "SchemeRequest", "Vanilla", "build_scheme", "list_schemes", "register_scheme"]
