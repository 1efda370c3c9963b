"""The alignment engine: image/transformed-image pairs through a model, layer by layer.

For an image batch x, a transform g and a layer with output F(.):
a = F(x), b = F(g x), b' = g^-1 b (aligned), M = valid cells. Per image the
distances ||M (a - b')||, ||M (a - b)||, ||M (a - F(g^-1 g x))|| (floor) and
||M (a - a_other)|| (chance) are reduced to statistics; see
:mod:`alignscope.metrics` and, for how pairs and chance partners are formed,
:mod:`alignscope.pairs`. Fitted alignments (a searched warp, channel maps)
are calibrated on one split of the images and measured on the other; see
:mod:`alignscope.fitting`.
"""
from __future__ import annotations

import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from .checks import warn_chance_collapse
from .distributed import all_reduce_sum, gather_to_main, init_from_environment
from .allocator import malloc_tuning, release_free_memory, tune_malloc
from .errors import AlignscopeError, ImageError, ModelError, UsageError
from .fitting import MIN_PER_SPLIT, Calibrator, FitRequest, PairFit
from .hooks import FeatureCapture, LayerInfo, probe_layers, select_layers
from .images import ImageSource, ImageStream, image_stream, split_stream
from .lattice import attach_lattices
from .metrics import QUANTITIES, REGISTERED_QUANTITIES, AlignmentStatistic, pair_distances, reference_terms, registered_distances
from .models import DataConfig
from .options import ModelOptions, resolve_device  # noqa: F401  (resolve_device: imported from here too)
from .pairs import MASK_MODES, PairFeeder, registration_columns, uses_disk
from .prediction import Head, PredictionMeter, find_head, image_rows
from .prediction_table import output_layer_name, with_output_rows
from .report import AlignmentReport, no_lattice_sentence
from .timing import PhaseTimer
from .transforms import Transform, as_transforms

log = logging.getLogger("alignscope")

ProgressCallback = Callable[[int, int], None]


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_amp(amp: str | None) -> torch.dtype | None:
    """``None``/``"off"`` -> no autocast; ``"bf16"`` / ``"fp16"`` -> that dtype."""
    if amp in (None, "off", "none"):
        return None
    if amp not in AMP_DTYPES:
        raise UsageError(f"amp must be one of off, {', '.join(AMP_DTYPES)}; got {amp!r}")
    return AMP_DTYPES[amp]


def check_common_options(mask: str, batch_size: int) -> None:
    """Usage errors shared by every entry point that feeds image pairs."""
    if mask not in MASK_MODES:
        raise UsageError(f"mask must be one of {', '.join(MASK_MODES)}, got {mask!r}")
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")


@dataclass
class _Setup:
    model: nn.Module
    cfg: DataConfig
    layers: list[LayerInfo]
    skipped_layers: list[LayerInfo]
    transforms: list[Transform]
    options: ModelOptions
    no_lattice: dict[str, str] = field(default_factory=dict)  # layer -> why it has no measured lattice


def check_finite_weights(module: nn.Module) -> None:
    """Refuse a model whose parameters or buffers hold NaN or inf: every number it gave would be meaningless."""
    bad = [name for name, tensor in (*module.named_parameters(), *module.named_buffers())
           if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if bad:
        raise ModelError(f"the model's weights hold NaN or inf in {len(bad)} tensor(s) (first: {bad[0]}); "
                         "check the checkpoint or the model's initialisation")


def check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**32:
        raise UsageError(f"seed must be an integer from 0 to 2**32 - 1, got {seed!r}")


def _setup(options: ModelOptions, transforms, device: torch.device) -> _Setup:
    """Load the model of ``options`` onto ``device``, probe it, choose its layers and their transforms."""
    module, cfg = options.load()
    check_finite_weights(module)
    module = module.to(device)
    probed = probe_layers(module, cfg.input_size, device)
    chosen, skipped = select_layers(probed, options.layers)
    no_lattice = attach_lattices(module, chosen, cfg.input_size, device)
    release_free_memory()  # the probes' transient memory, before the analysis's batches
    if no_lattice:
        log.warning("%s", no_lattice_sentence(no_lattice))
    deepest = max(layer.stride or 1 for layer in chosen)
    return _Setup(module, cfg, chosen, skipped, as_transforms(transforms, deepest), options, no_lattice)


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
) -> AlignmentReport:
    """Measure, per layer and transform, how well g^-1 aligns F(g x) with F(x).

    ``model``: a timm name (weights as in :func:`~alignscope.models.load_model`),
    an ``nn.Module`` with ``input_size`` (C, H, W), ``mean`` and ``std``, or a
    :class:`~alignscope.options.ModelOptions` holding the model, ``weights``,
    ``pretrained``, ``input_size``, ``mean``, ``std``, ``layers`` and
    ``device`` (those keyword arguments then stay at their defaults).
    ``images``: a folder, file, glob, list of paths, ``None`` for the bundled
    photos, or an already normalized float tensor N x 3 x H x W.
    ``transforms``: specs (see :mod:`alignscope.transforms`), Transform
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
    ranks and the statistics reduced (see :mod:`alignscope.distributed`).
    ``timer``: a :class:`~alignscope.timing.PhaseTimer` to collect the time
    per phase in (one is made if not given; the split lands in ``meta``).
    ``ridge`` regularizes the linear map (``"auto"``: two-fold
    cross-validation on the calibration images), ``search_steps`` caps the
    descent steps per start of the warp search (it stops earlier at its tolerance).
    ``output``: for a model with a classifier head, add the output row per
    transform (top-1 agreement and softmax KL between x and g x; see
    :mod:`alignscope.prediction`); the forward passes then run to the end.
    ``False`` skips it; ``meta["output"]`` says whether it was measured and why not.
    """
    options = ModelOptions.build(model, weights=weights, pretrained=pretrained, input_size=input_size, mean=mean, std=std,
                                 layers=layers, device=device)
    tune_malloc()
    check_common_options(mask, batch_size)
    check_seed(seed)
    if workers < 0:
        raise UsageError(f"workers must be >= 0, got {workers}")
    request = FitRequest.build(optimal, channel_map, ridge, search_steps, calibration_images)
    amp_dtype = resolve_amp(amp)
    if transforms is not None:
        transforms = as_transforms(transforms)  # a typo fails now, not after the model has loaded
    started = time.perf_counter()
    context, dev = init_from_environment(options.resolve_device())
    if channels_last is None:
        channels_last = dev.type == "cuda"
    torch.manual_seed(seed)
    setup = _setup(options, transforms, dev)
    head = _output_head(setup, dev, output)
    if channels_last:
        setup.model.to(memory_format=torch.channels_last)
    stream = image_stream(images, setup.cfg, batch_size, max_images, seed, workers=workers, pin_memory=dev.type == "cuda")
    if len(stream) < 2:
        raise ImageError(f"need at least 2 images (chance compares different images), got {len(stream)}")
    total = len(stream)
    calibration = None
    if request.active:
        n_calibration, _ = request.split(len(stream))
        calibration, stream = split_stream(stream, n_calibration)
    stream.shard = (context.rank, context.world_size)
    if context.active and not context.is_main:
        progress = None
    setup_seconds = time.perf_counter() - started

    fill = [-m / s for m, s in zip(setup.cfg.mean, setup.cfg.std)]  # black, after normalization
    timer = timer if timer is not None else PhaseTimer(dev)
    feeder = PairFeeder(setup.layers, setup.transforms, mask, fill, tuple(setup.cfg.input_size[1:]), dev, timer,
                        amp=amp_dtype, channels_last=channels_last)
    quantities = QUANTITIES + REGISTERED_QUANTITIES + tuple(f"{q}_error" for q in request.quantities)
    stats = {(layer.name, t.spec, t.sweep): AlignmentStatistic(quantities) for layer in setup.layers for t in setup.transforms}
    nonfinite = {key: torch.zeros(1, dtype=torch.float64) for key in stats}  # images with NaN/inf maps, per row
    rows: list[tuple[int, dict]] = []
    used: list[tuple[int, list[str]]] = []
    done = 0
    fit_seconds = 0.0
    loop_started = time.perf_counter()
    predictions = PredictionMeter(setup.transforms) if head.measured else None
    output_name = output_layer_name([layer.name for layer in setup.layers])
    with FeatureCapture(setup.model, setup.layers, output_classes=head.classes) as capture:
        fits: dict[tuple[str, str, str], PairFit] = {}
        if calibration is not None:
            fit_started = time.perf_counter()
            fits, done, fit_phases = _calibrate(calibration, feeder, capture, request, dev, progress, total)
            fit_seconds = time.perf_counter() - fit_started
        with torch.inference_mode():
            for batch in _timed(stream, timer):
                x = batch.pixels.to(dev, non_blocking=True)
                used.append((batch.index, batch.names))
                shared: dict[tuple[str, bool, int], tuple[torch.Tensor, torch.Tensor]] = {}
                for pair in feeder.pairs(x, capture, batch.partner):
                    key = (pair.layer.name, pair.transform.spec, pair.transform.sweep)
                    with timer("metrics"):
                        share_key = (pair.layer.name, pair.disk, id(pair.mask))
                        if share_key not in shared:
                            shared[share_key] = reference_terms(pair.reference, pair.other, pair.mask)
                        values = pair_distances(
                            reference=pair.reference, aligned=pair.aligned, unaligned=pair.moved, other=pair.other,
                            mask=pair.mask, roundtrip=pair.roundtrip,
                            extras=fits[key].aligned_maps(pair) if key in fits else None, terms=shared[share_key],
                        )
                        values.update(registered_distances(pair.reference, pair.registered_reference, pair.registered, pair.other,
                                                           pair.registered_mask, shared[share_key] if pair.registered_mask is pair.mask else None))
                        stats[key].update(values)
                        nonfinite[key] += count_nonfinite(values)
                    if per_image:
                        rows.extend((batch.index, row) for row in _image_rows(setup, pair.layer, pair.transform, batch.names, values))
                if predictions is not None:
                    with timer("metrics"):
                        for transform, values in predictions.update(feeder.output_pairs):
                            if per_image:
                                rows.extend((batch.index, row) for row in image_rows(
                                    setup.cfg.model_name, output_name, transform, batch.names, values))
                done += x.shape[0] * context.world_size
                if progress is not None:
                    progress(min(done, total), total)
    measured_count = torch.tensor([float(len(stream.used))], dtype=torch.float64)
    if context.active:
        # the image count rides along, so every rank (not only rank 0, which gathers the names) knows it
        all_reduce_sum([measured_count, *(stat.state for stat in stats.values()), *nonfinite.values(),
                        *(predictions.states() if predictions is not None else [])],
                       dev if dev.type == "cuda" else torch.device("cpu"))
        shards = gather_to_main((used, list(stream.skipped), rows), context)
        used = [item for shard in shards for item in shard[0]]
        stream.skipped[:] = [item for shard in shards for item in shard[1]]
        rows = [item for shard in shards for item in shard[2]]
        used.sort(key=lambda item: item[0])
        stream.used[:] = [name for _, names in used for name in names]
    measured = int(measured_count.item())
    if measured < 2:
        raise ImageError(f"fewer than 2 readable images ({len(stream.skipped)} skipped as unreadable); pass --images with readable files")
    loop_seconds = time.perf_counter() - loop_started
    table = _summary_table(setup, stats, feeder.masks, mask, fits, request, 0 if calibration is None else len(calibration.used),
                           feeder.registered_masks)
    table["n_nonfinite"] = [int(nonfinite[(row.layer, row.transform, row.sweep)].item()) for row in table.itertuples()]
    nonfinite_layers = _check_nonfinite(table, measured)
    _warn_left_out(table, measured)
    warn_chance_collapse(table)
    table = with_output_rows(table, [] if predictions is None else predictions.rows(
        setup.cfg.model_name, output_name, len(setup.layers) + 1, head.classes, setup.cfg.input_size[1:], mask,
        setup.cfg.pretrained, None if calibration is None else len(calibration.used)))
    meta = _run_metadata(setup, stream, dev, mask, batch_size, seed, max_images, images, setup_seconds, loop_seconds)
    meta["timings_seconds"]["phases"] = timer.as_dict() if isinstance(timer, PhaseTimer) else {}
    meta.update(amp=amp, channels_last=channels_last, workers=workers, world_size=context.world_size, rank=context.rank,
                malloc_tuning=malloc_tuning(), nonfinite_layers=nonfinite_layers, output=head.as_json(),
                registered_border=[{"layer": layer, "transform": spec, "shift_px": list(shift)}
                                   for (layer, spec), shift in feeder.border_shifts.items()])
    if calibration is not None:
        meta["fits"] = {
            "optimal": list(request.optimal), "channel_map": list(request.channel_map), "ridge": request.ridge,
            "search_steps": request.search_steps, "calibration_images": list(calibration.used),
            "calibration_skipped": [{"path": p, "reason": r} for p, r in calibration.skipped],
            "seconds": round(fit_seconds, 3), "phase_seconds": fit_phases,
        }
    rows.sort(key=lambda item: item[0])  # batch order; stable within a batch
    per_image_table = pd.DataFrame([row for _, row in rows]) if per_image else None
    fit_details = {f"{layer}|{spec}" + (f"|{sweep}" if sweep else ""): fit.as_json() for (layer, spec, sweep), fit in fits.items()}
    return AlignmentReport(table=table, per_image=per_image_table, meta=meta, fits=fit_details)


def _output_head(setup: _Setup, dev: torch.device, output: bool) -> Head:
    """The model's classifier head as the probe finds it, or why the output row is not measured (said in one line)."""
    if not output:
        head = Head(False, reason="skipped on request (output=False, --no-output)")
    else:
        head = find_head(setup.model, setup.cfg.input_size, dev)
    if not head.measured:
        log.info("no prediction row: %s", head.reason)
    return head


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


def count_nonfinite(values: dict[str, torch.Tensor]) -> torch.Tensor:
    """Images of a batch whose raw distances are NaN/inf: their feature maps were (or squared to) NaN/inf.

    The raw distances (not the ratios, which are NaN for a zero chance distance by design) are
    finite whenever the maps are finite and their squares fit in the maps' dtype.
    """
    raw = torch.stack([values[name] for name in ("aligned", "unaligned", "floor", "chance_distance")])
    return (~torch.isfinite(raw).all(dim=0)).sum().to(torch.float64).reshape(1).cpu()


def _check_nonfinite(table: pd.DataFrame, n_images: int) -> list[str]:
    """Say plainly which layers gave NaN/inf maps for how many images; fail when no number is left."""
    bad = table[table["n_nonfinite"] > 0]
    if bad.empty:
        return []
    per_layer = bad.groupby("layer", sort=False)["n_nonfinite"].max()
    if len(bad) == len(table) and (bad["n_nonfinite"] >= n_images).all():
        raise AlignscopeError(
            f"every feature map was NaN or inf (all {n_images} images at all {table['layer'].nunique()} layers): "
            "the model's computation overflows or its inputs are not finite; nothing to report")
    details = ", ".join(f"{layer} ({count} of {n_images} images)" for layer, count in per_layer.items())
    log.warning("non-finite feature maps (NaN or inf) at %d layer(s): %s; those images are left out of these rows "
                "(column n_nonfinite). The layer overflows or its weights/inputs are broken.", len(per_layer), details)
    return list(per_layer.index)


def _warn_left_out(table: pd.DataFrame, n_images: int) -> None:
    """Say so when images were left out because their chance distance was 0."""
    short = table[table["n_images"] + table["n_nonfinite"] < n_images]
    if len(short):
        worst = short.loc[short["n_images"].idxmin()]
        log.warning(
            "%d of %d (layer, transform) rows left images out for a zero chance distance (an image identical "
            "to its partner, or no valid cells); fewest: %d of %d images at %s / %s. Remove duplicate images "
            "or use a milder transform.", len(short), len(table), worst["n_images"], n_images, worst["layer"], worst["transform"])


def _image_rows(setup: _Setup, layer: LayerInfo, transform: Transform, names: list[str], values: dict[str, torch.Tensor]) -> list[dict]:
    arrays = {k: v.cpu().numpy() for k, v in values.items()}
    return [
        {"model": setup.cfg.model_name, "layer": layer.name, "transform": transform.spec, "sweep": transform.sweep, "image": name}
        | {k: float(arrays[k][i]) for k in arrays}
        for i, name in enumerate(names)
    ]


def _summary_table(setup: _Setup, stats: dict, masks: dict, mask_mode: str, fits: dict, request: FitRequest,
                   n_calibration: int, registered_masks: dict | None = None) -> pd.DataFrame:
    registered_masks = registered_masks or {}
    height, width = setup.cfg.input_size[1:]
    records = []
    for depth, layer in enumerate(setup.layers, start=1):
        for transform in setup.transforms:
            disk = uses_disk(transform, mask_mode)
            key = (layer.name, transform.spec, transform.sweep)
            result = stats[key].compute()
            stride = float(layer.stride or 1)
            exact = transform.exact_on(height, width, 1.0) and transform.exact_on(layer.shape[1], layer.shape[2], stride)
            valid = masks.get((layer.name, transform.spec, disk))
            records.append(
                {
                    "model": setup.cfg.model_name,
                    "layer": layer.name,
                    "depth": depth,
                    "module": layer.module_type,
                    "channels": layer.shape[0],
                    "height": layer.shape[1],
                    "width": layer.shape[2],
                    "stride": stride,
                    "transform": transform.spec,
                    "exact": bool(exact),
                    "n_images": int(result["aligned_error_n"]),
                    "aligned_error": result["aligned_error"],
                    "aligned_error_std": result["aligned_error_std"],
                    "aligned_error_ci_low": result["aligned_error_ci_low"],
                    "aligned_error_ci_high": result["aligned_error_ci_high"],
                    "unaligned_error": result["unaligned_error"],
                    "floor_error": result["floor_error"],
                    "aligned_cosine": result["aligned_cosine"],
                    "unaligned_error_ci_low": result["unaligned_error_ci_low"],
                    "unaligned_error_ci_high": result["unaligned_error_ci_high"],
                    "floor_error_ci_low": result["floor_error_ci_low"],
                    "floor_error_ci_high": result["floor_error_ci_high"],
                    "chance_distance": result["chance_distance"],
                    "reference_norm": result["reference_norm"],
                    "valid_fraction": float(valid.mean()) if valid is not None else float("nan"),
                    "mask": "disk" if disk else "none",
                    "sweep": transform.sweep,
                    "magnitude": transform.magnitude,
                    "pretrained": setup.cfg.pretrained,
                }
            )
            if request.active:
                for quantity in request.quantities:
                    for suffix in ("", "_ci_low", "_ci_high"):
                        records[-1][f"{quantity}_error{suffix}"] = result[f"{quantity}_error{suffix}"]
                records[-1]["n_calibration"] = n_calibration
                records[-1].update(fits[key].columns() if key in fits else {})
            records[-1].update(registration_columns(layer, transform, (height, width), result, registered_masks.get((layer.name, transform.spec, disk)), valid))
    return pd.DataFrame.from_records(records)


def _run_metadata(setup, stream, dev, mask, batch_size, seed, max_images, images, setup_seconds, loop_seconds) -> dict:
    import timm

    from ._version import __version__

    return {
        "alignscope_version": __version__,
        "model": setup.cfg.model_name,
        "model_options": setup.options.as_json(),
        "weights": setup.cfg.weights,
        "pretrained": setup.cfg.pretrained,
        "data_config": {k: v for k, v in setup.cfg.as_dict().items() if k not in ("extra",)},
        "layers": [layer.name for layer in setup.layers],
        "layers_skipped": [{"layer": layer.name, "reason": layer.reason} for layer in setup.skipped_layers],
        "no_lattice": dict(setup.no_lattice),
        "layer_layouts": {layer.name: {"layout": str(layer.layout), "evidence": layer.layout.evidence} for layer in setup.layers},
        "transforms": [t.spec for t in setup.transforms],
        "mask": mask,
        "batch_size": batch_size,
        "seed": seed,
        "max_images": max_images,
        "images_source": "bundled photos" if images is None else ("tensor" if isinstance(images, torch.Tensor) else str(images)),
        "images_used": list(stream.used),
        "images_skipped": [{"path": p, "reason": r} for p, r in stream.skipped],
        "device": str(dev),
        "timings_seconds": {"setup": round(setup_seconds, 3), "analysis": round(loop_seconds, 3)},
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__,
            "pandas": pd.__version__,
        },
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine()},
    }
