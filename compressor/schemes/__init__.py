"""Schemes: how models learn together (vanilla, offline, online cohorts, self, chains)."""

from compressor.schemes.base import Scheme
from compressor.schemes.vanilla import Vanilla

__all__ = ["Scheme", "Vanilla"]
