"""Distillation with boundary-supporting samples, BSS (Heo, Lee, Yun & Choi, AAAI 2019)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from compressor.batch import Batch
from compressor.features import FeatureTaps, ModelOutputs
from compressor.knowledge.base import KnowledgeLoss, LossContext, register_loss
from compressor.knowledge.hinton import soft_kl


@contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    """Run the teacher in eval mode (BN statistics untouched) and put back what it was."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@register_loss("bss", "response")
class BSSLoss(KnowledgeLoss):
    """Heo et al., "Knowledge Distillation with Adversarial Samples Supporting Decision Boundary",
    AAAI 2019 (Sec. 3, Eqs. 4-7), following the authors' code (bhheo/BSS_distillation).

    ``L = kd_ratio(e) * KD(x) + attack_ratio(e) * KD(x_bss)`` where KD is the KL between the
    teacher's and student's softmax at ``T = 3`` (no ``T^2``; the authors' soft cross-entropy,
    which differs from this KL by the teacher's entropy, a constant), and:

    * base samples: those that the teacher AND the student both classify correctly (the
      authors' train_BSS_distillation.py: ``attack_flag = condition1 & condition2``, teacher's
      and student's top-1 equal to the label); at most ``attack_fraction`` of the batch (64 of
      256 in the paper), preferring the largest teacher/student disagreement on the non-target
      classes, ``sum_{c != y} (p_t,c - p_s,c)^2``;
    * target class: drawn among the teacher's non-top classes with probability proportional to
      their softmax scores;
    * attack on the TEACHER (Eq. 5): ``steps = 10`` iterations of
      ``x <- x + eta * (f_b - f_k + 1e-4) * g / ||g||_2`` with ``g = grad_x (f_k - f_b)``,
      ``eta = 0.3``, ``f_b``/``f_k`` the teacher's base/target logits; a sample stops once the
      teacher no longer predicts its base class; pixels are clipped to ``+-pixel_range`` (2.5,
      normalised CIFAR). The teacher runs in eval mode and gets no parameter gradient; each
      pass runs on the samples still moving only (a stopped sample never moves again), and the
      pass that stops a sample gives the teacher's logits at it, so only those still moving
      after the last step need one more teacher forward;
    * schedule over training, with ``e`` the 1-based epoch of ``E``:
      ``kd_ratio = kd_start - (kd_start - kd_end) * e / E`` (4 -> 1) and
      ``attack_ratio = attack_start * max(1 - e / (attack_until * E), 0)`` (2 -> 0 at 3/4).
      The epoch arrives through :meth:`set_epoch`; before any call the schedule's start is used.

    The loss runs the models itself (``needs_models``): the scheme calls :meth:`bind_models`.
    The extra student forward on ``x_bss`` runs in the student's current (train) mode.
    """

    needs_models = True
    default_weight = 1.0

    def __init__(
        self,
        ctx: LossContext,
        temperature: float = 3.0,
        attack_fraction: float = 0.25,
        steps: int = 10,
        step_size: float = 0.3,
        pixel_range: float = 2.5,
        kd_start: float = 4.0,
        kd_end: float = 1.0,
        attack_start: float = 2.0,
        attack_until: float = 0.75,
    ) -> None:
        super().__init__(ctx)
        if not 0 < attack_fraction <= 1:
            raise ValueError("bss: attack_fraction must be in (0, 1]")
        self.temperature = float(temperature)
        self.attack_fraction = float(attack_fraction)
        self.steps, self.step_size, self.pixel_range = int(steps), float(step_size), float(pixel_range)
        self.kd_start, self.kd_end = float(kd_start), float(kd_end)
        self.attack_start, self.attack_until = float(attack_start), float(attack_until)
        self.kd_ratio, self.attack_ratio = self.kd_start, self.attack_start
        self._student: FeatureTaps | None = None  # plain attributes: the models are not sub-modules
        self._teacher: FeatureTaps | None = None

    def bind_models(self, student: FeatureTaps, teacher: FeatureTaps) -> None:
        self._student, self._teacher = student, teacher

    def set_epoch(self, epoch: int, num_epochs: int) -> None:
        progress = (epoch + 1) / max(num_epochs, 1)
        self.kd_ratio = self.kd_start - (self.kd_start - self.kd_end) * min(progress, 1.0)
        self.attack_ratio = self.attack_start * max(1.0 - progress / self.attack_until, 0.0)

    # -- the three parts of the method, public so they can be checked one by one ---------------

    def select(self, student_logits: Tensor, teacher_logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        """Indices of the base samples (right for teacher and student) and the target class drawn for each."""
        t_logits, s_logits = teacher_logits.detach().float(), student_logits.detach().float()
        both_right = (t_logits.argmax(dim=1) == labels) & (s_logits.argmax(dim=1) == labels)
        idx = both_right.nonzero().flatten()
        limit = max(1, round(self.attack_fraction * labels.shape[0]))
        p_t = F.softmax(t_logits[idx], dim=1)
        if idx.numel() > limit:
            diff = (p_t - F.softmax(s_logits[idx], dim=1)).pow(2)
            score = diff.sum(dim=1) - diff.gather(1, labels[idx, None]).squeeze(1)
            keep = score.argsort(descending=True)[:limit]
            idx, p_t = idx[keep], p_t[keep]
        scores, classes = p_t.sort(dim=1, descending=True)
        scores, classes = scores[:, 1:], classes[:, 1:]
        # tiny floor: a confident teacher's non-top scores can underflow to zero in float32
        pick = torch.multinomial(scores + 1e-12, 1) if idx.numel() else scores.new_zeros(0, 1, dtype=torch.long)
        return idx, classes.gather(1, pick).squeeze(1)

    def attack(self, x: Tensor, target: Tensor) -> Tensor:
        """Move ``x`` toward the teacher's boundary between its predicted class and ``target``."""
        return self._attack(x, target)[0]

    def _attack(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(the attacked samples, the teacher's float logits at them where known, the indices of
        the samples whose logits are not known: those still moving after the last step).

        A sample stops for good once the teacher no longer predicts its base class: its step is
        zero from then on, so it never moves again, and in eval mode the teacher sees each sample
        on its own. So each pass runs on the samples still moving only, and the pass that stops
        a sample gives its final logits; only the samples still moving at the end need another
        teacher forward.
        """
        teacher = self._require(self._teacher)
        x_adv = x.detach().clone()
        live = torch.arange(x.shape[0], device=x.device)  # the samples still moving
        logits_at_end = x.new_empty(0)
        base = target
        with _eval_mode(teacher.model), torch.enable_grad():
            for step in range(self.steps):
                rows = live
                x_rows = x_adv[rows].requires_grad_(True)
                logits = teacher(x_rows).logits.float()
                if step == 0:
                    base = logits.argmax(dim=1).detach()  # every sample is active at its start
                    logits_at_end = logits.new_empty(logits.shape)
                active = logits.argmax(dim=1) == base[rows]
                all_active = bool(active.all())
                if not all_active:
                    logits_at_end[rows[~active]] = logits.detach()[~active]
                    live = rows[active]
                    if live.numel() == 0:
                        break
                f_b = logits.gather(1, base[rows, None]).squeeze(1)
                f_k = logits.gather(1, target[rows, None]).squeeze(1)
                (grad,) = torch.autograd.grad((f_k - f_b).sum(), x_rows)
                norm = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
                scale = self.step_size * ((f_b - f_k).detach() + 1e-4) / norm
                moved = (x_rows.detach() + scale.view(-1, *([1] * (x.dim() - 1))) * grad).clamp(
                    -self.pixel_range, self.pixel_range
                )
                x_adv[live] = moved if all_active else moved[active]
        return x_adv, logits_at_end, live

    def forward(self, student: ModelOutputs, teacher: ModelOutputs, batch: Batch) -> Tensor:
        loss = self.kd_ratio * soft_kl(student.logits, teacher.logits, self.temperature)
        if self.attack_ratio <= 0:
            return loss
        idx, target = self.select(student.logits, teacher.logits, batch.y)
        if idx.numel() == 0:
            return loss
        x_bss, t_logits, moving = self._attack(batch.x[idx], target)
        if moving.numel():
            t_model = self._require(self._teacher)
            with torch.no_grad(), _eval_mode(t_model.model):
                last = t_model(x_bss[moving]).logits.float()
            t_logits = last if moving.numel() == x_bss.shape[0] else t_logits.index_copy(0, moving, last)
        s_logits = self._require(self._student)(x_bss).logits
        return loss + self.attack_ratio * soft_kl(s_logits, t_logits, self.temperature)

    @staticmethod
    def _require(taps: FeatureTaps | None) -> FeatureTaps:
        if taps is None:
            raise RuntimeError("bss runs the models itself: the scheme must call bind_models(student, teacher)")
        return taps
