"""alignscope: can a spatial warp align a CNN's feature maps of a transformed image with the original's?

Public API::

    import alignscope
    report = alignscope.analyze("tf_efficientnet_lite0", transforms=["rot90", "translate32,0"])
    report = alignscope.analyze(alignscope.ModelOptions("resnet18", pretrained=False, input_size=160))
    report.table          # one row per (model, layer, transform)
    report.save("alignscope-report")
"""
from importlib import import_module
from typing import TYPE_CHECKING

from ._version import __version__
from .errors import AlignscopeError, UsageError

# Public names and the module each lives in. They are imported on first use, so that
# ``alignscope --help`` and the command line's start do not pay for importing torch twice.
_LAZY = {
    "analyze": "engine", "AlignmentStatistic": "measure.metrics", "FeatureCapture": "model.capture", "LayerInfo": "model.capture",
    "probe_layers": "model.capture", "select_layers": "model.capture", "bundled_photos": "inputs.images", "discover_images": "inputs.images",
    "image_stream": "inputs.images", "DataConfig": "model.build", "load_model": "model.build", "ModelOptions": "model.options",
    "AlignmentReport": "report.report",
    "read_report_csv": "report.report", "Transform": "geometry.transforms", "default_transforms": "geometry.transforms",
    "parse_transform": "geometry.transforms", "parse_transforms": "geometry.transforms", "inverse_warp": "geometry.warping",
    "valid_mask": "geometry.warping", "warp": "geometry.warping", "PairOptions": "inputs.options",
    "RunOptions": "engine.options", "FitRequest": "fit.fitting", "RunContext": "engine.context",
    "LayerMeter": "measure.layers", "PredictionMeter": "measure.prediction",
}

__all__ = ["__version__", "AlignscopeError", "UsageError", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'alignscope' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(__all__) | {"__version__"})


if TYPE_CHECKING:  # pragma: no cover
    from .engine import analyze  # noqa: F401
    from .model.capture import FeatureCapture, LayerInfo, probe_layers, select_layers  # noqa: F401
    from .inputs.images import bundled_photos, discover_images, image_stream  # noqa: F401
    from .measure.metrics import AlignmentStatistic  # noqa: F401
    from .model.build import DataConfig, load_model  # noqa: F401
    from .model.options import ModelOptions  # noqa: F401
    from .report.report import AlignmentReport, read_report_csv  # noqa: F401
    from .geometry.transforms import Transform, default_transforms, parse_transform, parse_transforms  # noqa: F401
    from .geometry.warping import inverse_warp, valid_mask, warp  # noqa: F401
    from .inputs.options import PairOptions  # noqa: F401
    from .engine.options import RunOptions  # noqa: F401
    from .engine.context import RunContext  # noqa: F401
    from .fit.fitting import FitRequest  # noqa: F401
    from .measure.layers import LayerMeter  # noqa: F401
    from .measure.prediction import PredictionMeter  # noqa: F401
