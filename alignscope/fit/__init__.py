"""Fitted alignments, calibrated on one split of the images and measured on the other.

:mod:`.family` (the warp families), :mod:`.score` (the resampling charge), :mod:`.search`
(Gauss-Newton warp search), :mod:`.channels` (channel maps and permutations) and
:mod:`.fitting` (:class:`FitRequest`, the calibrator and the per-pair fits).
"""
