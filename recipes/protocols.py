"""Default training settings of a stage: its data source's protocol, the stage's own, the user's.

Each data source owns its protocol (:class:`compressor.data.Protocol`, declared where the source is
registered: CIFAR follows the CRD/SemCKD benchmark, digits, Fashion-MNIST and MNIST get CPU-sized
protocols, image folders an ImageNet-style one that also serves any source without its own). Here
they are layered: the protocol, then the scheme's own settings (ModReduce's Nesterov momentum, the
teacher-class network's Adam), then what the command line or the plan says, which always wins.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

from compressor.typecheck import given

if TYPE_CHECKING:
    from compressor.data import DataSpec

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


class _Protocols(Mapping[str, dict[str, Any]]):
    """Protocol name -> its settings, read from the data-source registry when asked."""

    def _all(self) -> dict[str, dict[str, Any]]:
        from compressor.data.spec import protocols

        return {name: dict(p.settings) for name, p in protocols().items()}

    def __getitem__(self, name: str) -> dict[str, Any]:
        return self._all()[name]

    def __iter__(self):
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


PROTOCOLS: Mapping[str, dict[str, Any]] = _Protocols()


def _source_name(data: str | DataSpec) -> str:
    return data.split(":", 1)[0].strip().lower() if isinstance(data, str) else data.name


def protocol_name(data: str | DataSpec) -> str:
    """The protocol of a data spec: its source's (``cifar10:DIR`` -> ``cifar``); a source without its
    own protocol (and any name no source registers) gets the fallback's."""
    from compressor.data import protocol_of

    return protocol_of(_source_name(data)).name


def default_train(data: str | DataSpec, arch: str, family: str | None = None, *, distill: bool = False,
                  scheme_defaults: Mapping[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    """The settings of one stage: the data's protocol, then ``scheme_defaults``, then ``overrides``
    (e.g. epochs) where not None.

    ``distill``: the stage learns knowledge terms from a teacher, so its gradient norm is clipped at
    :data:`KD_GRAD_CLIP` unless the protocol clips already (see there why).
    """
    from compressor.data import protocol_of

    protocol = protocol_of(_source_name(data))
    settings = dict(protocol.settings)
    if distill:
        settings.setdefault("grad_clip", KD_GRAD_CLIP)
    low_lr = (family or "").lower() in _LOW_LR_FAMILIES or arch.lower().startswith(("mobilenet", "shuffle"))
    if protocol.low_lr is not None and low_lr:
        settings["lr"] = protocol.low_lr
    settings.update(scheme_defaults or {})
    settings.update(given(overrides))
    return settings
