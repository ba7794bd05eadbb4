"""Retrain-free structured pruning of a trained transformer: whole heads or FFN neurons, from calibration data.

Kwon et al. 2022, "A Fast Post-Training Pruning Framework for Transformers" (arXiv:2204.09656):

1. *Mask search.* Every head (or neuron) gets a mask variable ``m = 1`` that scales its output. The importance
   of a unit is the diagonal of the empirical Fisher information of its mask, ``I = sum_batches (dL/dm)^2``,
   from gradients of the loss on the calibration batches. The least important units are removed until the
   budget is met: a fraction of the units' FLOPs (multiply-accumulates per token, attention scores included)
   or of their parameters, ranked across layers, one unit kept in each layer.
2. *Re-fit.* Layer after layer, on the calibration activations of the partly pruned model, the output
   projection's columns of the kept units are re-fitted by least squares so that the layer's output stays
   what all units gave: ``W_K = W G[:, K] (G[K, K] + lambda I)^-1`` with ``G = X^T X`` over the projection's
   inputs ``X`` and ``K`` the kept columns (the paper tunes one scale per kept unit; a full re-fit of the
   kept columns contains that solution).

No training: one backward pass per calibration batch for the importances, one forward pass per layer for the
re-fit. The paper's mask rearrangement step (block-diagonal Fisher) is not done.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_prune.engine.scores import process_group
from lightning_prune.patterns import FFN, Coupled, Head, UnitGroup, parse_pattern
from lightning_prune.selection import select
from lightning_prune.structure import find_attention, find_ffn, linear_at
from lightning_prune.targets import compile_patterns

__all__ = ["BUDGETS", "check_retrain_free", "retrain_free_prune"]

BUDGETS = ("flops", "params")


def check_retrain_free(pattern: Any, budget: str) -> Coupled:
    """The coupled pattern for retrain-free pruning; ValueError naming the argument otherwise.

    Example:
        >>> check_retrain_free("ffn", "flops")
        ffn
    """
    if budget not in BUDGETS:
        raise ValueError(f"budget {budget!r} is not valid; choose one of {', '.join(map(repr, BUDGETS))}")
    parsed = parse_pattern(pattern)
    if not isinstance(parsed, (Head, FFN)):
        raise ValueError(
            f"method 'retrain_free' prunes whole attention heads or FFN neurons: pattern {str(pattern)!r} is not "
            "valid here; choose 'head' or 'ffn'"
        )
    return parsed


def _selected(groups: list[UnitGroup], include: Any, exclude: Any) -> list[UnitGroup]:
    """The layers whose every weight's module passes ``include``/``exclude``."""
    inc = compile_patterns("include", include)
    exc = compile_patterns("exclude", exclude)

    def wanted(fqn: str) -> bool:
        name = fqn.rpartition(".")[0]
        return (not inc or any(r.fullmatch(name) for r in inc)) and not any(r.fullmatch(name) for r in exc)

    return [g for g in groups if all(wanted(f) for f in g.fqns)]


class _Layer:
    """One layer's unit geometry: the output projection whose inputs are the units, and each unit's cost."""

    def __init__(self, model: nn.Module, group: UnitGroup, pattern: Coupled, seq_len: float) -> None:
        self.group = group
        self.units = group.units
        if isinstance(pattern, Head):
            layout = next(a for a in find_attention(model, pattern.layers) if a.name == group.name)
            self.output, self.width = layout.o, layout.head_dim
            hidden = linear_at(model, layout.q).in_features
            params = 2 * layout.head_dim * hidden + 2 * layout.head_dim * hidden / layout.group_size
            self.params, self.flops = params, params + 2 * layout.head_dim * seq_len  # q k^T and p v per token
        else:
            ffn = next(f for f in find_ffn(model, pattern.layers) if f.name == group.name)
            self.output, self.width = ffn.output, 1
            hidden = linear_at(model, ffn.output).out_features
            self.params = self.flops = hidden * (len(ffn.inputs) + 1)
        self.mask = torch.ones(self.units, requires_grad=True)
        self.importance = torch.zeros(self.units, dtype=torch.float64)

    def scale(self, module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """Forward pre-hook on the output projection: each unit's input columns times its mask variable."""
        x = args[0]
        mask = self.mask.to(x.device, x.dtype)
        scaled = (x.unflatten(-1, (self.units, self.width)) * mask[:, None]).flatten(-2)
        return (scaled, *args[1:])


def _loss(model: nn.Module, batch: Any, run: Callable[[nn.Module, Any], Any]) -> Tensor:
    """The calibration loss: a LightningModule's ``training_step``, else the output's ``loss``, else the output."""
    training_step = getattr(model, "training_step", None)
    out = training_step(batch, 0) if callable(training_step) else run(model, batch)
    if isinstance(out, Mapping):
        out = out.get("loss")
    out = getattr(out, "loss", out)
    if not isinstance(out, Tensor) or out.numel() != 1:
        raise ValueError(
            "method 'retrain_free' scores units by gradients of a loss, but the model's output on a calibration "
            f"batch is no scalar loss ({type(out).__name__}); pass loss=lambda model, batch: <scalar tensor>, or "
            "batches with labels"
        )
    return out


def _importances(
    model: nn.Module,
    layers: list[_Layer],
    data: list[Any],
    loss: Callable[[nn.Module, Any], Tensor],
    group: Any,
) -> None:
    """Fisher importance of every unit's mask: the sum over batches of its squared gradient."""
    frozen = {p: p.requires_grad for p in model.parameters()}
    handles = [model.get_submodule(layer.output).register_forward_pre_hook(layer.scale) for layer in layers]
    try:
        for p in frozen:
            p.requires_grad_(False)  # only the mask variables need gradients
        with torch.enable_grad():
            for batch in data:
                value = loss(model, batch)
                if not bool(torch.isfinite(value)):
                    raise RuntimeError("the calibration loss is not finite: check the batches and the model")
                value.backward()
                for layer in layers:
                    grad = layer.mask.grad
                    if grad is not None:
                        layer.importance += grad.double().square()
                        layer.mask.grad = None
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in frozen.items():
            p.requires_grad_(flag)
    if group is not None:  # every rank's batches count
        flat = torch.cat([layer.importance for layer in layers])
        dist.all_reduce(flat, group=group)
        for layer, part in zip(layers, flat.split([layer.units for layer in layers])):
            layer.importance = part


def _choose(layers: list[_Layer], target: float, budget: str, scope: str) -> list[Tensor]:
    """Per layer, the units to prune (True) that reach ``target`` of the budget, one unit kept in each."""
    costs = [round(layer.flops if budget == "flops" else layer.params) for layer in layers]
    totals = [cost * layer.units for cost, layer in zip(costs, layers)]
    most = [(layer.units - 1) / layer.units for layer in layers]
    scores = [layer.importance.float() for layer in layers]
    return select(scores, costs, totals, target, scope, max_sparsity=most)


def refit(weight: Tensor, gram: Tensor, kept: Tensor, damp: float = 0.01) -> Tensor:
    """Least-squares re-fit of the kept columns: the closest ``W_K X_K`` to ``W X`` over inputs with ``X^T X = G``.

    ``W_K = W G[:, K] (G[K, K] + lambda I)^-1`` with ``lambda = damp * mean(diag G[K, K])`` (ridge dampening,
    as SparseGPT's); pruned columns become zero.

    Args:
        weight: ``[out, in]``.
        gram: ``[in, in]``, the inputs' ``X^T X``.
        kept: bool ``[in]``, True = kept column.
        damp: relative dampening.

    Example:
        >>> x = torch.randn(256, 4); w = torch.randn(3, 4)
        >>> new = refit(w, x.T @ x, torch.tensor([True, True, True, False]), damp=0.0)
        >>> bool(torch.allclose(new[:, 3], torch.zeros(3)))
        True
    """
    g = gram.double()
    index = torch.nonzero(kept).flatten()
    gkk = g[index][:, index]
    lam = damp * float(gkk.diagonal().mean()) if index.numel() else 0.0
    gkk = gkk + lam * torch.eye(index.numel(), dtype=g.dtype, device=g.device)
    rhs = weight.double() @ g[:, index]  # [out, |K|]
    solved = torch.linalg.solve(gkk, rhs.T).T  # gkk is symmetric
    out = torch.zeros_like(weight)
    out[:, index] = solved.to(weight.dtype)
    return out


def retrain_free_prune(
    model: nn.Module,
    data: list[Any],
    target_sparsity: float,
    pattern: Coupled,
    run: Callable[[nn.Module, Any], Any],
    sweep: Callable[[list[str], Callable[[list[str], Mapping[str, Tensor]], None]], None],
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    budget: str = "flops",
    scope: str = "global",
    loss: Callable[[nn.Module, Any], Tensor] | None = None,
    damp: float = 0.01,
) -> dict[str, Tensor]:
    """Prune whole heads or neurons of ``model`` in place; see the module docstring. Called by ``prune_oneshot``.

    Args:
        model: a trained transformer (changed in place).
        data: the calibration batches.
        target_sparsity: the fraction of the units' budget (FLOPs or parameters) to remove.
        pattern: :class:`~lightning_prune.patterns.Head` or :class:`~lightning_prune.patterns.FFN`.
        run: ``run(model, batch)``, the forward pass.
        sweep: ``sweep(fqns, apply)``: runs the model block after block, collecting ``X^T X`` of the inputs of
            ``fqns`` and calling ``apply(fqns_of_block, grams)`` before the next block runs.
        include: regexes: only layers whose weights' modules all match one.
        exclude: regexes: layers with a weight whose module matches one are left out.
        budget: ``"flops"`` or ``"params"``.
        scope: ``"global"`` (units ranked across layers) or ``"local"`` (each layer alone).
        loss: ``loss(model, batch)`` giving the scalar loss for the importances; default: a LightningModule's
            ``training_step``, else the output's ``loss``.
        damp: the re-fit's relative ridge dampening.

    Returns:
        Masks of every weight of the pruned layers, True = kept.
    """
    groups = _selected(pattern.groups(model), include, exclude)
    if not groups:
        raise ValueError(
            f"method 'retrain_free' found no {pattern.noun} layer in {type(model).__name__} that include={include!r} "
            f"and exclude={exclude!r} select; pass the layout with {type(pattern).__name__}(layers={{...}})"
        )
    from lightning_prune.engine.planning import check_coupled

    check_coupled(pattern, groups, target_sparsity, scope)
    seq_len = _sequence_length(data)
    layers = [_Layer(model, g, pattern, seq_len) for g in groups]
    group = process_group()
    _importances(model, layers, data, loss or (lambda m, b: _loss(m, b, run)), group)
    pruned = {layer.output: p for layer, p in zip(layers, _choose(layers, target_sparsity, budget, scope))}
    by_output = {layer.output: layer for layer in layers}

    def apply(fqns: list[str], grams: Mapping[str, Tensor]) -> None:
        for fqn in fqns:
            name = fqn.rpartition(".")[0]
            layer = by_output[name]
            kept = (~pruned[name]).repeat_interleave(layer.width)
            weight = linear_at(model, name).weight
            weight.data.copy_(refit(weight.detach(), grams[fqn], kept.to(weight.device), damp))

    sweep([f"{layer.output}.weight" for layer in layers], apply)
    masks: dict[str, Tensor] = {}
    with torch.no_grad():
        for layer in layers:
            units = pruned[layer.output]
            for member in layer.group.members:
                weight = model.get_parameter(member.fqn)
                own = ~(~units).reshape(-1, member.repeat).any(dim=1)
                mask = ~member.pattern.expand(own.to(weight.device), weight)
                weight.mul_(mask)
                masks[member.fqn] = mask.clone()
    return masks


def _sequence_length(data: list[Any]) -> float:
    """The mean token count per sequence of the calibration batches (for attention FLOPs), 1 if unknown."""
    lengths = []
    for batch in data:
        ids = batch
        if isinstance(batch, Mapping):
            ids = batch.get("input_ids")
        elif isinstance(batch, (tuple, list)):
            ids = batch[0]
        if isinstance(ids, Tensor) and ids.dim() >= 2:
            lengths.append(ids.shape[-1])
    return float(sum(lengths) / len(lengths)) if lengths else 1.0
