"""The model zoo. Every module in this package registers its family on import.

Zoo models declare where their features live, so feature taps need no dry run:
  * ``stage_names``: names (as in ``named_modules()``) of the modules whose outputs are the
    stage feature maps, shallow to deep;
  * ``classifier_name``: the module whose *input* is the pooled embedding.
"""


from compressor.plugins import import_submodules
from compressor.models.registry import (
    ModelEntry,
    WidthScaling,
    add_model,
    aliases_of,
    canonical_name,
    create,
    families,
    list_models,
    model_family,
    register_alias,
    register_model,
    register_pattern,
    register_prefix,
    register_scaling,
    resolve,
    scaling_of,
)

import_submodules(__name__, __path__, skip=("registry",))

__all__ = [
    "ModelEntry",
    "WidthScaling",
    "add_model",
    "aliases_of",
    "canonical_name",
    "create",
    "families",
    "list_models",
    "model_family",
    "register_alias",
    "register_model",
    "register_pattern",
    "register_prefix",
    "register_scaling",
    "resolve",
    "scaling_of",
]
