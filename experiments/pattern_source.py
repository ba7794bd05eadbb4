"""Any block or N:M pattern as an option of the ``pattern`` config group, without a file for each.

``conf/pattern/`` holds a YAML file for the common patterns; this Hydra config source answers for every other
``NxM`` block and ``NinM`` (N:M) name, so that ``pattern=8x1``, ``pattern=1x1`` or ``pattern=3in8`` (and sweeps
over them) compose like the files do. ``conf/train.yaml`` puts it on the search path (``lp-pattern://``);
importing ``experiments`` registers it.
"""

from __future__ import annotations

import re
from typing import Any

from hydra.core.object_type import ObjectType
from hydra.core.plugins import Plugins
from hydra.plugins.config_source import ConfigLoadError, ConfigResult, ConfigSource
from omegaconf import OmegaConf

GROUP = "pattern"
_NAME = re.compile(r"(\d+)(x|in)(\d+)")


def pattern_node(name: str) -> dict[str, Any] | None:
    """The config of pattern option ``name`` (``"8x1"``, ``"1x1"``, ``"3in8"``), or None if it names none.

    Example:
        >>> pattern_node("3in8")
        {'_target_': 'lightning_prune.patterns.NM', 'n': 3, 'm': 8}
    """
    match = _NAME.fullmatch(name)
    if match is None:
        return None
    a, kind, b = int(match[1]), match[2], int(match[3])
    if kind == "in":
        return {"_target_": "lightning_prune.patterns.NM", "n": a, "m": b}
    if (a, b) == (1, 1):
        return {"_target_": "lightning_prune.patterns.Unstructured"}
    return {"_target_": "lightning_prune.patterns.Block", "rows": a, "cols": b}


class PatternSource(ConfigSource):
    """A Hydra config source that makes up ``pattern/<NxM or NinM>`` configs on demand."""

    @staticmethod
    def scheme() -> str:
        """The search-path scheme: ``lp-pattern://``."""
        return "lp-pattern"

    @staticmethod
    def _option(config_path: str) -> str | None:
        group, _, name = config_path.rstrip("/").removesuffix(".yaml").partition("/")
        return name if group == GROUP and pattern_node(name) is not None else None

    def load_config(self, config_path: str) -> ConfigResult:
        """The config of one option."""
        name = self._option(config_path)
        if name is None:
            raise ConfigLoadError(f"{config_path} is not a pattern this source makes (NxM or NinM)")
        return ConfigResult(
            config=OmegaConf.create(pattern_node(name)),
            path=self.full_path(),
            provider=self.provider,
            header={"package": None},
        )

    def available(self) -> bool:
        """Always available."""
        return True

    def is_group(self, config_path: str) -> bool:
        """Only the ``pattern`` group."""
        return config_path.rstrip("/") == GROUP

    def is_config(self, config_path: str) -> bool:
        """Every ``NxM`` and ``NinM`` option of the group."""
        return self._option(config_path) is not None

    def list(self, config_path: str, results_filter: ObjectType | None) -> list[str]:
        """Nothing to list: the options are made up on demand."""
        return []


def register() -> None:
    """Make the ``lp-pattern://`` scheme known to Hydra (idempotent)."""
    Plugins.instance().register(PatternSource)
