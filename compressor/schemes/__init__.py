"""Schemes: how models learn together (vanilla, offline, online cohorts, self, chains)."""

from compressor.schemes.base import Scheme

__all__ = ["Scheme"]
