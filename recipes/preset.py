"""Presets: a plan written ahead (bundled in ``recipes/presets/`` or any plan YAML), its blanks
filled from the command line, which wins where both speak.

A preset is read once, where the user names it (:func:`load_preset`, into a :class:`Preset`); the
request carries it to the one planner, which fills it (:func:`recipes.planner.preset_plan`).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import yaml

from compressor.errors import UserError

if TYPE_CHECKING:
    from compressor.data.corruptions import Corruption


@dataclass(frozen=True)
class Preset:
    """A plan YAML as read: its name, and the mapping (teacher and data may be left blank)."""

    name: str
    raw: Mapping[str, Any]

    @property
    def teacher(self) -> str | None:
        """A saved plan names its teacher."""
        return self.raw.get("teacher")

    @property
    def corruption(self) -> "Corruption":
        """And its training-label corruptions."""
        from compressor.data.corruptions import Corruption

        return Corruption.from_dict(self.raw.get("corruption"))


def load_preset(name_or_path: str) -> Preset:
    """A bundled preset by name, or a plan YAML file."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"preset file {path} does not exist")
        text = path.read_text()
    else:
        bundled = resources.files("recipes") / "presets" / f"{name_or_path}.yaml"
        if not bundled.is_file():
            raise UserError(f"unknown preset {name_or_path!r}; bundled: {', '.join(list_presets())}")
        text = bundled.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise UserError(f"preset {name_or_path} is not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise UserError(f"preset {name_or_path} is not a plan (a YAML mapping with 'stages')")
    return Preset(name_or_path, data)


def list_presets() -> list[str]:
    folder = resources.files("recipes") / "presets"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))

