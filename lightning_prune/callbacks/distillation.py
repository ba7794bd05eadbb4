"""``Distillation``: the dense model teaches the one being pruned (a KL term with temperature on the loss)."""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from typing_extensions import override

__all__ = ["Distillation", "distillation_loss"]


def distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """Hinton, Vinyals and Dean 2015 (arXiv:1503.02531): ``T^2 * KL(softmax(t/T) || softmax(s/T))``.

    The ``T^2`` keeps the gradient's scale independent of the temperature. Logits of any shape ``[..., C]``
    (a class per example, or a token per position) are compared over the last dimension and averaged over
    the rest.

    Example:
        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> float(distillation_loss(z, z, temperature=2.0))
        0.0
    """
    classes = student.shape[-1]
    log_p = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)
    log_q = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature**2


def _logits(output: Any) -> Tensor:
    """The logits in a module's output: a tensor, ``.logits`` (Hugging Face), ``["logits"]`` or the first item."""
    if isinstance(output, Tensor):
        return output
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping) and "logits" in output:
        return output["logits"]
    if isinstance(output, tuple | list) and output and isinstance(output[0], Tensor):
        return output[0]
    raise TypeError(f"cannot find logits in an output of type {type(output).__name__}; return a tensor or .logits")


class Distillation(Callback):
    """Knowledge distillation from a dense teacher while the model is pruned and fine-tuned.

    Every training step's loss becomes ``(1 - alpha) * loss + alpha * T^2 * KL(teacher || student)`` at
    temperature ``T`` (Hinton et al. 2015, arXiv:1503.02531; :func:`distillation_loss`). Pruning papers
    that recover accuracy at high sparsity use it with the unpruned model as the teacher (Sanh et al. 2020,
    "Movement Pruning", arXiv:2005.07683; Kurtic et al. 2022, "The Optimal BERT Surgeon",
    arXiv:2203.07259; Intel Neural Compressor's published pruning results).

    The student's logits are the output of ``module`` (the LightningModule itself by default, or a
    submodule by name) in the training step, caught by a forward hook; the teacher is called on the same
    inputs, in eval mode and without gradients. The LightningModule's ``training_step`` is wrapped for the
    duration of ``fit`` (it must return the loss, or a dict with ``"loss"``) and ``distill/kd`` is logged.
    Nothing of the teacher is in checkpoints: a resumed run builds it again from the same ``teacher``.

    Args:
        teacher: the dense model, a module taking the same inputs as ``module``; or the path of a
            checkpoint (Lightning ``.ckpt`` or a ``state_dict`` file) of the LightningModule, loaded into a
            copy of the student when training starts.
        temperature: ``T`` > 0; softens both distributions (2 to 4 is usual).
        alpha: weight of the distillation term, in [0, 1]; 1 trains on the teacher alone.
        module: the submodule whose output are the student's logits (``""``: the LightningModule).

    Raises:
        ValueError: ``temperature`` or ``alpha`` out of range, ``module`` not found; at the first training step
            (before any weight changes) if ``module`` was not called in it.
        TypeError: ``teacher`` neither a module nor a path.

    Example:
        >>> teacher = nn.Linear(4, 3)
        >>> kd = Distillation(teacher, temperature=2.0, alpha=0.5)
        >>> kd.temperature, kd.alpha
        (2.0, 0.5)
        >>> trainer = pl.Trainer(callbacks=[Pruning(0.9), kd])  # doctest: +SKIP
    """

    def __init__(
        self, teacher: nn.Module | str | Path, temperature: float = 2.0, alpha: float = 0.5, module: str = ""
    ) -> None:
        if not isinstance(teacher, nn.Module | str | Path):
            raise TypeError(f"teacher={type(teacher).__name__} is not valid; pass an nn.Module or a checkpoint path")
        if isinstance(teacher, str | Path) and not Path(teacher).exists():
            raise ValueError(f"teacher={str(teacher)!r} is not valid: no such checkpoint file")
        if not isinstance(temperature, int | float) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is not valid; choose a number > 0 (2 to 4 is usual)")
        if not isinstance(alpha, int | float) or not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha={alpha!r} is not valid; choose the distillation term's weight in [0, 1]")
        self.teacher = teacher
        self.temperature, self.alpha, self.module = float(temperature), float(alpha), module
        self._net: nn.Module | None = teacher if isinstance(teacher, nn.Module) else None
        self._caught: tuple[tuple[Any, ...], dict[str, Any], Any] | None = None
        self._hook: Any = None
        self._step: Callable[..., Any] | None = None  # the LightningModule's own training_step

    @property
    def state_key(self) -> str:
        """Identifies this callback (its settings) in checkpoints."""
        return self._generate_state_key(temperature=self.temperature, alpha=self.alpha, module=self.module)

    # ------------------------------------------------------------------ Lightning hooks
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Check that ``module`` exists (when the model is built), before training starts."""
        if stage == "fit" and self.module:
            try:
                pl_module.get_submodule(self.module)
            except AttributeError as err:
                if type(pl_module).configure_model is not pl.LightningModule.configure_model:
                    return  # the layers may appear in configure_model: checked at fit start
                raise ValueError(
                    f"module={self.module!r} is not valid: the LightningModule has no such submodule"
                ) from err

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build or place the teacher, catch the student's logits, wrap ``training_step``."""
        try:
            student = pl_module.get_submodule(self.module) if self.module else pl_module
        except AttributeError as err:
            raise ValueError(f"module={self.module!r} is not valid: the LightningModule has no such submodule") from err
        if self._net is None:
            self._net = self._load(trainer, student)
        self._net.to(pl_module.device).eval().requires_grad_(False)
        self._hook = student.register_forward_hook(self._catch, with_kwargs=True)
        self._step = pl_module.training_step
        pl_module.training_step = self._training_step(pl_module, self._step)  # type: ignore[method-assign]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """The LightningModule's own ``training_step`` back; no hook left."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        if self._step is not None:
            del pl_module.training_step  # the instance attribute: the class's method shows again
            self._step = None

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """A failed fit is undone as one that ended."""
        self.teardown(trainer, pl_module, "fit")

    # ------------------------------------------------------------------ helpers
    def _load(self, trainer: pl.Trainer, student: nn.Module) -> nn.Module:
        """A copy of the student with the teacher checkpoint's weights."""
        state = torch.load(self.teacher, map_location="cpu", weights_only=True)  # type: ignore[arg-type]
        state = state.get("state_dict", state)
        if self.module:
            prefix = f"{self.module}."
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)} or state
        net = copy.deepcopy(student, memo={id(trainer): trainer})  # a LightningModule refers to its trainer
        missing, unexpected = net.load_state_dict(state, strict=False)
        if missing:
            raise ValueError(
                f"teacher={str(self.teacher)!r} does not hold the student's weights: {len(missing)} missing, e.g. "
                f"{missing[:3]}"
            )
        del unexpected  # e.g. metrics or pruning buffers of a LightningModule checkpoint
        return net

    def _catch(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        if module.training:
            self._caught = (args, kwargs, output)

    def _training_step(self, pl_module: pl.LightningModule, step: Callable[..., Any]) -> Callable[..., Any]:
        def training_step(*args: Any, **kwargs: Any) -> Any:
            self._caught = None
            out = step(*args, **kwargs)
            if out is None:
                return out  # the step was skipped
            if self._caught is None:
                name = repr(self.module) if self.module else "'' (the LightningModule)"
                raise ValueError(
                    f"Distillation(module={name}) was not called in training_step, so there are no student "
                    "logits to distill into: set module to the submodule that computes them, e.g. module='net'"
                )
            inputs, kw, output = self._caught
            assert self._net is not None
            with torch.no_grad():
                target = _logits(self._net(*inputs, **kw))
            kd = distillation_loss(_logits(output), target, self.temperature)
            pl_module.log("distill/kd", kd.detach(), prog_bar=False)
            self._caught = None
            if isinstance(out, Tensor):
                return (1 - self.alpha) * out + self.alpha * kd
            return {**out, "loss": (1 - self.alpha) * out["loss"] + self.alpha * kd}

        return training_step
