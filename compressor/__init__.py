"""Training core of kdcompress: model zoo, feature taps, cost, checkpoints, data, losses, schemes, trainer.

This layer never imports ``recipes`` or ``export``.
"""

from compressor.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
