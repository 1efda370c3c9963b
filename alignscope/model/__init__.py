"""Models and how their layers are read.

:mod:`.build` (timm names, offline weights, checkpoints, plain modules, :class:`DataConfig`),
:mod:`.options` (:class:`ModelOptions`, validated once), :mod:`.layouts` (NCHW / NHWC / token
grids), :mod:`.capture` (hooks: which layers, and their maps as (B, C, H, W)), :mod:`.lattice`
(a layer's sampling lattice) and :mod:`.lattice_probe` (measuring it through the same capture).
"""
