"""The alignment engine: image / transformed-image pairs through a model, layer by layer.

For an image batch x, a transform g and a layer with output F(.):
a = F(x), b = F(g x), b' = g^-1 b (aligned), M = valid cells. Per image the
distances ||M (a - b')||, ||M (a - b)||, ||M (a - F(g^-1 g x))|| (floor) and
||M (a - a_other)|| (chance) are reduced to statistics (:mod:`alignscope.measure`).
:mod:`.context` is the set-up every run shares, :mod:`.options` how a run executes,
:mod:`.analysis` the :func:`analyze` loop: set-up, measure, merge ranks, report.
"""
from .analysis import analyze
from .context import RunContext, refuse_nonfinite_weights
from .options import RunOptions, resolve_amp

__all__ = ["RunContext", "RunOptions", "analyze", "refuse_nonfinite_weights", "resolve_amp"]
