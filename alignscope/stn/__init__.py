"""Spatial transformer experiments: where to put the STN, and what sharing the localization layers buys.

See :mod:`alignscope.stn.models` (the variants), :mod:`alignscope.stn.data`
(scikit-learn digits, rotated or scaled, offline) and
:func:`alignscope.stn.experiment.run_experiment`.
"""
from .data import TASKS, load_splits
from .experiment import STNExperiment, measure_alignment, run_experiment
from .models import VARIANTS, WARPS, LocalizationHead, STNClassifier, spatial_transform
from .train import train_variant

__all__ = ["TASKS", "VARIANTS", "WARPS", "LocalizationHead", "STNClassifier", "STNExperiment", "load_splits",
           "measure_alignment", "run_experiment", "spatial_transform", "train_variant"]
