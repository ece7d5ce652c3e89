"""Zoo families (CIFAR ResNet, WRN, ResNet8x4, a torchvision ResNet) export with dynamo and pass parity.

The families are split over test_export_families.py and test_export_families_mobile.py so that
each file stays under a minute: a dynamo export takes several seconds per model.
"""

from __future__ import annotations

import pytest

from _export_models import check_family_export


@pytest.mark.parametrize("arch", ['resnet20', 'wrn_16_2', 'resnet8x4', 'tv:resnet18'])
def test_zoo_family_exports_with_parity(arch, tmp_path):
    check_family_export(arch, tmp_path)
