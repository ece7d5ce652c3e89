"""The teacher-class network's deployable: n small students plus one output layer, as ONE model.

Malik et al., "Teacher-Class Network: A Neural Network Compression Mechanism", BMVC 2021
(arXiv:2004.03281), Fig. 1: the teacher's dense representation (the vector that feeds its
classifier) is cut into n chunks; student i regresses chunk i; at inference the students' outputs
are concatenated and fed to an output layer initialised from the teacher's classifier. Everything
that runs at inference is inside :class:`TeacherClassEnsemble`, so its FLOPs, parameters and ONNX
graph count all of it.

A student is any zoo architecture built with ``num_classes = chunk size``: its final linear layer
IS the chunk regressor, as in the authors' code (github.com/musab-r/TCN: each student ends in a
``Dense(chunk)`` trained with MSE). Our regressors are linear; the authors' Keras students put a
ReLU on that layer, which only matches a teacher whose dense vector is itself post-ReLU.

Chunks are contiguous slices ``[b_i, b_{i+1})`` of the embedding, in order, as in the authors' code.
When n does not divide the dimension D, the remainder r = D mod n is spread one extra dimension to
each of the FIRST r chunks (sizes ``ceil(D/n)`` then ``floor(D/n)``), so every dimension is
covered exactly once.

Names: ``tcn<n>_d<D>_<student>``, e.g. ``tcn4_d64_resnet8`` (4 ResNet-8 students regressing a
64-dimensional embedding), so a checkpoint rebuilds the ensemble from its arch name alone. Not in
the budget-search grid: it exists only as the output of the ``tcn`` scheme.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
import torch.nn as nn
from torch import Tensor

from compressor.errors import UserError
from compressor.models.registry import register_pattern

FAMILY = "teacher_class"
NAME_RE = r"tcn(\d+)_d(\d+)_(.+)"


def chunk_sizes(dim: int, count: int) -> list[int]:
    """Sizes of ``count`` contiguous chunks covering ``dim`` dimensions; the first ``dim % count`` get one more."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise UserError(f"the teacher-class network needs at least 1 student (got {count!r})")
    if count > dim:
        raise UserError(
            f"{count} students cannot share a {dim}-dimensional embedding (each needs at least one "
            f"dimension): use at most {dim} students"
        )
    base, extra = divmod(dim, count)
    return [base + 1 if i < extra else base for i in range(count)]


def chunk_bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` of each chunk: consecutive, from 0 to the embedding's dimension."""
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def ensemble_arch_name(students: int, dim: int, student: str) -> str:
    """The zoo name that rebuilds an ensemble, e.g. ``tcn4_d64_resnet8``."""
    return f"tcn{int(students)}_d{int(dim)}_{student}"


class TeacherClassEnsemble(nn.Module):
    """``output(concat(student_1(x), ..., student_n(x)))``: the students' chunks make the embedding.

    Declares no stages (its students' feature maps are not one hierarchy); ``output``'s input is
    the pooled embedding, so feature taps read the concatenated chunks, which is what the next
    level of a hierarchical teacher-class network regresses.
    """

    stage_names: tuple[str, ...] = ()
    stem_name = None
    classifier_name = "output"

    def __init__(self, students: Sequence[nn.Module], chunks: Sequence[int], num_classes: int) -> None:
        super().__init__()
        if len(students) != len(chunks) or not students:
            raise ValueError("one chunk size per student, at least one student")
        self.students = nn.ModuleList(students)
        self.chunks = tuple(int(c) for c in chunks)
        self.output = nn.Linear(sum(self.chunks), num_classes)

    @property
    def embedding_dim(self) -> int:
        return sum(self.chunks)

    def embed(self, x: Tensor) -> Tensor:
        """The concatenated student outputs (N, D), before the output layer."""
        return torch.cat([student(x) for student in self.students], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.output(self.embed(x))

    def init_output_from(self, classifier: nn.Module) -> None:
        """Copy a teacher's classifier into the output layer (the paper's initialisation)."""
        if not isinstance(classifier, nn.Linear):
            raise UserError(
                f"the teacher's classifier is a {type(classifier).__name__}, not one linear layer: the "
                "teacher-class network initialises its output layer from the teacher's linear classifier"
            )
        want = (self.output.out_features, self.output.in_features)
        if (classifier.out_features, classifier.in_features) != want:
            raise UserError(
                f"the teacher's classifier maps {classifier.in_features} -> {classifier.out_features}, but the "
                f"ensemble's output layer maps {want[1]} -> {want[0]} (embedding -> classes): the teacher's "
                "embedding must feed its class scores directly"
            )
        with torch.no_grad():
            self.output.weight.copy_(classifier.weight)
            if classifier.bias is not None:
                self.output.bias.copy_(classifier.bias)
            else:
                self.output.bias.zero_()


def teacher_class_network(
    *, students: int, dim: int, student: str, num_classes: int = 100, in_chans: int = 3
) -> TeacherClassEnsemble:
    """``students`` zoo models ``student``, each regressing its chunk of a ``dim``-dimensional embedding."""
    from compressor.models.registry import create

    sizes = chunk_sizes(dim, students)
    members = [create(student, num_classes=size, in_chans=in_chans) for size in sizes]
    return TeacherClassEnsemble(members, sizes, num_classes)


def _parse(match: re.Match[str]) -> dict:
    return {"students": int(match.group(1)), "dim": int(match.group(2)), "student": match.group(3)}


register_pattern(NAME_RE, teacher_class_network, family=FAMILY, parse=_parse, example="tcn4_d64_resnet8")
