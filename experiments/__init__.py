"""Sample experiments: data, models, the Hydra main job (train.py) and the sweep report (report.py).

Importing this package registers the OmegaConf resolver ``lp.frac`` used by ``conf/``:
``${lp.frac:${steps},0.6}`` is ``round(steps * 0.6)``, an optimizer step given as a fraction of the budget.
"""

from __future__ import annotations

from omegaconf import OmegaConf


def _fraction_of(total: int | str, fraction: float | str) -> int:
    return max(1, round(int(total) * float(fraction)))


def register_resolvers() -> None:
    """Register ``lp.frac`` once (idempotent)."""
    if not OmegaConf.has_resolver("lp.frac"):
        OmegaConf.register_new_resolver("lp.frac", _fraction_of)


register_resolvers()
