"""One forward of a single zero sample to read a model's layers (op sizes, slow convs): in eval mode,
without gradients, on one thread, with every mode put back, so probing changes no state."""

from __future__ import annotations

from typing import Any, Callable

from compressor.threads import one_thread

Hook = Callable[[Any, tuple, Any], None]


def hooked_forward(model, input_shape: tuple[int, ...], hook: Hook, layer_types: tuple[type, ...]) -> bool:
    """Run ``model`` on ``zeros(1, *input_shape)`` with ``hook`` as a forward hook on every layer of
    ``layer_types``; False where the model cannot run on such an input (not an image model)."""
    import torch

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, layer_types)]
    modes = [(m, m.training) for m in model.modules()]
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        model.eval()
        with torch.no_grad(), one_thread():
            model(torch.zeros(1, *input_shape, device=device))
        return True
    except (RuntimeError, TypeError, ValueError, IndexError):
        return False
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in modes:
            module.training = mode
