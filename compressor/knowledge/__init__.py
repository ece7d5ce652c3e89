"""Knowledge losses, one registry grouped by knowledge type (response, feature, relation, self).

Every module in this package registers its losses on import; adding a method is one file.
"""

import importlib
import pkgutil

from compressor.knowledge.base import (
    KINDS,
    KnowledgeLoss,
    LossContext,
    build_loss,
    list_losses,
    loss_class,
    register_loss,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.name != "base" and not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["KINDS", "KnowledgeLoss", "LossContext", "build_loss", "list_losses", "loss_class", "register_loss"]
