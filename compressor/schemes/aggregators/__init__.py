"""Aggregators: how a cohort's peers are combined into a training-time teacher, one module each.

``dml`` (mutual learning), ``one`` (gated native ensemble), ``pcl`` (peer ensemble + temporal-mean
peers), ``attention`` (the attention-weighted ensemble), ``fc`` (a dense layer over the logits),
``wavg`` (learnable simplex weights). The cohort scheme and ModReduce build them by name.
"""

import importlib
import pkgutil

from compressor.schemes.aggregators.base import (
    Aggregate,
    Aggregator,
    aggregator_class,
    build_aggregator,
    list_aggregators,
    register_aggregator,
    sigmoid_rampup,
    soft_kl,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "Aggregate",
    "Aggregator",
    "aggregator_class",
    "build_aggregator",
    "list_aggregators",
    "register_aggregator",
    "sigmoid_rampup",
    "soft_kl",
]
