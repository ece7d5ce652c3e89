"""Aggregators: how a cohort's peers are combined into a training-time teacher, one module each.

``dml`` (mutual learning), ``one`` (gated native ensemble), ``pcl`` (peer ensemble + temporal-mean
peers), ``attention`` (the attention-weighted ensemble), ``fc`` (a dense layer over the logits),
``wavg`` (learnable simplex weights). The cohort scheme and ModReduce build them by name.
"""


from compressor.plugins import import_submodules
from compressor.schemes.aggregators.base import (
    Aggregate,
    Aggregator,
    aggregator_class,
    aggregator_params,
    build_aggregator,
    list_aggregators,
    register_aggregator,
    sigmoid_rampup,
    soft_kl,
)

import_submodules(__name__, __path__, skip=("base",))

__all__ = [
    "Aggregate",
    "Aggregator",
    "aggregator_class",
    "aggregator_params",
    "build_aggregator",
    "list_aggregators",
    "register_aggregator",
    "sigmoid_rampup",
    "soft_kl",
]
