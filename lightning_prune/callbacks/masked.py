"""What every mask-holding callback shares: Lightning's hooks around an engine, checkpoint plumbing, logging.

The algorithm lives in :mod:`lightning_prune.engine`; a callback only binds its engine to the LightningModule
at the start of training, calls it around each optimizer step, logs its events and carries its state through
checkpoints (and, under ``ddp_spawn``, back to the launching process).
"""

from __future__ import annotations

import hashlib
import itertools
import os
import tempfile
import uuid
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from typing_extensions import override

from lightning_prune.engine import MaskKeeper
from lightning_prune.report import SparsityRow, format_report
from lightning_prune.sharding import CHECKPOINT_PREFIX, is_dtensor, mark, marked, put, template_like, walk

__all__ = ["FromEngine", "MaskedWeights"]

# Strategies that shard parameters into flat slices (FSDP1 flat parameters, DeepSpeed ZeRO): a rank holds a
# run of elements that cuts across rows, so no mask or unit maps onto it (README, "Sharded training").
_FLAT_SHARDING = ("FSDPStrategy", "DeepSpeedStrategy")


def _check_strategy(trainer: pl.Trainer) -> None:
    """Raise for a strategy that shards parameters as flat slices (ModelParallelStrategy is the supported way)."""
    strategy = getattr(trainer, "strategy", None)
    names = {cls.__name__ for cls in type(strategy).__mro__}
    if names.intersection(_FLAT_SHARDING):
        raise ValueError(
            f"strategy {type(strategy).__name__} shards parameters as flat slices that cut across rows, which "
            "lightning_prune cannot mask; shard with ModelParallelStrategy instead (FSDP2 fully_shard and/or "
            "tensor parallelism in configure_model), or use a single device, 'ddp' or 'ddp_spawn'"
        )


def _distributed_checkpoint(trainer: pl.Trainer) -> bool:
    """Whether the trainer saves distributed checkpoints (a directory with one shard per rank)."""
    strategy = getattr(trainer, "strategy", None)
    return type(strategy).__name__ == "ModelParallelStrategy" and bool(
        getattr(strategy, "_save_distributed_checkpoint", False)
    )


# Callbacks that have a state key and have not finished a fit, by the key their settings give: to tell apart
# two with the very same settings in one Trainer.
_LIVE: dict[str, weakref.WeakSet[MaskedWeights]] = {}


def _shallow(state: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of nested mappings whose tensors are the same objects (deep-copying DTensors is not needed)."""
    return {k: _shallow(v) if isinstance(v, Mapping) else v for k, v in state.items()}


def _load_sharded(state: Mapping[str, Any], model: torch.nn.Module, path: Any) -> dict[str, Any]:
    """``state`` with its markers replaced by the tensors saved in the distributed checkpoint at ``path``.

    Each entry is loaded into a template placed like the target it belongs to (its name is the part of the
    key after ``masks.``, ``states.`` or ``dense.``), so that the checkpoint re-shards to this run's layout: another
    world size, or an unsharded model.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if path is None:
        raise ValueError("the callback state refers to a distributed checkpoint, but the trainer has no ckpt_path")
    saved = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    params = dict(model.named_parameters())
    out = _shallow(state)
    templates: dict[str, Tensor] = {}
    where: dict[str, tuple[str, ...]] = {}
    for entry, value in list(walk(out)):
        key = marked(value)
        if key is None:
            continue
        meta = saved.get(f"state_dict.{key}")
        if not isinstance(meta, TensorStorageMetadata):
            raise ValueError(f"the distributed checkpoint at {path} lacks {key!r}, which the callback state names")
        fqn = entry[1] if entry and entry[0] in ("masks", "states", "dense") and len(entry) > 1 else ""
        templates[key] = template_like(params.get(fqn), tuple(meta.size), meta.properties.dtype)
        where[key] = entry
    dcp.load({"state_dict": templates}, checkpoint_id=str(path))
    for key, entry in where.items():
        put(out, entry, templates[key])
    return out


class FromEngine:
    """A read-only attribute of a callback that reads its engine's attribute of the same name."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, instance: Any, owner: type | None = None) -> Any:
        return self if instance is None else getattr(instance.engine, self.name)


class MaskedWeights(Callback):
    """Base class: a Lightning adapter around a mask-holding engine (:class:`~lightning_prune.engine.MaskKeeper`).

    Args:
        engine: the engine that holds targets and masks and keeps pruned weights at zero.
        verbose: print the per-layer sparsity table (rank zero) at the end of training.

    Example:
        >>> from lightning_prune.engine import MaskLock
        >>> cb = MaskedWeights(MaskLock(op_types="Linear"))
        >>> cb.op_types
        ('Linear',)
    """

    def __init__(self, engine: MaskKeeper, verbose: bool = True) -> None:
        self.engine = engine
        self.verbose = verbose
        self._key: str | None = None  # state_key, fixed at its first use
        self._pending: dict[str, Any] | None = None  # state restored from a checkpoint, bound at train start
        # ddp_spawn/ddp_fork train in child processes: rank zero hands its state back through this file.
        self._launcher = os.getpid()
        self._handoff = Path(tempfile.gettempdir()) / f"lightning_prune-{self._launcher}-{uuid.uuid4().hex}.pt"

    # ------------------------------------------------------------------ public views
    op_types = FromEngine()  # module class names whose ``weight`` is a target
    include = FromEngine()  # regexes: only modules whose full name matches one are targets
    exclude = FromEngine()  # regexes: modules whose full name matches one are not targets

    @property
    def state_key(self) -> str:
        """Identifies this callback's state in checkpoints: its class and everything that defines its run.

        Callbacks that differ in anything get different keys. A callback with the very same settings as one
        that has not finished its ``fit`` yet gets ``#2`` appended, so that Lightning lets both into one
        Trainer and this library can say which weights they both claim. Checkpoints are matched by class
        and weights, not by key alone (see :meth:`on_load_checkpoint`), so a suffix never gets in the way of
        a resume.
        """
        if self._key is None:
            base = self._generate_state_key(**self._identity())
            live = _LIVE.setdefault(base, weakref.WeakSet())
            taken = {other._key for other in live}
            keys = itertools.chain([base], (f"{base}#{i}" for i in itertools.count(2)))
            self._key = next(k for k in keys if k not in taken)
            live.add(self)
        return self._key

    @property
    def masks(self) -> Mapping[str, Tensor]:
        """Read-only mapping: parameter name → bool mask shaped like it, True = kept."""
        self._receive()
        return self.engine.masks

    def sparsity(self) -> float:
        """Fraction of zeros over all targets, from the masks (0.0 before there are any)."""
        self._receive()
        return self.engine.sparsity()

    def layer_sparsity(self) -> dict[str, float]:
        """Fraction of zeros of each target, by name (whole targets, also when sharded)."""
        self._receive()
        return self.engine.layer_sparsity()

    def report(self, pl_module: torch.nn.Module | None = None) -> list[SparsityRow]:
        """Per-layer rows (name, shape, pattern, sparsity) of the current masks."""
        self._receive()
        return self.engine.report()

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Validate targets now if the model's layers exist (else once ``configure_model`` built them)."""
        if stage == "fit":
            _check_strategy(trainer)
            if not is_overridden("configure_model", pl_module):
                self.engine.check(pl_module)

    @override
    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Find this run's state even if it was saved under another key (older versions, changed settings).

        A state of this class for any of the same weights is taken, so that a changed configuration is
        refused at the start of training (naming what differs) instead of silently starting afresh.
        """
        states = checkpoint.get("callbacks", {})
        if self.state_key in states:
            return  # Lightning hands it to load_state_dict
        ours = set(self.engine.check(pl_module))
        prefix = f"{type(self).__qualname__}{{"
        for key, state in states.items():
            if key.startswith(prefix) and isinstance(state, Mapping) and ours & set(state.get("masks", {})):
                states[self.state_key] = states.pop(key)  # Lightning then hands it to load_state_dict
                return

    @override
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        """Sharded masks and states go where each rank writes its own shard (every rank calls this).

        Callback state is written by rank zero alone; so in a distributed checkpoint every DTensor of ours is
        moved into ``checkpoint["state_dict"]``, which each rank writes per shard, and left behind as a marker.
        Otherwise (one consolidated file) DTensors are gathered into whole tensors.
        """
        state = checkpoint.get("callbacks", {}).get(self.state_key)
        if not isinstance(state, dict) or not any(is_dtensor(v) for _, v in walk(state)):
            return
        state = checkpoint["callbacks"][self.state_key] = _shallow(state)  # our own dicts, the same tensors
        distributed = _distributed_checkpoint(trainer)
        digest = hashlib.sha1(self.state_key.encode()).hexdigest()[:12]
        for path, value in list(walk(state)):
            if not is_dtensor(value):
                continue
            if distributed:
                key = CHECKPOINT_PREFIX + ".".join((digest, *path))
                checkpoint["state_dict"][key] = value
                put(state, path, mark(key))
            else:
                put(state, path, value.full_tensor())

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the state until ``on_train_start``, when the model is final and its weights restored."""
        self._pending = dict(state_dict)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The engine's state (masks, and whatever the engine keeps)."""
        if self._pending is not None:
            return self._pending
        self._receive()
        return self.engine.state_dict()

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Bind the engine to the model: targets resolved, masks restored or carried over, zeros applied."""
        self._check_unclaimed(trainer, pl_module)
        state, self._pending = self._pending, None
        if state is not None and any(marked(v) is not None for _, v in walk(state)):
            state = _load_sharded(state, pl_module, trainer.ckpt_path)
        self._bind(trainer, pl_module, state)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Zero the gradients of pruned weights; make sure the coming step leaves them at zero."""
        self.engine.before_optimizer_step(trainer.global_step, optimizer)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After an optimizer step: pruned weights back to zero where the optimizer may have moved them."""
        self.engine.after_optimizer_step()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Let a later callback with the same settings take this one's state key."""
        for live in _LIVE.values():
            live.discard(self)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A fit that failed is over too (Lightning calls no ``teardown`` then)."""
        self.teardown(trainer, pl_module, "fit")

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Print the sparsity table; in a child process (ddp_spawn), hand the state back to the launcher."""
        if self.verbose and self.engine.masks:
            rank_zero_info(f"{type(self).__name__}: per-layer sparsity\n" + format_report(self.engine.report()))
        if trainer.is_global_zero and os.getpid() != self._launcher:
            torch.save(self.engine.state_dict(), self._handoff)

    # ------------------------------------------------------------------ for subclasses
    def _identity(self) -> dict[str, Any]:
        """What defines this callback's run, for :attr:`state_key`."""
        return {"op_types": self.op_types, "include": self.include, "exclude": self.exclude}

    def _bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, state: Mapping[str, Any] | None) -> None:
        self.engine.bind(pl_module, state)

    # ------------------------------------------------------------------ helpers
    def _check_unclaimed(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Raise, before any weight changes, if another mask-holding callback claims one of our targets."""
        ours = self.engine.check(pl_module)
        for other in getattr(trainer, "callbacks", []):
            if other is self or not isinstance(other, MaskedWeights):
                continue
            try:
                theirs = {id(p) for p in other.engine.check(pl_module).values()}
            except ValueError:
                continue  # the other callback reports its own error when its turn comes
            shared = [fqn for fqn, p in ours.items() if id(p) in theirs]
            if shared:
                raise ValueError(
                    f"{type(self).__name__} and {type(other).__name__} both claim {shared[:6]}"
                    f"{' ...' if len(shared) > 6 else ''}: a weight can have one mask owner; split them with "
                    "include/exclude"
                )

    def _receive(self) -> None:
        """In the launching process of ddp_spawn: take the state that rank zero handed back, once."""
        if os.getpid() == self._launcher and self._handoff.exists():
            state = torch.load(self._handoff, map_location="cpu", weights_only=True)
            self._handoff.unlink()
            self.engine.load_state_dict(state)
