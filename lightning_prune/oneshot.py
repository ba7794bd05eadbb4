"""Post-training pruning from calibration data, one layer at a time: SparseGPT and Wanda.

- :func:`sparsegpt_prune`: masks chosen and the remaining weights updated column block by column block from
  the layer's input Hessian (Frantar & Alistarh 2023, "SparseGPT: Massive Language Models Can Be Accurately
  Pruned in One-Shot", arXiv:2301.00774).
- :func:`wanda_mask`: per output row, the weights with the lowest ``|W_ij| * ||X_j||_2`` (Sun et al. 2024,
  "A Simple and Effective Pruning Approach for Large Language Models", arXiv:2306.11695); no weight update.

Masks are True where a weight is kept. A convolution weight ``[Cout, Cin, *kernel]`` is seen as the matrix
``[Cout, prod(kernel) * Cin]`` with the input channel innermost (:func:`~lightning_prune.patterns.as_matrix`):
Hessians and input norms are over those columns.
"""

from __future__ import annotations

import math
import re

import torch
from torch import Tensor

from lightning_prune.patterns import as_matrix, from_matrix

__all__ = ["sparsegpt_prune", "wanda_mask"]

_PATTERNS = "'unstructured' or 'N:M' (e.g. '2:4')"


def _parse(pattern: str, sparsity: float) -> tuple[int, int] | None:
    """``(n, m)`` for an N:M pattern (whose sparsity must be N/M), None for unstructured; ValueError otherwise."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str, {_PATTERNS}; got {type(pattern).__name__} {pattern!r}")
    text = pattern.strip().lower()
    if text == "unstructured":
        return None
    match = re.fullmatch(r"(\d+):(\d+)", text)
    if match is None or not 0 < int(match[1]) < int(match[2]):
        raise ValueError(f"pattern {pattern!r} is not valid here; choose {_PATTERNS} with 0 < N < M")
    n, m = int(match[1]), int(match[2])
    if not math.isclose(sparsity, n / m, abs_tol=1e-9):
        raise ValueError(f"pattern '{n}:{m}' prunes exactly {n}/{m} of the weights; sparsity {sparsity} differs")
    return n, m


def _check_columns(pattern: tuple[int, int] | None, cols: int) -> None:
    if pattern is not None and cols % pattern[1]:
        raise ValueError(f"pattern '{pattern[0]}:{pattern[1]}' needs the input width ({cols}) to be a multiple of M")


def wanda_mask(weight: Tensor, input_sq_norms: Tensor, sparsity: float, pattern: str = "unstructured") -> Tensor:
    """Wanda's mask: per output row, prune the weights of lowest ``|W_ij| * ||X_j||_2`` (arXiv:2306.11695).

    The comparison group is each output row: unstructured prunes exactly ``floor(cols * sparsity)`` weights
    of every row; ``N:M`` prunes the ``N`` lowest of every ``M`` consecutive inputs of every row. Ties go to the
    lower column index.

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
    _check_columns(nm, cols)
    score = matrix.float().abs() * norms.to(matrix.device, torch.float32).clamp_min(0.0).sqrt()
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=matrix.device)
    if nm is None:
        count = math.floor(cols * sparsity)
        if count:
            index = torch.sort(score, dim=1, stable=True).indices[:, :count]
            pruned.scatter_(1, index, True)
    else:
        n, m = nm
        groups = score.reshape(rows, cols // m, m)
        index = torch.sort(groups, dim=2, stable=True).indices[..., :n]
        pruned.view(rows, cols // m, m).scatter_(2, index, True)
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
    group of M, the N lowest of the group in each row), then column by column the pruned weights are zeroed
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
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not damp >= 0.0:
        raise ValueError(f"damp must be a number >= 0, got {damp!r}")
    matrix = as_matrix(weight.detach())
    rows, cols = matrix.shape
    if tuple(hessian.shape) != (cols, cols):
        raise ValueError(
            f"hessian has shape {tuple(hessian.shape)}; weight {tuple(weight.shape)} needs ({cols}, {cols})"
        )
    _check_columns(nm, cols)
    if nm is not None and block_size % nm[1]:
        raise ValueError(f"block_size ({block_size}) must be a multiple of M ({nm[1]}) for pattern '{pattern}'")
    W = matrix.to(torch.float32).clone()
    H = hessian.detach().to(W.device, torch.float32).clone()
    if not bool(torch.isfinite(H).all()):
        raise RuntimeError("the Hessian has non-finite entries (non-finite calibration activations?)")
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    torch.diagonal(H).add_(damp * float(torch.diagonal(H).mean()))
    try:
        U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    except torch.linalg.LinAlgError as error:
        raise RuntimeError(f"the Hessian is not positive definite even with damp={damp}; raise damp") from error
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=W.device)
    for start in range(0, cols, block_size):
        stop = min(start + block_size, cols)
        W1, U1 = W[:, start:stop].clone(), U[start:stop, start:stop]
        d = torch.diagonal(U1)
        Err1 = torch.zeros_like(W1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None and sparsity > 0:
            score = W1.square() / d.square()
            threshold = torch.sort(score.flatten()).values[int(score.numel() * sparsity)]
            mask1 = score <= threshold
        for i in range(stop - start):
            if nm is not None and i % nm[1] == 0:
                score = W1[:, i : i + nm[1]].square() / d[i : i + nm[1]].square()
                index = torch.topk(score, nm[0], dim=1, largest=False).indices
                mask1[:, i : i + nm[1]].scatter_(1, index, True)
            w = W1[:, i]
            q = w.masked_fill(mask1[:, i], 0.0)
            err = (w - q) / d[i]
            W1[:, i:].sub_(err.unsqueeze(1) * U1[i, i:].unsqueeze(0))
            W1[:, i] = q
            Err1[:, i] = err
        W[:, start:stop] = W1
        pruned[:, start:stop] = mask1
        W[:, stop:].sub_(Err1 @ U[start:stop, stop:])
    kept = ~pruned
    W.mul_(kept)  # exactly zero where pruned, including dead columns the mask kept
    new = from_matrix(W.to(weight.dtype), weight.shape)
    return new.contiguous(), from_matrix(kept, weight.shape).contiguous()
