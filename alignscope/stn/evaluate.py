"""Evaluating a trained STN model on the fixed random test set, in one sweep.

- accuracy: the mean over the test passes of the accuracy on that pass's
  randomly transformed test images (``test_accuracy``; ``test_accuracy_std``
  across passes);
- the angle metric (:mod:`alignscope.stn.angles`) over all passes (rotate
  task and a model with an STN; NaN otherwise);
- alignment behind the accuracy, on pass 0: for every test image x and its
  transformed version g x, at the STN's output (``stn``) and after each
  layer, the distance between the maps of g x and x divided by the chance
  distance (x against another test image), as :func:`alignscope.analyze`
  reports it (:func:`alignscope.measure.metrics.pair_distances`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pandas as pd
import torch

from ..measure.metrics import AlignmentStatistic, pair_distances
from .angles import angle_metrics, warp_angle_deg
from .data import FixedTestSet, apply_task
from .models import STNClassifier


@dataclass
class Evaluation:
    metrics: dict[str, float]
    alignment: dict[str, dict]  # layer -> AlignmentStatistic.compute()
    angles: pd.DataFrame  # pass 0: label, true_deg, warp_deg per test image (empty without an STN or rotation)


@torch.inference_mode()
def evaluate(model: STNClassifier, test: FixedTestSet, batch_size: int = 512) -> Evaluation:
    """Accuracy, angle metric and alignment of ``model`` on ``test`` (see the module docstring)."""
    model.eval()
    correct = torch.zeros(test.passes, dtype=torch.float64)
    true_deg, warp_deg, labels, passes = [], [], [], []
    stats: dict[str, AlignmentStatistic] = {}
    read_angles = test.task == "rotate" and model.localization is not None
    for p, upright, transformed, y, params in test.batches(batch_size):
        correct[p] += float((model(transformed).argmax(1) == y).sum())
        if read_angles:
            true_deg.append(params)
            warp_deg.append(warp_angle_deg(model.predict_theta(transformed)))
            labels.append(y)
            passes.append(torch.full_like(y, p))
        if p == 0 and len(y) >= 2:
            a_maps, b_maps = model.stages(upright), model.stages(transformed)
            if model.supervised:  # its classifier never learned: only the warped image itself says something
                a_maps = {"stn": a_maps["stn"]}
            for layer, a in a_maps.items():
                b = b_maps[layer]
                values = pair_distances(reference=a, aligned=b, unaligned=b, other=torch.roll(a, 1, 0),
                                        mask=torch.ones(a.shape[-2:]))
                stats.setdefault(layer, AlignmentStatistic()).update(values)
    accuracy = correct / len(test.labels)
    if model.supervised:  # the control's classifier never learned: its accuracy says nothing
        accuracy = torch.full_like(accuracy, math.nan)
    metrics = {"test_accuracy": float(accuracy.mean()),
               "test_accuracy_std": float(accuracy.std()) if test.passes > 1 else math.nan,
               "test_passes": test.passes, "angle_std_deg": math.nan, "deming_slope": math.nan}
    angles = pd.DataFrame(columns=["label", "true_deg", "warp_deg"])
    if read_angles:
        t, w, lab, ps = torch.cat(true_deg), torch.cat(warp_deg), torch.cat(labels), torch.cat(passes)
        found = angle_metrics(t, w, lab)
        metrics.update(angle_std_deg=found["angle_std_deg"], deming_slope=found["deming_slope"])
        first = ps == 0
        angles = pd.DataFrame({"label": lab[first].numpy(), "true_deg": t[first].numpy(), "warp_deg": w[first].numpy()})
    elif test.task == "rotate":
        # no STN: the warp is the identity, phi = 0 (the no-compensation reference)
        t = test.params.flatten()
        found = angle_metrics(t, torch.zeros_like(t), test.labels.repeat(test.passes))
        metrics.update(angle_std_deg=found["angle_std_deg"], deming_slope=found["deming_slope"])
    return Evaluation(metrics, {layer: s.compute() for layer, s in stats.items()}, angles)


class CurveProbe:
    """A learning curve: the angle metric and accuracy on a fixed probe set at checkpoints during training.

    The probe is the first ``size`` images of the test set's pass 0 (fixed
    random transforms, the same for every run). Each call evaluates the model
    in eval mode (BatchNorm's running statistics, no dropout), records one row
    (``step``, ``train_loss``: the mean loss since the last checkpoint,
    ``probe_accuracy``, ``probe_angle_std_deg``) and puts the model back in
    training mode; it draws no random numbers, so training goes on exactly as
    without it.
    """

    def __init__(self, test: FixedTestSet, size: int = 1000) -> None:
        n = min(size, len(test.labels))
        self.labels = test.labels[:n]
        self.params = test.params[0, :n]
        self.images = apply_task(test.upright[:n], test.task, self.params)
        self.read_angles = test.task == "rotate"
        self.rows: list[dict] = []

    @torch.inference_mode()
    def __call__(self, step: int, model: STNClassifier, train_loss: float) -> None:
        model.eval()
        accuracy = angle_std = math.nan
        try:
            if not model.supervised:
                accuracy = float((model(self.images).argmax(1) == self.labels).double().mean())
            if self.read_angles:
                theta = model.predict_theta(self.images)
                warp = torch.zeros_like(self.params) if theta is None else warp_angle_deg(theta)
                if torch.isfinite(warp).all():
                    angle_std = angle_metrics(self.params, warp, self.labels)["angle_std_deg"]
        except FloatingPointError:  # a sampling matrix that is no longer finite: the point stays NaN
            pass
        finally:
            model.train()
        self.rows.append({"step": step, "train_loss": train_loss, "probe_accuracy": accuracy,
                          "probe_angle_std_deg": angle_std})
