"""Training and evaluating the STN variants on CPU (or a GPU), reproducibly for a seed."""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .models import STNClassifier, count_parameters


@dataclass
class TrainResult:
    model: STNClassifier
    train_accuracy: float
    test_accuracy: float
    losses: list[float]
    seconds: float


def set_seed(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def accuracy(model: STNClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(1) == labels[start : start + batch_size]).sum())
    return correct / max(1, len(labels))


def train_variant(variant: str, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                  test_labels: torch.Tensor, seed: int = 0, epochs: int = 10, batch_size: int = 64, lr: float = 2e-3,
                  warp: str = "affine", n_classes: int = 10, loc_lr_scale: float = 0.5) -> TrainResult:
    """Adam with a cosine schedule; the localization parameters learn ``loc_lr_scale`` times slower (a usual STN
    precaution against runaway warps). Same seed, same data, same result on CPU."""
    generator = set_seed(seed)
    model = STNClassifier(variant, n_classes, warp)
    loc_params = [p for name, p in model.named_parameters() if name.startswith(("localization", "loc_body"))]
    loc_ids = {id(p) for p in loc_params}
    main_params = [p for p in model.parameters() if id(p) not in loc_ids]
    groups = [{"params": main_params, "lr": lr}] + ([{"params": loc_params, "lr": lr * loc_lr_scale}] if loc_params else [])
    optimizer = torch.optim.Adam(groups)
    steps = epochs * max(1, -(-len(train_labels) // batch_size))
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(1, steps))
    losses = []
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train_labels), generator=generator)
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(model(train_images[index]), train_labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(float(loss.detach()))
    seconds = time.perf_counter() - started
    return TrainResult(model, accuracy(model, train_images, train_labels), accuracy(model, test_images, test_labels),
                       losses, seconds)


def parameter_counts(model: STNClassifier) -> dict[str, int]:
    """Total, classifier-only and localization-only parameter counts (shared ones count as classifier's)."""
    loc = sum(p.numel() for name, p in model.named_parameters() if name.startswith(("localization", "loc_body")))
    total = count_parameters(model)
    return {"parameters": total, "classifier_parameters": total - loc, "localization_parameters": loc}
