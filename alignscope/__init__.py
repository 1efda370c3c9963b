"""alignscope: can a spatial warp align a CNN's feature maps of a transformed image with the original's?

Public API::

    import alignscope
    report = alignscope.analyze("tf_efficientnet_lite0", transforms=["rot90", "translate32,0"])
    report.table          # one row per (model, layer, transform)
    report.save("alignscope-report")
"""
from ._version import __version__
from .engine import analyze
from .errors import AlignscopeError, UsageError
from .hooks import FeatureCapture, LayerInfo, probe_layers, select_layers
from .images import bundled_photos, discover_images, image_stream
from .metrics import AlignmentStatistic
from .models import DataConfig, load_model
from .report import AlignmentReport, read_report_csv
from .transforms import Transform, default_transforms, parse_transform, parse_transforms
from .warping import inverse_warp, valid_mask, warp

__all__ = [
    "__version__", "analyze", "AlignmentReport", "AlignmentStatistic", "AlignscopeError", "UsageError",
    "DataConfig", "FeatureCapture", "LayerInfo", "Transform", "bundled_photos", "default_transforms",
    "discover_images", "image_stream", "inverse_warp", "load_model", "parse_transform", "parse_transforms",
    "probe_layers", "read_report_csv", "select_layers", "valid_mask", "warp",
]
