"""Post-training pruning from calibration data, one layer at a time: SparseGPT and Wanda.

- :func:`sparsegpt_prune`: masks chosen and the remaining weights updated column block by column block from
  the layer's input Hessian (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot", arXiv:2301.00774).
- :func:`wanda_mask`: per output row, the weights with the lowest ``|W_ij| * ||X_j||_2`` (Sun et al. 2024,
  "A Simple and Effective Pruning Approach for Large Language Models", arXiv:2306.11695); no weight update.
- :func:`prune_oneshot`: either (or magnitude) over a whole model, block after block, from calibration batches.

Masks are True where a weight is kept. A convolution weight ``[Cout, Cin, *kernel]`` is seen as the matrix
``[Cout, prod(kernel) * Cin]`` with the input channel innermost (:func:`~lightning_prune.patterns.as_matrix`):
Hessians and input norms are over those columns.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_prune.engine.pruner import check_fraction
from lightning_prune.engine.scores import process_group
from lightning_prune.hf import CACHE_ARGUMENTS, kv_cache_off
from lightning_prune.patterns import NM, Coupled, Pattern, Unstructured, as_matrix, from_matrix, parse_pattern
from lightning_prune.retrain_free import check_retrain_free, retrain_free_prune
from lightning_prune.selection import SCOPES
from lightning_prune.sharding import is_dtensor
from lightning_prune.targets import compile_patterns, parse_op_types, resolve_targets

__all__ = ["METHODS", "check_arguments", "prune_oneshot", "sparsegpt_prune", "target_modules", "wanda_mask"]

_PATTERNS = "'unstructured' or 'N:M' (e.g. '2:4')"


def _parse(pattern: str, sparsity: float, name: str = "sparsity") -> tuple[int, int] | None:
    """``(n, m)`` for an N:M pattern (whose sparsity must be N/M), None for unstructured; ValueError otherwise."""
    sparsity = check_fraction(name, sparsity, upper_open=True)
    parsed = parse_pattern(pattern)
    if isinstance(parsed, Unstructured):
        return None
    if not isinstance(parsed, NM):
        raise ValueError(f"pattern {pattern!r} is not valid here; choose {_PATTERNS}")
    n, m = parsed.n, parsed.m
    if not math.isclose(sparsity, n / m, abs_tol=1e-9):
        raise ValueError(f"pattern '{n}:{m}' prunes exactly {n}/{m} of the weights; sparsity {sparsity} differs")
    return n, m


def _partial(n: int, m: int, width: int) -> int:
    """How many of a group of ``width <= m`` inputs N:M prunes.

    ``n``, or ``floor(n * width / m)`` for the last, partial group of a row whose width is not a multiple of ``m``
    (as :class:`~lightning_prune.patterns.NM`).
    """
    return n if width == m else n * width // m


def _lowest_per_group(score: Tensor, n: int, m: int) -> Tensor:
    """Bool ``[rows, cols]``: the ``n`` lowest of every ``m`` consecutive entries of each row (ties: lower index).

    A last, partial group of ``r < m`` entries has its ``floor(n * r / m)`` lowest marked.
    """
    rows, cols = score.shape
    pad = -cols % m
    padded = nn.functional.pad(score, (0, pad), value=math.inf) if pad else score
    groups = padded.shape[1] // m
    pruned = torch.zeros(rows, groups, m, dtype=torch.bool, device=score.device)
    index = torch.sort(padded.reshape(rows, groups, m), dim=2, stable=True).indices[..., :n]
    slots = torch.ones_like(index, dtype=torch.bool)
    slots[:, -1, _partial(n, m, m - pad) :] = False
    pruned.scatter_(2, index, slots)
    return pruned.reshape(rows, groups * m)[:, :cols]


def _check_sparsegpt(block_size: int, damp: float, nm: tuple[int, int] | None, pattern: str) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0.0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"block_size ({block_size}) must be a multiple of M ({nm[1]}) for pattern '{pattern}'")


def wanda_mask(weight: Tensor, input_sq_norms: Tensor, sparsity: float, pattern: str = "unstructured") -> Tensor:
    """Wanda's mask: per output row, prune the weights of lowest ``|W_ij| * ||X_j||_2`` (arXiv:2306.11695).

    The comparison group is each output row: unstructured prunes exactly ``floor(cols * sparsity)`` weights
    of every row; ``N:M`` prunes the ``N`` lowest of every ``M`` consecutive inputs of every row (a last, partial
    group of ``r < M`` inputs: ``floor(N * r / M)``, as the training-time pattern). Ties go to the lower column
    index.

    Args:
        weight: ``[out, in]`` (or a convolution weight, seen as ``[out, prod(kernel) * in]``).
        input_sq_norms: ``sum_k x_kj^2`` over the calibration inputs, one per input column.
        sparsity: fraction pruned, in [0, 1); with ``"N:M"`` it must be N/M.
        pattern: ``"unstructured"`` or ``"N:M"``.

    Returns:
        A bool mask shaped like ``weight``, True = kept.

    Raises:
        ValueError: a bad sparsity or pattern, or norms that do not match the weight's columns.

    Example:
        >>> w = torch.tensor([[1.0, -2.0, 3.0, 0.5]])
        >>> wanda_mask(w, torch.tensor([4.0, 1.0, 0.25, 100.0]), 0.5)  # scores 2, 2, 1.5, 5: a tie at 2
        tensor([[False,  True, False,  True]])
    """
    nm = _parse(pattern, sparsity)
    matrix = as_matrix(weight.detach())
    rows, cols = matrix.shape
    norms = input_sq_norms.detach().reshape(-1)
    if norms.numel() != cols:
        raise ValueError(f"input_sq_norms has {norms.numel()} entries; weight {tuple(weight.shape)} has {cols} columns")
    score = matrix.float().abs() * norms.to(matrix.device, torch.float32).clamp_min(0.0).sqrt()
    if nm is not None:
        return from_matrix(~_lowest_per_group(score, *nm), weight.shape)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=matrix.device)
    count = math.floor(cols * sparsity)
    if count:
        pruned.scatter_(1, torch.sort(score, dim=1, stable=True).indices[:, :count], True)
    return from_matrix(~pruned, weight.shape)


@torch.no_grad()
def sparsegpt_prune(
    weight: Tensor,
    hessian: Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """SparseGPT on one layer: prune and update the remaining weights to keep ``W X`` (arXiv:2301.00774).

    With ``H = 2/n X^T X`` (float32) from the layer's calibration inputs: dead input columns (``H_jj = 0``) get
    ``H_jj = 1`` and their weights zero; ``damp * mean(diag H)`` is added to the diagonal; ``U`` is the upper
    Cholesky factor of ``H^-1``. Columns are processed in blocks of ``block_size``. In each block the mask
    is chosen by the score ``w^2 / U_jj^2`` on the weights as updated so far (unstructured: the block's lowest
    ``sparsity`` share, the reference's ``<=`` rule at the threshold; ``N:M``: at the first column of every
    group of M, the N lowest of the group in each row; a last, partial group of ``r < M`` columns prunes
    ``floor(N * r / M)``), then column by column the pruned weights are zeroed
    and the error ``(w - q) / U_jj`` is propagated to the block's later columns (the OBS update); the block's
    accumulated error updates all later columns at once (lazy batching).

    Args:
        weight: ``[out, in]`` (or a convolution weight, seen as ``[out, prod(kernel) * in]``); not modified.
        hessian: ``[in, in]``, ``2/n X^T X`` of the layer's inputs (any positive scale works).
        sparsity: fraction pruned, in [0, 1); with ``"N:M"`` it must be N/M.
        pattern: ``"unstructured"`` or ``"N:M"``.
        block_size: columns per block (a multiple of M for N:M).
        damp: dampening, a fraction of the mean diagonal.

    Returns:
        ``(new_weight, mask)``: the updated weight (zero where pruned, ``weight``'s dtype and shape) and the
        bool mask, True = kept.

    Raises:
        ValueError: bad arguments, or a Hessian that does not match the weight's columns.
        RuntimeError: a Hessian that is not finite, or not positive definite even after dampening.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> x = torch.randn(256, 8)
        >>> w = torch.randn(4, 8)
        >>> new, mask = sparsegpt_prune(w, 2 / 256 * x.T @ x, 0.5, block_size=4)
        >>> int(mask.sum()), bool((new[~mask] == 0).all())  # the `<=` rule: one more per block of 16 scores
        (14, True)
    """
    nm = _parse(pattern, sparsity)
    _check_sparsegpt(block_size, damp, nm, pattern)
    matrix = as_matrix(weight.detach())
    rows, cols = matrix.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"hessian has shape {tuple(hessian.shape)}; weight {tuple(weight.shape)} needs ({cols}, {cols})"
        )
    # Transposed, [cols, rows]: a column of W is a contiguous row, so the per-column updates are rank-1 BLAS calls.
    WT = matrix.to(torch.float32).T.clone()
    H = hessian.detach().to(WT.device, torch.float32).clone()
    if not bool(torch.isfinite(H).all()):
        raise RuntimeError("the Hessian has non-finite entries (non-finite calibration activations?)")
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    WT[dead] = 0.0
    torch.diagonal(H).add_(damp * float(torch.diagonal(H).mean()))
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as error:
        raise RuntimeError(f"the Hessian is not positive definite even with damp={damp}; raise damp") from error
    pruned = torch.zeros(cols, rows, dtype=torch.bool, device=WT.device)
    step = 32 if block_size % 32 == 0 and (nm is None or 32 % nm[1] == 0) else block_size  # groups never cut
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        W1, U1, mask1 = WT[start:stop], U[start:stop, start:stop], pruned[start:stop]  # views, updated in place
        d = torch.diagonal(U1).unsqueeze(1)
        Err1 = torch.zeros_like(W1)
        scale = torch.zeros_like(W1)  # 1 / U_jj where pruned: the error of column j is w_j * scale_j
        if nm is None and sparsity > 0:
            score = W1.square() / d.square()
            count = int(score.numel() * sparsity)
            mask1.copy_(score <= torch.kthvalue(score.flatten(), count + 1).values)  # the reference's `<=` rule
            torch.div(mask1, d, out=scale)
        # Columns one by one within sub-blocks of `step`; a sub-block's errors reach the block's later columns
        # in one product (the same lazy batching, one level down: identical arithmetic, fewer memory passes).
        for s0 in range(0, stop - start, step):
            s1 = min(s0 + step, stop - start)
            for i in range(s0, s1):
                if nm is not None and i % nm[1] == 0:
                    group = slice(i, i + nm[1])
                    score = W1[group].square() / d[group].square()
                    count = _partial(*nm, score.shape[0])
                    if count:
                        mask1[group].scatter_(0, torch.topk(score, count, dim=0, largest=False).indices, True)
                        torch.div(mask1[group], d[group], out=scale[group])
                torch.mul(W1[i], scale[i], out=Err1[i])
                W1[i:s1].addr_(U1[i, i:s1], Err1[i], alpha=-1.0)  # the OBS update of the later columns
            W1[s1:].sub_(U1[s0:s1, s1:].T @ Err1[s0:s1])
        WT[stop:].sub_(U[start:stop, stop:].T @ Err1)  # lazy batch: the block's errors on all later columns
    kept = ~pruned.T
    W = WT.T.mul_(kept)  # exactly zero where pruned, including dead columns the mask kept
    return from_matrix(W.to(weight.dtype), weight.shape).contiguous(), from_matrix(kept, weight.shape).contiguous()


METHODS = ("sparsegpt", "wanda", "magnitude", "retrain_free")


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the inputs of the first block are recorded."""


def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _default_blocks(model: nn.Module) -> list[str]:
    """The items of the longest ``nn.ModuleList`` whose items share one class (a transformer's layers)."""
    best: list[str] = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > len(best) and len({type(m) for m in module}) == 1:
            best = [f"{name}.{i}" if name else str(i) for i in range(len(module))]
    return best


def _columns(module: nn.Module, x: Tensor) -> Tensor:
    """The layer's inputs as rows of its weight's matrix view: ``[tokens, in]`` (float32)."""
    if isinstance(module, nn.Conv2d):
        padding = module.padding
        assert not isinstance(padding, str)  # refused up front
        unfolded = nn.functional.unfold(x, module.kernel_size, module.dilation, padding, module.stride)
        cin, (kh, kw) = x.shape[1], module.kernel_size
        # unfold orders a column as (cin, kh, kw); the matrix view has the input channel innermost
        rows = unfolded.reshape(x.shape[0], cin, kh, kw, -1).permute(0, 4, 2, 3, 1)
        return rows.reshape(-1, kh * kw * cin).float()
    return x.reshape(-1, x.shape[-1]).float()


class _Shared:
    """The last input's statistics, for the next target that sees the very same tensor (q, k and v do)."""

    def __init__(self) -> None:
        self.key: tuple[Any, ...] | None = None
        self.source: Tensor | None = None
        self.value: tuple[Tensor, int] | None = None

    def clear(self) -> None:
        self.key = self.source = self.value = None


class _Statistics:
    """Sums of ``x^T x`` (SparseGPT) or of ``x^2`` per column (Wanda) of one target's inputs."""

    def __init__(self, fqn: str, module: nn.Module, method: str, shared: _Shared) -> None:
        self.fqn, self.method, self.count, self.shared = fqn, method, 0, shared
        weight = module.weight
        assert isinstance(weight, Tensor)  # a Linear or Conv2d target
        cols = as_matrix(weight).shape[1]
        shape = (cols, cols) if method == "sparsegpt" else (cols,)
        self.total = torch.zeros(shape, dtype=torch.float32, device=weight.device)
        self.handle = module.register_forward_pre_hook(self._collect)

    def _collect(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        source = args[0]
        key = (type(module), *(getattr(module, a, None) for a in ("kernel_size", "dilation", "padding", "stride")))
        if self.shared.source is not source or self.shared.key != key:
            x = _columns(module, source.detach())
            part = x.T @ x if self.method == "sparsegpt" else x.square().sum(0)
            self.shared.key, self.shared.source, self.shared.value = key, source, (part, x.shape[0])
        assert self.shared.value is not None
        part, rows = self.shared.value
        self.total.add_(part)
        self.count += rows

    def result(self, group: Any) -> tuple[Tensor, int]:
        """The sums over every rank's batches; RuntimeError, the same on every rank, if they are unusable."""
        if group is not None:  # DDP: every rank's calibration batches count
            count = torch.tensor([float(self.count)])
            dist.all_reduce(count, group=group)
            dist.all_reduce(self.total, group=group)
            self.count = int(count)
        if self.count == 0:
            raise RuntimeError(f"no calibration input reached '{self.fqn}': check blocks/forward, or exclude it")
        if not bool(torch.isfinite(self.total).all()):  # an inf or NaN input leaves its mark in the sums
            raise RuntimeError(f"non-finite calibration activations reach '{self.fqn}'")
        return self.total, self.count


def prune_oneshot(
    model: nn.Module,
    batches: Iterable[Any],
    method: str = "sparsegpt",
    target_sparsity: float = 0.5,
    pattern: str | Pattern = "unstructured",
    op_types: str | Sequence[str] = ("Linear", "Conv2d"),
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    blocks: str | Sequence[str] | None = None,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    budget: str = "flops",
    scope: str = "global",
    loss: Callable[[nn.Module, Any], Tensor] | None = None,
) -> dict[str, Tensor]:
    """Prune a trained model once from calibration batches, block after block, without training.

    Blocks (a transformer's layers) are processed in order. Each block's inputs are the outputs of the
    previous block *after* it was pruned; only one block's statistics (SparseGPT's Hessians ``2/n X^T X``,
    Wanda's ``sum x^2`` per input) and one block boundary's activations exist at a time. Within a block every
    target is pruned from one pass over the calibration data. Targets outside every block (e.g. ``lm_head``)
    are pruned last, from the inputs they see in a full forward pass of the pruned model. Under DDP the
    statistics are all-reduced, so every rank ends with the same masks and weights.

    Methods: ``"sparsegpt"`` (:func:`sparsegpt_prune`, arXiv:2301.00774), ``"wanda"`` (:func:`wanda_mask`,
    arXiv:2306.11695) and ``"magnitude"`` (per layer: the lowest ``|w|``; N:M per row) prune weights;
    ``"retrain_free"`` prunes whole attention heads (``pattern="head"``) or FFN neurons (``pattern="ffn"``)
    to a FLOPs or parameter budget, from Fisher importances and a least-squares re-fit of the output
    projections (Kwon et al. 2022, arXiv:2204.09656; :mod:`lightning_prune.retrain_free`).

    Args:
        model: changed in place (pruned weights set to zero; SparseGPT also updates the kept ones).
        batches: calibration batches (an iterable; read once).
        method: ``"sparsegpt"``, ``"wanda"``, ``"magnitude"`` or ``"retrain_free"``.
        target_sparsity: fraction pruned in every target, in [0, 1); with ``"N:M"`` it must be N/M. With
            ``"retrain_free"``: the fraction of the heads' (or neurons') FLOPs or parameters removed.
        pattern: ``"unstructured"`` or ``"N:M"``; ``"head"`` or ``"ffn"`` (or a ``Head``/``FFN`` with an
            explicit layout) for ``"retrain_free"``.
        op_types: module class names whose ``weight`` is pruned (``Linear``, ``Conv2d``).
        include: regexes; only modules whose full name matches one are pruned.
        exclude: regexes; modules whose full name matches one are not pruned.
        blocks: regexes matched against whole module names: the modules processed one after another;
            default: the items of the longest ``nn.ModuleList`` whose items share one class; without one,
            the whole model is one block.
        forward: ``forward(model, batch)`` runs the model on a batch; default ``model(**batch)`` for a
            mapping, ``model(batch[0])`` for a tuple or list, else ``model(batch)``.
        block_size: SparseGPT's columns per block.
        damp: SparseGPT's dampening (and the retrain-free re-fit's).
        budget: ``"retrain_free"``: ``"flops"`` (multiply-accumulates per token, attention scores included) or
            ``"params"``.
        scope: ``"retrain_free"``: ``"global"`` (units ranked across layers) or ``"local"`` (per layer).
        loss: ``"retrain_free"``: ``loss(model, batch)``, the scalar whose gradients score the units; default a
            LightningModule's ``training_step``, else the output's ``loss`` (HF models given labels).

    Returns:
        The masks by parameter name, True = kept.

    Raises:
        ValueError: a bad argument (before any weight changes).
        TypeError: an argument of the wrong type.
        RuntimeError: a condition found in the data (no calibration input reaches a target, non-finite
            activations), naming the layer; weights changed before it are restored.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> masks = prune_oneshot(net, [torch.randn(32, 8) for _ in range(4)], "wanda", 0.5)
        >>> {name: round(1 - m.float().mean().item(), 2) for name, m in masks.items()}
        {'0.weight': 0.5, '2.weight': 0.5}
    """
    nm = check_arguments(method, target_sparsity, pattern, forward, block_size, damp)
    coupled = check_retrain_free(pattern, budget) if method == "retrain_free" else None
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} is not valid; choose one of {', '.join(map(repr, SCOPES))}")
    if loss is not None and not callable(loss):
        raise TypeError(f"loss must be a callable loss(model, batch), got {type(loss).__name__}")
    if coupled is not None:
        targets = {f: p for g in coupled.groups(model) for f, p in ((f, model.get_parameter(f)) for f in g.fqns)}
    else:
        targets = resolve_targets(model, parse_op_types(op_types), include, exclude)
    modules = target_modules(model, targets)
    names = dict(model.named_modules())
    if blocks is None:
        block_names = _default_blocks(model)
    else:
        regexes = compile_patterns("blocks", blocks)
        block_names = [n for n in names if n and any(r.fullmatch(n) for r in regexes)]
        if not block_names:
            raise ValueError(f"blocks {blocks!r} match no module; module names include {list(names)[1:8]}")
    data = list(batches)
    if not data:
        raise ValueError("batches is empty: one-shot pruning needs calibration data")
    run = forward or _default_forward
    group = process_group()
    masks: dict[str, Tensor] = {}
    originals: dict[str, Tensor] = {}
    statistic = "wanda" if method == "wanda" else "sparsegpt"  # x^2 per column, or x^T x

    def prune(fqns: list[str], stats: dict[str, _Statistics]) -> None:
        for fqn in fqns:
            weight = targets[fqn]
            originals[fqn] = weight.detach().clone()
            if method == "magnitude":
                mask = _magnitude_mask(weight.detach(), target_sparsity, nm)
                new = weight.detach() * mask
            elif method == "wanda":
                total, _ = stats[fqn].result(group)
                mask = wanda_mask(weight, total, target_sparsity, str(pattern))
                new = weight.detach() * mask
            else:
                total, count = stats[fqn].result(group)
                hessian = total.mul_(2 / count)
                new, mask = sparsegpt_prune(weight, hessian, target_sparsity, str(pattern), block_size, damp)
            weight.data.copy_(new)
            masks[fqn] = mask

    def observe(
        fqns: list[str],
        call: Callable[..., Any],
        inputs: list[tuple[tuple[Any, ...], dict[str, Any]]],
        action: Callable[[list[str], dict[str, _Statistics]], None],
    ) -> None:
        """Statistics of ``fqns`` while ``call(*args, **kwargs)`` runs on every input, then ``action`` on them."""
        shared = _Shared()
        stats = {f: _Statistics(f, modules[f], statistic, shared) for f in fqns}
        try:
            for args, kwargs in inputs:
                call(*args, **kwargs)
                shared.clear()
        finally:
            for s in stats.values():
                s.handle.remove()
        action(fqns, stats)

    def sweep(fqns: list[str], action: Callable[[list[str], dict[str, _Statistics]], None]) -> None:
        """``observe`` block after block, each from the previous block's outputs once ``action`` changed it."""
        done: set[str] = set()
        if block_names:
            cached = _block_inputs(model, names[block_names[0]], data, run)
            for index, block_name in enumerate(block_names):
                block = names[block_name]
                inside = [f for f in fqns if f.startswith(f"{block_name}.")]
                observe(inside, block, cached, action)
                done.update(inside)
                if index + 1 < len(block_names):
                    cached = [(_next_args(block(*args, **kwargs), args), kwargs) for args, kwargs in cached]
            del cached
        rest = [f for f in fqns if f not in done]
        if rest:
            observe(rest, lambda batch: run(model, batch), [((batch,), {}) for batch in data], action)

    def refit_action(apply: Callable[[list[str], Mapping[str, Tensor]], None]) -> Callable[..., None]:
        def action(fqns: list[str], stats: dict[str, _Statistics]) -> None:
            apply(fqns, {f: stats[f].result(group)[0] for f in fqns})

        return action

    training = model.training
    model.eval()
    try:  # each block runs twice per batch: a key/value cache would join the two runs' keys
        with torch.no_grad(), kv_cache_off(model):
            if coupled is not None:
                originals.update({f: w.detach().clone() for f, w in targets.items()})
                masks = retrain_free_prune(
                    model,
                    data,
                    target_sparsity,
                    coupled,
                    run,
                    lambda fqns, apply: sweep(fqns, refit_action(apply)),
                    include,
                    exclude,
                    budget,
                    scope,
                    loss,
                    damp,
                )
                return masks
            if method == "magnitude":  # no data needed
                prune(list(targets), {})
            else:
                sweep(list(targets), prune)
    except Exception:
        with torch.no_grad():
            for fqn, original in originals.items():
                targets[fqn].data.copy_(original)
        raise
    finally:
        model.train(training)
    return {fqn: masks[fqn] for fqn in targets}


def target_modules(model: nn.Module, targets: Mapping[str, Tensor]) -> dict[str, nn.Module]:
    """The module of each target weight; ValueError for one that one-shot pruning cannot handle (or a sharded one).

    Example:
        >>> list(target_modules(nn.Sequential(nn.Linear(2, 2)), {"0.weight": torch.zeros(2, 2)}))
        ['0.weight']
    """
    sharded = sorted(fqn for fqn, weight in targets.items() if is_dtensor(weight))
    if sharded:  # judged from the parameters alone, so every rank raises the same error
        named = ", ".join(sharded[:3]) + (", ..." if len(sharded) > 3 else "")
        raise ValueError(
            f"one-shot pruning cannot prune sharded weights ({named}): prune the unsharded model with "
            "prune_oneshot, save it, then fine-tune it sharded with PatternLock"
        )
    modules = {fqn: model.get_submodule(fqn.rpartition(".")[0]) for fqn in targets}
    for fqn, module in modules.items():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            raise ValueError(f"'{fqn}' is a {type(module).__name__}; one-shot pruning handles Linear and Conv2d")
        if isinstance(module, nn.Conv2d) and (isinstance(module.padding, str) or module.groups != 1):
            raise ValueError(
                f"'{fqn}': Conv2d with padding={module.padding!r}, groups={module.groups} is not supported"
            )
    return modules


def check_arguments(
    method: str,
    target_sparsity: float,
    pattern: str | Pattern,
    forward: Callable[[nn.Module, Any], Any] | None = None,
    block_size: int = 128,
    damp: float = 0.01,
) -> tuple[int, int] | None:
    """Validate :func:`prune_oneshot`'s model-independent arguments; ``(N, M)`` for an N:M pattern, else None.

    Raises:
        ValueError: a value out of its range or not among the choices (the message names both).
        TypeError: ``forward`` is not callable.

    Example:
        >>> check_arguments("wanda", 0.5, "2:4")
        (2, 4)
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not valid; choose one of {', '.join(map(repr, METHODS))}")
    if method == "retrain_free":
        check_fraction("target_sparsity", target_sparsity, upper_open=True)
        check_retrain_free(pattern, "flops")
        if forward is not None and not callable(forward):
            raise TypeError(f"forward must be a callable forward(model, batch), got {type(forward).__name__}")
        return None
    if isinstance(parse_pattern(pattern), Coupled):
        raise ValueError(
            f"pattern '{pattern}' prunes whole heads or neurons: use method='retrain_free' for it (method "
            f"{method!r} prunes single weights: pattern {_PATTERNS})"
        )
    nm = _parse(str(pattern), target_sparsity, "target_sparsity")
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be a callable forward(model, batch), got {type(forward).__name__}")
    _check_sparsegpt(block_size, damp, nm, str(pattern))
    return nm


def _block_inputs(
    model: nn.Module, block: nn.Module, data: list[Any], run: Callable[[nn.Module, Any], Any]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    """The positional and keyword inputs of ``block`` for every batch (the forward stops there)."""
    cached: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        kwargs = {k: None if k in CACHE_ARGUMENTS else v for k, v in kwargs.items()}  # see kv_cache_off
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        cached.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(record, with_kwargs=True)
    try:
        for batch in data:
            before = len(cached)
            with contextlib.suppress(_Stop):
                run(model, batch)
            if len(cached) == before:
                raise RuntimeError("a calibration batch never reached the first block: check blocks and forward")
    finally:
        handle.remove()
    return cached


def _next_args(output: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
    """The next block's positional inputs: this block's output (its first element) in place of the first."""
    hidden = output[0] if isinstance(output, (tuple, list)) else output
    return (hidden, *args[1:])


def _magnitude_mask(weight: Tensor, sparsity: float, nm: tuple[int, int] | None) -> Tensor:
    """Keep-mask of the largest ``|w|``: per layer (unstructured, exact count), or N of every M per row."""
    matrix = as_matrix(weight).float().abs()
    if nm is not None:
        return from_matrix(~_lowest_per_group(matrix, *nm), weight.shape)
    pruned = torch.zeros_like(matrix, dtype=torch.bool)
    count = round(sparsity * matrix.numel())
    if count:
        pruned.view(-1)[torch.sort(matrix.flatten(), stable=True).indices[:count]] = True
    return from_matrix(~pruned, weight.shape)
