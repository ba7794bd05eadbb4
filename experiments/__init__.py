"""Sample experiments: data, models, the Hydra main job (train.py) and the sweep report (report.py).

Importing this package registers what ``conf/`` relies on:

- ``${lp.frac:${steps},0.6}``: ``round(steps * 0.6)``, an optimizer step given as a fraction of the budget;
- ``${lp.frequency:${steps},0.03,min}`` and ``${lp.end_step:${steps},0.6,frequency,start,min_gap}``: an
  iterative schedule's frequency and last event derived from the budget, always valid (no gap between events
  shorter than ``min_gap``, which progressive pruning needs);
- ``${lp.natural:${pattern},0.8}``: a target sparsity, 0.8 unless the pattern is N:M, which runs at N/M;
- the ``lp-pattern://`` config source, which makes any ``NxM`` / ``NinM`` option of the ``pattern`` group.
"""

from __future__ import annotations

from typing import Any

from omegaconf import OmegaConf

from experiments import pattern_source


def _fraction_of(total: int | str, fraction: float | str) -> int:
    return max(1, round(int(total) * float(fraction)))


def _frequency(total: int | str, fraction: float | str, least: int | str = 1) -> int:
    return max(int(least), _fraction_of(total, fraction))


def _end_step(total: int | str, fraction: float | str, frequency: int | str, start: int | str, least: int | str) -> int:
    start, frequency, least = int(start), int(frequency), int(least)
    end = max(start, round(int(total) * float(fraction)))
    if least > 1 and end - start < frequency:  # two events at least, a full gap apart
        end = start + frequency
    short = (end - start) % frequency
    if 0 < short < least:  # the last gap would be too short: end on the event before
        end -= short
    return end


def _natural_sparsity(pattern: Any, default: float | str) -> float:
    node = OmegaConf.to_container(pattern, resolve=True) if OmegaConf.is_config(pattern) else pattern
    if isinstance(node, dict) and str(node.get("_target_", "")).endswith("patterns.NM"):
        return int(node["n"]) / int(node["m"])
    return float(default)


def register_resolvers() -> None:
    """Register the resolvers and the pattern config source once (idempotent)."""
    for name, resolver in (
        ("lp.frac", _fraction_of),
        ("lp.frequency", _frequency),
        ("lp.end_step", _end_step),
        ("lp.natural", _natural_sparsity),
    ):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
    pattern_source.register()


register_resolvers()
