"""Default training settings per dataset: what a stage trains with unless the plan says otherwise.

CIFAR follows the CRD/SemCKD benchmark protocol (Tian et al. 2020): SGD momentum 0.9, lr 0.05
(0.01 for MobileNetV2 and ShuffleNet students), 240 epochs, lr x0.1 at 150/180/210, batch 64,
weight decay 5e-4. Digits is the CPU-sized protocol: ResNet-110 reaches 97.5% test accuracy in
25 epochs (batch 32 gives 40 steps an epoch; the gradient norm is clipped at 1 because a 110-layer
ResNet starts with gradient norms near 90, which otherwise stall the first epochs).
"""

from __future__ import annotations

from typing import Any

_LOW_LR_FAMILIES = ("mobilenetv2", "shufflenetv1", "shufflenetv2", "shufflev1", "shufflev2")

PROTOCOLS: dict[str, dict[str, Any]] = {
    "cifar": {
        "epochs": 240, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False,
        "weight_decay": 5e-4, "schedule": "step", "milestones": [150, 180, 210], "gamma": 0.1,
    },
    "digits": {
        "epochs": 25, "batch_size": 32, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True,
        "weight_decay": 5e-4, "schedule": "cosine", "grad_clip": 1.0,
    },
    "imagefolder": {
        "epochs": 90, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
        "weight_decay": 5e-4, "schedule": "cosine",
    },
}


def protocol_name(data_spec: str) -> str:
    name = data_spec.split(":", 1)[0].lower()
    return "cifar" if name.startswith("cifar") else name if name in PROTOCOLS else "imagefolder"


def default_train(data_spec: str, arch: str, family: str | None = None, **overrides: Any) -> dict[str, Any]:
    """The protocol's settings for one stage; ``overrides`` (e.g. epochs) win when not None."""
    settings = dict(PROTOCOLS[protocol_name(data_spec)])
    low_lr = (family or "").lower() in _LOW_LR_FAMILIES or arch.lower().startswith(("mobilenet", "shuffle"))
    if protocol_name(data_spec) == "cifar" and low_lr:
        settings["lr"] = 0.01
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings
