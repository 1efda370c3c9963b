"""The :func:`analyze` loop: set-up (:class:`~.context.RunContext`), the measuring loop over batches, the
merge of ranks under torchrun, and the report. Fitted alignments (a searched warp, channel maps) are
calibrated on one split of the images and measured on the other (:mod:`alignscope.fit`).
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Sequence

import pandas as pd
import torch
from torch import nn

from ..errors import ImageError, UsageError
from ..fit.fitting import MIN_PER_SPLIT, Calibrator, FitRequest, PairFit
from ..inputs.images import ImageSource, ImageStream, split_stream
from ..inputs.options import PairOptions
from ..inputs.pairs import PairFeeder, chance_partners
from ..geometry.transforms import Transform
from ..measure.layers import LayerMeter
from ..measure.lie import LieMeter
from ..measure.placement import PlacementMeter
from ..measure.prediction import PredictionMeter, image_rows
from ..model.capture import FeatureCapture
from ..model.substitute import MapSubstitution
from ..model.options import ModelOptions
from ..model.preserve import left_as_found
from ..report.caveats import nonfinite_layers, refuse_all_duplicates, warn_chance_collapse, warn_left_out
from ..report.output_rows import output_layer_name, with_output_rows, with_placement_rows
from ..report.report import AlignmentReport
from ..runtime.allocator import malloc_tuning, release_free_memory, tune_malloc
from ..runtime.distributed import all_reduce_sum, gather_to_main, init_from_environment
from ..runtime.timing import PhaseTimer
from .context import RunContext
from .options import RunOptions, refuse_both
from .lie import LieRunner
from .placement import FITTED_PLACEMENTS, PlacementRunner

log = logging.getLogger("alignscope")

ProgressCallback = Callable[[int, int], None]


def analyze(
    model: str | nn.Module | ModelOptions = "tf_efficientnet_lite0",
    transforms: Sequence[str | Transform] | str | None = None,
    images: ImageSource = None,
    layers: str | Sequence[str] | None = None,
    batch_size: int = 16,
    mask: str = "auto",
    device: str | torch.device = "cpu",
    seed: int = 0,
    per_image: bool = False,
    max_images: int | None = None,
    weights: str | None = "auto",
    pretrained: bool = True,
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    optimal: str | Sequence[str] | None = None,
    channel_map: str | Sequence[str] | None = None,
    ridge: float | str = "auto",
    search_steps: int = 60,
    calibration_images: int | None = None,
    amp: str | None = None,
    channels_last: bool | None = None,
    workers: int = 0,
    progress: ProgressCallback | None = None,
    timer: PhaseTimer | None = None,
    output: bool = True,
    placement: bool = False,
    lie: bool | str | Sequence[str] = False,
    *,
    pairs: PairOptions | None = None,
    run: RunOptions | None = None,
    fits: FitRequest | None = None,
) -> AlignmentReport:
    """Measure, per layer and transform, how well g^-1 aligns F(g x) with F(x).

    ``model``: a timm name (weights as in :func:`~alignscope.model.build.load_model`),
    an ``nn.Module`` with ``input_size`` (C, H, W), ``mean`` and ``std``, or a
    :class:`~alignscope.model.options.ModelOptions` holding the model, ``weights``,
    ``pretrained``, ``input_size``, ``mean``, ``std``, ``layers`` and
    ``device`` (those keyword arguments then stay at their defaults).
    ``images``: a folder, file, glob, list of paths, ``None`` for the bundled
    photos, or an already normalized float tensor N x 3 x H x W.
    ``transforms``: specs (see :mod:`alignscope.geometry.transforms`), Transform
    objects, or ``None`` for the default set. ``mask``: ``auto`` | ``disk`` | ``none``.

    Fitted alignments (each adds a ``*_error`` column): ``optimal`` =
    ``"family"`` and/or ``"affine"`` searches the best spatial warp
    (``optimal_error``, ``optimal_affine_error``); ``channel_map`` =
    ``"linear"`` and/or ``"permutation"`` re-mixes channels after g^-1
    (``channel_mapped_error``, ``permuted_error``). They are fitted on
    ``calibration_images`` images (default: half, at most 16) and every
    column of the table is then measured on the remaining images only.
    ``amp``: ``"bf16"`` | ``"fp16"`` runs the model under autocast (maps are
    compared in float32, statistics accumulate in float64); ``channels_last``
    (default: on for CUDA) feeds NHWC tensors; ``workers`` decode images in
    that many processes. Under ``torchrun`` the images are sharded across
    ranks and the statistics reduced (see :mod:`alignscope.runtime.distributed`).
    ``timer``: a :class:`~alignscope.runtime.timing.PhaseTimer` to collect the time
    per phase in (one is made if not given; the split lands in ``meta``).
    ``ridge`` regularizes the linear map (``"auto"``: two-fold
    cross-validation on the calibration images), ``search_steps`` caps the
    descent steps per start of the warp search (it stops earlier at its tolerance).
    ``output``: for a model with a classifier head, add the output row per
    transform (top-1 agreement and softmax KL between x and g x; see
    :mod:`alignscope.measure.prediction`); the forward passes then run to the end.
    ``False`` skips it; ``meta["output"]`` says whether it was measured and why not.
    ``placement``: add the placement rows (``kind`` = ``"placement"``): for each layer and transform, the
    prediction when layer k's output of g x is replaced by g⁻¹ of it, an exact STN there, against f(x)
    (:mod:`alignscope.measure.placement`); one more forward pass per layer, transform and image (and per
    fit asked for). Needs a classifier head.
    ``lie``: add the Lie-derivative rows (``kind`` = ``"lie"``) along the named generators (``True``: all six:
    translate_x, translate_y, rotate, scale, shear_x, shear_y; :mod:`alignscope.measure.lie`): per layer
    ``lie_error`` and ``lie_relative``, at the output ``lie_output``; one forward-mode pass per generator and batch.

    The settings come as three option objects too, each validated once: ``pairs``
    (:class:`~alignscope.inputs.options.PairOptions`: transforms, images, batch size, mask, seed,
    max images, workers), ``run`` (:class:`~alignscope.engine.options.RunOptions`: amp,
    channels_last, output, per_image, placement) and ``fits`` (:class:`~alignscope.fit.fitting.FitRequest`);
    one given replaces the keywords it covers.
    """
    options = ModelOptions.build(model, weights=weights, pretrained=pretrained, input_size=input_size, mean=mean, std=std,
                                 layers=layers, device=device)
    tune_malloc()
    refuse_both("pairs", pairs, dict(transforms=(transforms, None), images=(images, None), batch_size=(batch_size, 16),
                                     mask=(mask, "auto"), seed=(seed, 0), max_images=(max_images, None), workers=(workers, 0)))
    refuse_both("run", run, dict(amp=(amp, None), channels_last=(channels_last, None), output=(output, True),
                                 per_image=(per_image, False), placement=(placement, False),
                                 lie=(lie, False)))
    refuse_both("fits", fits, dict(optimal=(optimal, None), channel_map=(channel_map, None), ridge=(ridge, "auto"),
                                   search_steps=(search_steps, 60), calibration_images=(calibration_images, None)))
    pairs = pairs or PairOptions.build(transforms, images, batch_size, mask, seed, max_images, workers)
    run = run or RunOptions(amp, channels_last, output, per_image, placement, lie)
    request = fits or FitRequest.build(optimal, channel_map, ridge, search_steps, calibration_images)
    with left_as_found(options.model):  # a caller's module comes back in its own mode, device and flags
        return _measure(options, pairs, run, request, progress, timer)


def _measure(options: ModelOptions, pairs: PairOptions, run: RunOptions, request: FitRequest,
             progress: ProgressCallback | None, timer: PhaseTimer | None) -> AlignmentReport:
    """Set-up, the measuring loop, the merge of ranks and the report (see :func:`analyze`)."""
    started = time.perf_counter()
    ranks, dev = init_from_environment(options.resolve_device())
    torch.manual_seed(pairs.seed)
    ctx = RunContext.open(options, pairs, dev)
    head = ctx.output_head(run.output)
    if run.placement and not head.measured:
        raise UsageError(f"placement compares the model's predictions, but {head.reason}; drop --placement")
    channels_last = run.channels_last_on(dev)
    if channels_last:
        ctx.model.to(memory_format=torch.channels_last)
    stream = ctx.stream()
    total, calibration = len(stream), None
    if request.active:
        calibration, stream = split_stream(stream, request.split(len(stream))[0])
    stream.shard = (ranks.rank, ranks.world_size)
    if ranks.active and not ranks.is_main:
        progress = None
    setup_seconds = time.perf_counter() - started

    timer = timer if timer is not None else PhaseTimer(dev)
    feeder = ctx.feeder(timer=timer, amp=run.amp_dtype, channels_last=channels_last)
    meter = LayerMeter(ctx.cfg.model_name, ctx.layers, ctx.transforms, request.quantities, run.per_image)
    predictions = PredictionMeter(ctx.transforms) if head.measured else None
    placed_by = ["inverse", *(["registered"] if any(layer.lattice is not None for layer in ctx.layers) else []),
                 *(FITTED_PLACEMENTS[q] for q in FITTED_PLACEMENTS if q in request.quantities)]
    placements = PlacementMeter(ctx.layers, ctx.transforms, placed_by) if run.placement else None
    lie_meter = LieMeter(ctx.layers, run.lie, output=head.measured) if run.lie else None
    output_name = output_layer_name([layer.name for layer in ctx.layers])
    used: list[tuple[int, list[str]]] = []  # (batch index, image names) as measured on this rank
    fitted: dict[tuple[str, str, str], PairFit] = {}
    fit_seconds, fit_phases, done = 0.0, {}, 0
    loop_started = time.perf_counter()
    with FeatureCapture(ctx.model, ctx.layers, output_classes=head.classes) as capture, \
            MapSubstitution(ctx.model, ctx.layers if placements is not None else []) as substitution:
        placer = PlacementRunner(feeder, capture, substitution, placements) if placements is not None else None
        lie_runner = LieRunner(feeder, capture, lie_meter) if lie_meter is not None else None
        if calibration is not None:
            fit_started = time.perf_counter()
            fitted, done, fit_phases = _calibrate(calibration, feeder, capture, request, dev, progress, total)
            fit_seconds = time.perf_counter() - fit_started
        with torch.inference_mode():
            for batch in _timed(stream, timer):
                x = batch.pixels.to(dev, non_blocking=True)
                used.append((batch.index, batch.names))
                meter.new_batch(x, chance_partners(x, batch.partner))
                for pair in feeder.pairs(x, capture, batch.partner):
                    fit = fitted.get((pair.layer.name, pair.transform.spec, pair.transform.sweep))
                    with timer("metrics"):
                        fitted_maps = fit.aligned_maps(pair) if fit else None
                        meter.update(pair, fitted_maps, batch.index, batch.names)
                    if placer is not None:
                        placer.place(pair, x, fitted_maps)  # its passes count as the "placement" phase
                    del fitted_maps
                if predictions is not None:
                    with timer("metrics"):
                        for transform, values in predictions.update(feeder.output_pairs):
                            if run.per_image:
                                meter.image_rows.extend((batch.index, row) for row in image_rows(
                                    ctx.cfg.model_name, output_name, transform, batch.names, values))
                if placer is not None:
                    placer.finish(x, feeder.output_pairs)
                if lie_runner is not None:
                    lie_runner.update(x, batch.partner)
                done += x.shape[0] * ranks.world_size
                if progress is not None:
                    progress(min(done, total), total)
    measured = _merge_ranks(ranks, dev, stream, used, meter, predictions, placements, lie_meter)
    release_free_memory()  # the batches' freed heap (about 0.65 GB on the default job) before the report's figures
    loop_seconds = time.perf_counter() - loop_started

    n_calibration = None if calibration is None else len(calibration.used)
    table, nonfinite = _layer_table(ctx, meter, feeder, fitted, request, n_calibration or 0, measured)
    table = with_output_rows(table, [] if predictions is None else predictions.rows(
        ctx.cfg.model_name, output_name, len(ctx.layers) + 1, head.classes, ctx.cfg.input_size[1:], pairs.mask,
        ctx.cfg.pretrained, n_calibration))
    if lie_meter is not None:
        table = with_placement_rows(table, lie_meter.rows(ctx.cfg.model_name, output_name, head.classes,
                                                          ctx.cfg.pretrained, pairs.mask))
    if placements is not None:
        table = with_placement_rows(table, placements.rows(ctx.cfg.model_name, ctx.cfg.input_size[1:], pairs.mask,
                                                           ctx.cfg.pretrained, n_calibration))
    meta = ctx.metadata(stream, setup_seconds, loop_seconds)
    meta["timings_seconds"]["phases"] = timer.as_dict() if isinstance(timer, PhaseTimer) else {}
    meta.update(amp=run.amp, channels_last=channels_last, workers=pairs.workers, world_size=ranks.world_size,
                rank=ranks.rank, malloc_tuning=malloc_tuning(), nonfinite_layers=nonfinite,
                output=head.as_json(), placement=_placement_meta(placements),
                lie={"generators": list(run.lie), "units": {g.name: g.unit for g in lie_meter.generators}}
                if lie_meter is not None else {"generators": []}, registered_border=[{"layer": layer, "transform": spec, "shift_px": list(shift)}
                                                          for (layer, spec), shift in feeder.border_shifts.items()])
    if calibration is not None:
        meta["fits"] = {
            "optimal": list(request.optimal), "channel_map": list(request.channel_map), "ridge": request.ridge,
            "search_steps": request.search_steps, "calibration_images": list(calibration.used),
            "calibration_skipped": [{"path": p, "reason": r} for p, r in calibration.skipped],
            "seconds": round(fit_seconds, 3), "phase_seconds": fit_phases}
    rows = sorted(meter.image_rows, key=lambda item: item[0])  # batch order; stable within a batch
    per_image_table = pd.DataFrame([row for _, row in rows]) if run.per_image else None
    fit_details = {f"{layer}|{spec}" + (f"|{sweep}" if sweep else ""): fit.as_json()
                   for (layer, spec, sweep), fit in fitted.items()}
    return AlignmentReport(table=table, per_image=per_image_table, meta=meta, fits=fit_details)


def _placement_meta(placements: PlacementMeter | None) -> dict:
    """``run.json``'s ``placement``: whether the placement rows were measured, with which alignments, and the
    layers left out of them with the reason."""
    if placements is None:
        return {"measured": False}
    measured = [by for by in placements.placed_by
                if any(key[1] == by and stat.state[0, 0] > 0 for key, stat in placements.stats.items())]
    return {"measured": True, "placed_by": measured,
            "layers_left_out": [{"layer": name, "reason": why} for name, why in placements.skipped.items()]}


def _merge_ranks(ranks, dev: torch.device, stream: ImageStream, used: list, meter: LayerMeter,
                 predictions: PredictionMeter | None, placements: PlacementMeter | None = None,
                 lie_meter: LieMeter | None = None) -> int:
    """Sum every rank's statistics and gather the image names and per-image rows (under torchrun); images measured."""
    measured_count = torch.tensor([float(len(stream.used))], dtype=torch.float64)
    if ranks.active:
        # the image count rides along, so every rank (not only rank 0, which gathers the names) knows it
        all_reduce_sum([measured_count, *meter.states(), *(predictions.states() if predictions is not None else []),
                       *(placements.states() if placements is not None else []),
                       *(lie_meter.states() if lie_meter is not None else [])],
                       dev if dev.type == "cuda" else torch.device("cpu"))
        shards = gather_to_main((used, list(stream.skipped), meter.image_rows), ranks)
        used = sorted((item for shard in shards for item in shard[0]), key=lambda item: item[0])
        stream.skipped[:] = [item for shard in shards for item in shard[1]]
        meter.image_rows[:] = [item for shard in shards for item in shard[2]]
        stream.used[:] = [name for _, names in used for name in names]
    measured = int(measured_count.item())
    if measured < 2:
        raise ImageError(f"fewer than 2 readable images ({len(stream.skipped)} skipped as unreadable); pass --images with readable files")
    return measured


def _layer_table(ctx: RunContext, meter: LayerMeter, feeder, fitted: dict, request: FitRequest, n_calibration: int,
                 measured: int) -> tuple[pd.DataFrame, list[str]]:
    """The layer rows with the fits' columns, and the layers with NaN/inf maps; the table's caveats are logged once each."""

    def fit_columns(key) -> dict:
        return {"n_calibration": n_calibration} | (fitted[key].columns() if key in fitted else {})

    table = pd.DataFrame.from_records(meter.rows(
        ctx.cfg.input_size[1:], ctx.pairs.mask, ctx.cfg.pretrained, feeder.masks, feeder.registered_masks,
        fit_columns if request.active else None))
    nonfinite = nonfinite_layers(table, measured)
    refuse_all_duplicates(table, measured)
    warn_left_out(table, measured)
    warn_chance_collapse(table)
    return table, nonfinite


def _timed(stream: ImageStream, timer: PhaseTimer):
    """Iterate ``stream`` and count the time spent producing each batch as ``loading``."""
    iterator = iter(stream)
    while True:
        with timer("loading"):
            batch = next(iterator, None)
        if batch is None:
            return
        yield batch


def _calibrate(stream: ImageStream, feeder: PairFeeder, capture: FeatureCapture, request: FitRequest,
               dev: torch.device, progress: ProgressCallback | None, total: int) -> tuple[dict, int]:
    """Feed the calibration split and fit; gradients are needed later, so no inference tensors here."""
    calibrator = Calibrator(request, feeder.image_size)
    done = 0
    started = time.perf_counter()
    # Fits need a, b, g^-1 b and the chance partner only: no round trips, registered shifts or model outputs.
    with torch.no_grad(), capture.layers_only():
        for batch in stream:
            for pair in feeder.pairs(batch.pixels.to(dev, non_blocking=True), capture, batch.partner, controls=False):
                calibrator.update(pair)
            done += batch.pixels.shape[0]
            if progress is not None:
                progress(done, total)
    if len(stream.used) < MIN_PER_SPLIT:
        raise ImageError(f"only {len(stream.used)} calibration images were readable ({len(stream.skipped)} skipped); "
                         f"fits need at least {MIN_PER_SPLIT}; pass more readable images")
    passed = time.perf_counter() - started
    fits = calibrator.fit()
    seconds = {"calibration_pass": round(passed, 3)} | {name: round(v, 3) for name, v in calibrator.seconds.items()}
    return fits, done, seconds
