"""What this library needs to know about Hugging Face ``transformers`` models (which it never imports)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["CACHE_ARGUMENTS", "kv_cache_off"]

# keyword arguments through which transformers layers receive a key/value cache
CACHE_ARGUMENTS = ("past_key_value", "past_key_values", "layer_past")


@contextlib.contextmanager
def kv_cache_off(model: nn.Module) -> Iterator[None]:
    """Turn off the key/value cache of every ``config.use_cache`` in ``model`` while the block runs.

    A cache makes a model run stateful (a second run attends to the first run's keys) and its outputs tuples
    that tracers do not follow. Models without such a config are left alone.

    Example:
        >>> net = nn.Linear(2, 2)
        >>> with kv_cache_off(net):
        ...     pass
    """
    configs = {id(c): c for m in model.modules() if (c := getattr(m, "config", None)) is not None}
    saved = {key: c.use_cache for key, c in configs.items() if getattr(c, "use_cache", None) is not None}
    for key in saved:
        configs[key].use_cache = False
    try:
        yield
    finally:
        for key, value in saved.items():
            configs[key].use_cache = value
