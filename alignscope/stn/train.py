"""Training one STN variant: the optimisation recipe and its options.

Default recipe (the STN placement papers' MNIST setup): plain SGD (no
momentum), learning rate 0.01, batch 256, step decay x0.1 at half and at
three quarters of the iterations, no gradient clipping, no pretraining. The
localization parameters can learn ``loc_lr_multiplier`` times faster or
slower (1 by default); for ``shared@k`` the shared layers count as the
classifier's. ``ramp`` (0 by default: off) is a curriculum: over the first
``ramp`` fraction of the iterations the transforms grow linearly from the
identity to their full range (rotations from 0 to +-90 degrees). Every sample of every batch is freshly transformed
(:class:`alignscope.stn.data.TrainStream`). The same seed gives the same
model on CPU.
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..errors import UsageError
from .data import TrainStream
from .models import STNClassifier, count_parameters

OPTIMIZERS: dict[str, Callable[[list[dict], float], torch.optim.Optimizer]] = {
    "sgd": lambda groups, lr: torch.optim.SGD(groups, lr=lr),
    "momentum": lambda groups, lr: torch.optim.SGD(groups, lr=lr, momentum=0.9),
    "adam": lambda groups, lr: torch.optim.Adam(groups, lr=lr),
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

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if not (0 < self.lr < math.inf) or not (0 <= self.loc_lr_multiplier < math.inf):
            raise UsageError(f"lr must be > 0 and loc-lr-multiplier >= 0 (finite); got {self.lr}, {self.loc_lr_multiplier}")
        if not 0 <= self.ramp <= 1:
            raise UsageError(f"ramp must be a fraction of the iterations in [0, 1], got {self.ramp}")
        if self.iterations < 1 or self.batch_size < 1:
            raise UsageError(f"iterations and batch size must be at least 1; got {self.iterations}, {self.batch_size}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class TrainResult:
    model: STNClassifier
    losses: list[float]
    seconds: float


def make_optimizer(model: STNClassifier, config: TrainConfig) -> torch.optim.Optimizer:
    """One parameter group for the classifier, one for the localization-only parameters (rate x multiplier)."""
    loc = model.localization_parameters()
    loc_ids = {id(p) for p in loc}
    groups = [{"params": [p for p in model.parameters() if id(p) not in loc_ids], "lr": config.lr}]
    if loc:
        groups.append({"params": loc, "lr": config.lr * config.loc_lr_multiplier})
    return OPTIMIZERS[config.optimizer](groups, config.lr)


def train_variant(variant: str, images: torch.Tensor, labels: torch.Tensor, task: str = "rotate", seed: int = 0,
                  config: TrainConfig = TrainConfig(), classifier: str = "small", warp: str = "affine",
                  n_classes: int = 10, on_step: Callable[[int], None] | None = None) -> TrainResult:
    """Train ``variant`` for ``config.iterations`` steps on upright ``images`` (N, 1, 28, 28), freshly transformed.

    ``seed`` fixes the initialisation and the stream of batches and transforms;
    ``on_step(i)`` is called after step i (1-based). Losses are per step.
    """
    torch.manual_seed(seed)
    model = STNClassifier(variant, n_classes, warp, classifier)
    optimizer = make_optimizer(model, config)
    milestones = sorted({max(1, round(f * config.iterations)) for f in config.decay_at if 0 < f < 1})
    schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=config.decay_factor)
    stream = TrainStream(images, labels, task, config.batch_size, seed)
    batches = iter(stream)
    ramp_steps = config.ramp * config.iterations
    losses: list[float] = []
    started = time.perf_counter()
    model.train()
    for step in range(1, config.iterations + 1):
        stream.strength = min(1.0, step / ramp_steps) if ramp_steps > 0 else 1.0
        x, y, _ = next(batches)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        value = float(loss.detach())
        if not math.isfinite(value):
            raise FloatingPointError(f"{variant} seed {seed}: the loss became {value} at step {step}; "
                                     "lower --lr or --loc-lr-multiplier")
        losses.append(value)
        if on_step is not None:
            on_step(step)
    return TrainResult(model.eval(), losses, time.perf_counter() - started)


def parameter_counts(model: STNClassifier) -> dict[str, int]:
    """Total, classifier-only and localization-only parameter counts (shared layers count as the classifier's)."""
    loc = sum(p.numel() for p in model.localization_parameters())
    total = count_parameters(model)
    return {"parameters": total, "classifier_parameters": total - loc, "localization_parameters": loc}
