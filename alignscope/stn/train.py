"""Training one STN variant: the optimisation recipe and its options.

The papers' MNIST recipe: plain SGD (no momentum), learning rate 0.01,
batch 256, step decay x0.1 at half and at three quarters of the iterations,
no gradient clipping, no pretraining. The localization parameters can learn
``loc_lr_multiplier`` times faster or slower (1 by default) and carry their
own L2 ``loc_weight_decay`` (0 by default); for ``shared@k`` the shared
layers count as the classifier's. ``schedule`` picks how the rate falls
(``SCHEDULES``: ``step`` at ``decay_at``, ``cosine`` to zero, ``constant``).
``ramp`` (0 by default: off) is a curriculum: over the first ``ramp``
fraction of the iterations the transforms grow linearly from the identity to
their full range (rotations from 0 to +-90 degrees). Every sample of every
batch is freshly transformed (:class:`alignscope.stn.data.TrainStream`). The
same seed gives the same model on CPU.

``TrainConfig()`` is the papers' recipe at a short length; the default of
``alignscope stn`` is :data:`DIGITS_RECIPE`, the recipe that brought the
input STN closest to undoing the rotation on the offline digits within the CPU
budget (see docs/stn-experiments.md).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .data import TrainStream, task_matrices
from .models import STNClassifier, count_parameters

OPTIMIZERS: dict[str, Callable[[list[dict], float], torch.optim.Optimizer]] = {
    "sgd": lambda groups, lr: torch.optim.SGD(groups, lr=lr),
    "momentum": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9),
    "adam": lambda groups, lr: torch.optim.Adam(groups, lr=lr),
}

# learning-rate factor at step ``step`` of ``total``, given the config (for the step schedule's decay points)
SCHEDULES: dict[str, Callable[[int, int, "TrainConfig"], float]] = {
    "step": lambda step, total, c: c.decay_factor ** sum(step >= m for m in decay_milestones(c, total)),
    "cosine": lambda step, total, c: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total)),
    "constant": lambda step, total, c: 1.0,
}


@dataclass(frozen=True)
class TrainConfig:
    """The optimisation recipe (see the module docstring)."""

    optimizer: str = "sgd"
    lr: float = 0.01
    loc_lr_multiplier: float = 1.0
    iterations: int = 3000
    batch_size: int = 256
    decay_at: tuple[float, ...] = (0.5, 0.75)  # fractions of the iterations where the rate drops x0.1
    decay_factor: float = 0.1
    ramp: float = 0.0  # fraction of the iterations over which the transform range grows to full
    schedule: str = "step"
    loc_weight_decay: float = 0.0  # L2 on the localization-only parameters

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (0 < self.lr < math.inf) or not (0 <= self.loc_lr_multiplier < math.inf):
            raise UsageError(f"lr must be > 0 and loc-lr-multiplier >= 0 (finite); got {self.lr}, {self.loc_lr_multiplier}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if not (0 <= self.loc_weight_decay < math.inf):
            raise UsageError(f"loc-weight-decay must be >= 0 and finite; got {self.loc_weight_decay}")
        if not 0 <= self.ramp <= 1:
            raise UsageError(f"ramp must be a fraction of the iterations in [0, 1], got {self.ramp}")
        if self.iterations < 1 or self.batch_size < 1:
            raise UsageError(f"iterations and batch size must be at least 1; got {self.iterations}, {self.batch_size}")

    def as_dict(self) -> dict:
        return asdict(self)


# Named recipes: ``alignscope stn --recipe NAME`` starts from one, and each recipe option overrides a field.
RECIPES: dict[str, TrainConfig] = {
    # the papers' recipe (SGD 0.01, no momentum, batch 256, step decay); they train 150k steps on MNIST
    "paper": TrainConfig(),
    # the offline digits within the CPU budget, with the narrow classifier (see docs/stn-experiments.md)
    "digits": TrainConfig(optimizer="adam", lr=1e-3, loc_lr_multiplier=3.0, iterations=8000, batch_size=64, ramp=0.6,
                          schedule="cosine"),
}
DIGITS_RECIPE = RECIPES["digits"]


def recipe(name: str, **overrides) -> TrainConfig:
    """``RECIPES[name]`` with the fields in ``overrides`` that are not None replaced."""
    if name not in RECIPES:
        raise UsageError(f"recipe must be one of {', '.join(RECIPES)}, got {name!r}")
    return replace(RECIPES[name], **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class TrainResult:
    model: STNClassifier
    losses: list[float]
    seconds: float  # wall clock
    cpu_seconds: float  # CPU time of this process, all threads (one thread: about the wall time on an idle core)
    diverged_at: int | None = None  # the step whose loss was NaN or infinite (training stopped there); None if none


def make_optimizer(model: STNClassifier, config: TrainConfig) -> torch.optim.Optimizer:
    """One parameter group for the classifier, one for the localization-only parameters (rate x multiplier)."""
    loc = model.localization_parameters()
    loc_ids = {id(p) for p in loc}
    groups = [{"params": [p for p in model.parameters() if id(p) not in loc_ids], "lr": config.lr}]
    if loc:
        # The multiplier makes up for the weak gradient that reaches the localization net through the
        # classifier; the supervised control's loss reaches it directly (at x3 its ReLUs die early on).
        multiplier = 1.0 if model.supervised else config.loc_lr_multiplier
        groups.append({"params": loc, "lr": config.lr * multiplier, "weight_decay": config.loc_weight_decay})
    return OPTIMIZERS[config.optimizer](groups, config.lr)


def decay_milestones(config: TrainConfig, total: int) -> list[int]:
    """Steps (1-based counts of optimizer steps) after which the step schedule has dropped the rate."""
    return sorted({max(1, round(f * total)) for f in config.decay_at if 0 < f < 1})


def make_schedule(optimizer: torch.optim.Optimizer, config: TrainConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """The rate of every group times ``SCHEDULES[config.schedule]`` after each step."""
    rule = SCHEDULES[config.schedule]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: rule(step, config.iterations, config))


def train_variant(variant: str, images: torch.Tensor, labels: torch.Tensor, task: str = "rotate", seed: int = 0,
                  config: TrainConfig = TrainConfig(), classifier: str = "small", warp: str = "affine",
                  n_classes: int = 10, on_step: Callable[[int], None] | None = None,
                  checkpoint: Callable[[int, STNClassifier, float], None] | None = None,
                  checkpoint_every: int = 0) -> TrainResult:
    """Train ``variant`` for ``config.iterations`` steps on upright ``images`` (N, 1, 28, 28), freshly transformed.

    ``seed`` fixes the initialisation and the stream of batches and transforms;
    ``on_step(i)`` is called after step i (1-based). Losses are per step.
    ``checkpoint(i, model, loss)`` is called before the first step (i = 0)
    and after every ``checkpoint_every``-th step and the last, with the mean
    training loss since the previous call (NaN at 0); the model is in training
    mode and must be left so (a learning curve, :class:`alignscope.stn.evaluate.CurveProbe`).
    A loss or a sampling matrix that becomes NaN or infinite stops the training
    before that step's update: the result says at which step (``diverged_at``),
    and the model keeps the weights that produced it.
    ``supervised`` (a control) sees the same batches, but its loss is the mean squared
    error between the predicted sampling matrix and the one that exactly undoes each
    sample's transform; only its localization net learns, at ``config.lr`` (the
    localization multiplier does not apply) and without the ramp, and the classifier
    stays as initialised and is not evaluated.
    """
    torch.manual_seed(seed)
    model = STNClassifier(variant, n_classes, warp, classifier)
    optimizer = make_optimizer(model, config)
    schedule = make_schedule(optimizer, config)
    stream = TrainStream(images, labels, task, config.batch_size, seed)
    batches = iter(stream)
    # the curriculum is for learning through the classifier; the control sees the full range from the first step
    # (with the ramp its early targets are all near the identity, and its ReLUs can die before they matter)
    ramp_steps = 0.0 if model.supervised else config.ramp * config.iterations
    losses: list[float] = []
    diverged_at = None
    started, cpu_started = time.perf_counter(), time.process_time()
    model.train()
    if checkpoint is not None:
        checkpoint(0, model, math.nan)
    for step in range(1, config.iterations + 1):
        stream.strength = min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0
        x, y, params = next(batches)
        try:
            if model.supervised:
                # apply_task samples the input at T^-1 q: sampling the transformed image at T q gives it back upright
                loss = F.mse_loss(model.predict_theta(x), task_matrices(task, params).to(x.dtype))
            else:
                loss = F.cross_entropy(model(x), y)
        except FloatingPointError:  # the STN's sampling matrix became non-finite (see spatial_transform)
            loss = torch.tensor(math.nan)
        value = float(loss.detach())
        losses.append(value)
        if not math.isfinite(value):  # stop before a backward pass through NaNs
            diverged_at = step
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if on_step is not None:
            on_step(step)
        if checkpoint is not None and (step == config.iterations or (checkpoint_every and step % checkpoint_every == 0)):
            since = losses[-(step % checkpoint_every or checkpoint_every):] if checkpoint_every else losses
            checkpoint(step, model, sum(since) / len(since))
    return TrainResult(model.eval(), losses, time.perf_counter() - started, time.process_time() - cpu_started, diverged_at)


def parameter_counts(model: STNClassifier) -> dict[str, int]:
    """Total, classifier-only and localization-only parameter counts (shared layers count as the classifier's)."""
    loc = sum(p.numel() for p in model.localization_parameters())
    total = count_parameters(model)
    return {"parameters": total, "classifier_parameters": total - loc, "localization_parameters": loc}
