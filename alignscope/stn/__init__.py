"""Spatial transformer experiments: where to put the STN, and does it undo the rotation?

See :mod:`alignscope.stn.data` (digits, MNIST IDX files or a labelled folder,
freshly transformed per sample and epoch), :mod:`alignscope.stn.models` (the
classifiers and the variants), :mod:`alignscope.stn.train` (the recipe),
:mod:`alignscope.stn.angles` (the angle metric) and
:func:`alignscope.stn.experiment.run_experiment`.
"""
from .angles import angle_metrics, deming_slope, warp_angle_deg
from .data import TASKS, FixedTestSet, TrainStream, UprightData, load_data, read_idx
from .evaluate import evaluate
from .experiment import STNExperiment, run_experiment
from .saved import combine_experiments, load_experiment
from .models import CLASSIFIERS, WARPS, STNClassifier, spatial_transform, variant_names
from .train import RECIPES, SCHEDULES, TrainConfig, recipe, train_variant

__all__ = ["CLASSIFIERS", "RECIPES", "SCHEDULES", "TASKS", "WARPS", "STNClassifier", "STNExperiment", "FixedTestSet",
           "TrainConfig", "TrainStream", "UprightData", "angle_metrics", "combine_experiments", "deming_slope", "evaluate",
           "load_data", "load_experiment", "read_idx", "recipe", "run_experiment", "spatial_transform", "train_variant",
           "variant_names", "warp_angle_deg"]
