"""Zoo families (MobileNetV2, ShuffleV2) export with the default (dynamo) exporter and pass parity.

The families are split over test_export_families.py and test_export_families_mobile.py so that
each file stays under a minute: a dynamo export takes several seconds per model.
"""

from __future__ import annotations

import pytest

from _export_models import check_family_export


@pytest.mark.parametrize("arch", ['MobileNetV2', 'ShuffleV2'])
def test_zoo_family_exports_with_parity(arch, tmp_path):
    check_family_export(arch, tmp_path)
