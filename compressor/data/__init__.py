"""Data sources by spec (``digits``, ``cifar10:DIR``, ``cifar100:DIR``, ``imagefolder:DIR``).

    src = load_source("cifar100:~/data", val_fraction=0.1, seed=0, device="cuda")
    for batch in src.loader("train", 128, shuffle=True, augment=True, epoch=e):
        ...  # batch.x normalised on the device, batch.y int64, batch.index = position in split
"""

from compressor.data.base import SPLITS, BatchLoader, DataSource, SplitOptions
from compressor.data.spec import (
    DataSpec,
    Protocol,
    data_help,
    list_sources,
    load_source,
    parse_spec,
    protocol_of,
    register_source,
    spec_forms,
)

__all__ = [
    "SPLITS",
    "BatchLoader",
    "DataSource",
    "DataSpec",
    "Protocol",
    "SplitOptions",
    "data_help",
    "list_sources",
    "load_source",
    "parse_spec",
    "protocol_of",
    "register_source",
    "spec_forms",
]
