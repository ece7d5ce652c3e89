"""Knowledge losses, one registry grouped by knowledge type (response, feature, relation, self).

Every module in this package registers its losses on import; adding a method is one file.
"""


from compressor.plugins import import_submodules
from compressor.knowledge.base import (
    KINDS,
    KnowledgeLoss,
    LossContext,
    build_loss,
    list_losses,
    loss_class,
    register_loss,
)

import_submodules(__name__, __path__, skip=("base",))

__all__ = ["KINDS", "KnowledgeLoss", "LossContext", "build_loss", "list_losses", "loss_class", "register_loss"]
