"""Default training settings per dataset: what a stage trains with unless the plan says otherwise.

CIFAR follows the CRD/SemCKD benchmark protocol (Tian et al. 2020): SGD momentum 0.9, lr 0.05
(0.01 for MobileNetV2 and ShuffleNet students), 240 epochs, lr x0.1 at 150/180/210, batch 64,
weight decay 5e-4. Digits is the CPU-sized protocol: ResNet-110 reaches 97.5% test accuracy in
25 epochs (batch 32 gives 40 steps an epoch; the gradient norm is clipped at 1 because a 110-layer
ResNet starts with gradient norms near 90, which otherwise stall the first epochs).

Fashion-MNIST and MNIST (``fashion-mnist``, ``mnist``) get a CPU-sized protocol: batch 128, SGD
momentum 0.9 with Nesterov, lr 0.05, cosine to 0 over 10 epochs, weight decay 5e-4, gradient norm
clipped at 5: a guard, not a regulator (first epoch on 2,000 images, measured: ResNet-20's norm
peaks at 4.5, the BatchNorm-free osakd_fmnist_cnn's at 7.0). One epoch of the 54,000 training
images costs a ResNet-20 several minutes on one CPU thread; for a quick teacher use a subset
(``load_source("fashion-mnist", train_limit=12000)``) or fewer epochs. On a GPU run the full
protocol with ``--epochs 60`` (every other setting unchanged; the cosine stretches with it).
"""

from __future__ import annotations

from typing import Any

# Distillation stages of our own recipes clip the global gradient norm (unless the protocol clips
# already). Why, measured on Fashion-MNIST (12,000 images, resnet8 teacher, batch 64, each term at
# weight 1, one step at initialisation): the knowledge terms' gradient norms dwarf the CE's in a
# student without BatchNorm (osakd_fmnist_cnn: CE 0.77, hinton 1.57, crd 9.52) far more than in a BN
# ResNet (resnet_d8_w0.5: 0.59, 1.07, 1.34). CRD's loss ignores the scale of the student's embedding,
# so its gradient grows as 1 / |embedding|; Hinton's T^2-scaled gradient is about (z_s - z_t) / C.
# At lr 0.05 with Nesterov momentum those steps killed the LeNet: with hinton alone 84% of its last
# hidden ReLUs were dead after 25 steps (CE stuck at 2.3); with hinton+crd the total gradient norm
# reached 60 and the loss became NaN at step 25. Clipped at 5 (healthy steps measured 1-5) both
# learnt (CE 2.3 -> 0.6 in 200 steps); a one-epoch linear lr warm-up worked too, but cannot act
# in one-epoch stages. Reference presets (the CIFAR benchmark YAMLs) do not clip, as RepDistiller does not.
KD_GRAD_CLIP = 5.0

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
    "fashion-mnist": {
        "epochs": 10, "batch_size": 128, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
        "weight_decay": 5e-4, "schedule": "cosine", "grad_clip": 5.0,
    },
    "imagefolder": {
        "epochs": 90, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True,
        "weight_decay": 5e-4, "schedule": "cosine",
    },
}


PROTOCOLS["mnist"] = dict(PROTOCOLS["fashion-mnist"])  # same images and size; digits are easier, not different


def protocol_name(data_spec: str) -> str:
    """The protocol of a data spec: by its source name (``cifar10:DIR`` -> ``cifar``); a source
    without its own protocol (image folders, and any registered later) gets ``imagefolder``'s."""
    name = data_spec.split(":", 1)[0].strip().lower()
    return "cifar" if name.startswith("cifar") else name if name in PROTOCOLS else "imagefolder"


def default_train(data_spec: str, arch: str, family: str | None = None, *, distill: bool = False,
                  **overrides: Any) -> dict[str, Any]:
    """The protocol's settings for one stage; ``overrides`` (e.g. epochs) win when not None.

    ``distill``: the stage learns from a teacher, so its gradient norm is clipped at
    :data:`KD_GRAD_CLIP` unless the protocol clips already (see there why).
    """
    settings = dict(PROTOCOLS[protocol_name(data_spec)])
    if distill:
        settings.setdefault("grad_clip", KD_GRAD_CLIP)
    low_lr = (family or "").lower() in _LOW_LR_FAMILIES or arch.lower().startswith(("mobilenet", "shuffle"))
    if protocol_name(data_spec) == "cifar" and low_lr:
        settings["lr"] = 0.01
    settings.update({k: v for k, v in overrides.items() if v is not None})
    return settings
