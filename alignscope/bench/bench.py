"""Benchmark: alignscope's analysis against the bare forward passes it cannot avoid.

(A) bare forward passes: the full model, ``torch.inference_mode()``, the
same batch size, over exactly the inputs the analysis feeds it (the
originals, their disk-masked copies where a transform uses the disk, every
transformed batch, and the round-trip batches the floor needs). (B) the
analysis itself (``analyze`` without plotting or files), the output row
included where the model has a classifier head (``output_row``): its
forward passes then run to the end, as A's do. With fitted
alignments asked for (``optimal``, ``channel_map``), (C) the analysis with
them runs after each pass too, and ``fit_seconds`` (the calibration pass
plus the fits, as the analysis reports them) is set against B:
``fit_ratio`` = median fits / median B, ``fit_ratio_per_repeat`` each
repeat's C over its own B, ``fit_phase_seconds`` the median seconds of the
calibration pass, the warp searches and the channel maps.

A and B are interleaved batch by batch (see :mod:`alignscope.bench.interleave`):
just before the analysis reads batch k, the bare forwards of batch k's
inputs run on an identical copy of the model (the analysis's copy carries
its capture hooks), so A_k and B_k see the same load. Building A's inputs,
model loading and the layer probe are in neither; model loading and probe
are reported as ``setup_seconds``. One warm-up pass, then ``repeats`` timed
passes. ``overhead_ratio`` = sum of B over sum of A; the run is flagged
noisy when repeats spread by more than 20% or the load average exceeds the
core count by more than a quarter (the benchmark's own threads account for
a load near the core count).

``memory_scaling`` runs ``alignscope analyze`` in fresh processes for a
small and a large image count and reports each one's own peak resident
memory (see :mod:`alignscope.bench.peakmemory`). ``malloc_comparison`` runs the
benchmark in two fresh processes, with and without
``ALIGNSCOPE_NO_MALLOC_TUNING=1``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import platform
import random
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from ..runtime.allocator import OPT_OUT as MALLOC_OPT_OUT
from ..engine import RunContext, analyze, resolve_amp
from ..errors import AlignscopeError
from ..inputs.images import ImageBatch, bundled_photos, image_stream, read_rgb
from .interleave import Interleaver, PassTiming, assess_noise, load_average, repeat_spread, summarize_passes
from ..model.options import ModelOptions
from ..model.preserve import left_as_found
from ..inputs.options import PairOptions
from ..inputs.pairs import PairFeeder, forward_chunks
from .peakmemory import SOURCE as PEAK_SOURCE
from .peakmemory import run_measured
from ..runtime.timing import BoundaryTimer




@contextlib.contextmanager
def _quiet_log():
    """Warnings of the ``alignscope`` logger are held back (errors still show)."""
    logger = logging.getLogger("alignscope")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)

def machine_info(device: torch.device) -> dict:
    """CPU model, cores, threads, torch version, the accelerator's name and how malloc was set up."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    from ..runtime.allocator import malloc_tuning

    info["malloc_tuning"] = malloc_tuning()
    info["malloc_environment"] = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB).

    It includes the peak of whatever this process replaced at exec; started
    from a shell that is small. Use :mod:`alignscope.bench.peakmemory` for children.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_inputs(feeder: PairFeeder, batch: ImageBatch, device: torch.device, channels_last: bool) -> list[torch.Tensor]:
    """Every batch the analysis feeds the model for ``batch`` (:meth:`PairFeeder.model_inputs`), on ``device``,
    split as :meth:`PairFeeder.pairs` splits them: stacked inputs in :func:`forward_chunks`, each registered
    shift on its own (the analysis stops those after the layers that use them; the bare pass runs them whole)."""
    n = batch.pixels.shape[0]
    inputs = []
    for _, _, kind, b in feeder.model_inputs(batch.pixels.to(device), batch.partner):
        if b is not None:
            inputs.extend(b.split(n) if kind == "registered" else forward_chunks(b, n + 1))
    return [b.contiguous(memory_format=torch.channels_last) if channels_last else b for b in inputs]


def bare_forward(model: torch.nn.Module, inputs: Sequence[torch.Tensor], device: torch.device,
                 amp: torch.dtype | None) -> None:
    """Full-model forward passes over ``inputs`` (the outputs are dropped)."""
    with torch.inference_mode():
        for inp in inputs:
            if amp is None:
                model(inp)
            else:
                with torch.autocast(device.type, dtype=amp):
                    model(inp)


def benchmark(
    model: str | torch.nn.Module | ModelOptions = "tf_efficientnet_lite0",
    weights: str | None = "auto",
    pretrained: bool = True,
    images=None,
    max_images: int | None = 64,
    transforms: Sequence[str] | None = None,
    layers: Sequence[str] | None = None,
    batch_size: int = 16,
    device: str = "cpu",
    amp: str | None = None,
    channels_last: bool | None = None,
    workers: int = 0,
    repeats: int = 3,
    mask: str = "auto",
    input_size: Sequence[int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    optimal: Sequence[str] | None = None,
    channel_map: Sequence[str] | None = None,
    calibration_images: int | None = None,
) -> dict:
    """Time (A) bare forwards and (B) the analysis, interleaved; see the module docstring. Returns a JSON-able dict.

    Arguments as for :func:`alignscope.analyze` (an ``nn.Module`` needs
    ``input_size``; ``model`` may be a :class:`~alignscope.model.options.ModelOptions`);
    ``repeats`` timed passes follow one warm-up pass.
    """
    options = ModelOptions.build(model, weights=weights, pretrained=pretrained, input_size=input_size, mean=mean, std=std,
                                 layers=layers, device=device)
    loads = [load_average()]  # before this process adds its own load
    dev = options.resolve_device()
    amp_dtype = resolve_amp(amp)
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    with left_as_found(options.model):  # a caller's module comes back as it was
        started = time.perf_counter()
        setup = RunContext.open(options, PairOptions.build(transforms, batch_size=batch_size, mask=mask), dev)
        if channels_last:
            setup.model.to(memory_format=torch.channels_last)
        setup_seconds = time.perf_counter() - started
        scratch = None
        if images is None and max_images is not None and max_images > len(bundled_photos()):
            scratch = tempfile.TemporaryDirectory(prefix="alignscope-bench-")
            images = make_image_folder(max_images, Path(scratch.name))
        try:
            fits = {"optimal": list(optimal or []) or None, "channel_map": list(channel_map or []) or None,
                    "calibration_images": calibration_images}
            return _benchmark(setup, setup_seconds, images, max_images, batch_size, dev, amp, amp_dtype, channels_last,
                              workers, repeats, mask, loads, fits)
        finally:
            if scratch is not None:
                scratch.cleanup()


def _benchmark(setup, setup_seconds, images, max_images, batch_size, dev, amp, amp_dtype, channels_last, workers,
               repeats, mask, loads, fits: dict | None = None) -> dict:
    cfg = setup.cfg
    batches = list(image_stream(images, cfg, batch_size, max_images))
    if not batches:
        raise AlignscopeError("no readable images to benchmark; pass --images with readable files")
    names = [name for batch in batches for name in batch.names]
    n_images = len(names)
    feeder = setup.feeder()
    bare_model = copy.deepcopy(setup.model)  # before analyze() hooks setup.model
    # the analysis runs on the loaded module, with the data config and layers the setup resolved
    loaded = ModelOptions(setup.model, pretrained=cfg.pretrained, input_size=cfg.input_size, mean=cfg.mean, std=cfg.std,
                          layers=tuple(layer.name for layer in setup.layers), device=str(dev))
    spec = [t.spec for t in setup.transforms]
    fed: dict[int, int] = {}  # images fed to the model per batch
    measured_output: list[bool] = []  # whether B measured the output row (its forwards then run to the end, as A's)

    def prepare(k: int) -> list[torch.Tensor]:
        inputs = model_inputs(feeder, batches[k], dev, channels_last)
        fed[k] = sum(b.shape[0] for b in inputs)
        return inputs

    def interleaved_pass() -> tuple[PassTiming, dict]:
        interleaver = Interleaver(
            len(batches),
            forward=lambda inputs: bare_forward(bare_model, inputs, dev, amp_dtype),
            prepare=prepare,
            sync=lambda: _sync(dev),
        )
        timer = BoundaryTimer(interleaver.boundary, dev, synchronize=dev.type == "cuda")
        report = analyze(loaded, transforms=spec, images=images, batch_size=batch_size, mask=mask, max_images=max_images,
                         amp=amp, channels_last=channels_last, workers=workers, timer=timer)
        if list(report.meta["images_used"]) != names:
            raise AlignscopeError("the analysis read other images than the bare forward passes were built from "
                                  "(a file changed during the benchmark?); run it again")
        loads.append(load_average())
        measured_output.append(bool(report.meta["output"]["measured"]))
        return interleaver.result(), timer.as_dict()

    fitting = bool(fits and (fits.get("optimal") or fits.get("channel_map")))

    def fit_pass() -> dict:
        """(C): the analysis with the fitted alignments; the seconds of its calibration pass and fits, and their phases."""
        report = analyze(loaded, transforms=spec, images=images, batch_size=batch_size, mask=mask, max_images=max_images,
                         amp=amp, channels_last=channels_last, workers=workers, **fits)
        return report.meta["fits"]

    interleaved_pass()  # warm-up: allocator, kernel selection, file cache
    passes, phases, fit_runs = [], [], []
    # the warm-up has said what the analysis warns of; the fitted pass and the timed passes repeat it word for word
    with _quiet_log():
        if fitting:
            fit_pass()
        for _ in range(max(1, repeats)):
            timing, split = interleaved_pass()
            passes.append(timing)
            phases.append(split)
            if fitting:
                fit_runs.append(fit_pass())
    summary = summarize_passes(passes)
    machine = machine_info(dev)
    noise = assess_noise(summary, loads, machine["cores"])
    if fitting and len(fit_runs) > 1:
        fit_spread = repeat_spread([run["seconds"] / b for run, b in zip(fit_runs, summary["analysis"]["all"])])
        if fit_spread is not None and fit_spread > noise["spread_limit"]:
            noise["reasons"].append(f"fits over analysis (C/B) spread {fit_spread:.0%} between repeats "
                                    f"(limit {noise['spread_limit']:.0%})")
            noise["noisy"] = True
    analysis_seconds = summary["analysis"]["median"]
    median_phases = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]}
    forward_images = sum(fed.values())
    fitted = {}
    if fitting:
        fit_seconds = statistics.median(run["seconds"] for run in fit_runs)
        # C right after B of the same repeat: their ratio is less exposed to drift in the machine's speed
        per_repeat = [run["seconds"] / b for run, b in zip(fit_runs, summary["analysis"]["all"])]
        fitted = {"fits": {k: v for k, v in fits.items() if v}, "fit_seconds": round(fit_seconds, 3),
                  "fit_ratio": round(fit_seconds / analysis_seconds, 3),
                  "fit_ratio_per_repeat": [round(v, 3) for v in per_repeat],
                  "fit_phase_seconds": {k: round(statistics.median(run["phase_seconds"][k] for run in fit_runs), 3)
                                        for k in fit_runs[0]["phase_seconds"]},
                  "all_fit_seconds": [round(run["seconds"], 3) for run in fit_runs]}
    return fitted | {
        "model": cfg.model_name,
        "model_options": setup.options.as_json(),
        "pretrained": cfg.pretrained,
        "images": n_images,
        "batch_size": batch_size,
        "batches": len(batches),
        "layers": [layer.name for layer in setup.layers],
        "transforms": spec,
        "forward_images_per_image": round(forward_images / n_images, 2),
        "output_row": all(measured_output),
        "interleaving": "batch: each batch's bare forwards (A), then its analysis (B)",
        "repeats": len(passes),
        "setup_seconds": round(setup_seconds, 3),
        "forward_seconds": round(summary["forward"]["median"], 3),
        "forward_seconds_min": round(summary["forward"]["min"], 3),
        "analysis_seconds": round(analysis_seconds, 3),
        "analysis_seconds_min": round(summary["analysis"]["min"], 3),
        "overhead_ratio": round(summary["overhead_ratio"], 3),
        "batch_ratio": {k: round(v, 3) if isinstance(v, float) else v for k, v in summary["batch_ratio"].items()},
        "pass_ratios": [round(v, 3) for v in summary["pass_ratios"]],
        "images_per_second": round(n_images / analysis_seconds, 2),
        "phase_seconds": {k: round(v, 3) for k, v in median_phases.items()},
        "phase_share": {k: round(v / analysis_seconds, 3) for k, v in median_phases.items()},
        "all_forward_seconds": [round(v, 3) for v in summary["forward"]["all"]],
        "all_analysis_seconds": [round(v, 3) for v in summary["analysis"]["all"]],
        "noisy": noise["noisy"],
        "noise": _rounded(noise),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "peak_rss_of": "this process: analysis, bare forwards and the model's copy",
        "amp": amp or "off",
        "channels_last": channels_last,
        "workers": workers,
        "machine": machine,
    }


def _rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    return value


def make_image_folder(n: int, folder: Path, seed: int = 0, size: int = 256) -> Path:
    """``n`` distinct JPEGs (seeded random crops, flips and sizes of the bundled photos) in ``folder``."""
    rng = random.Random(seed)
    photos = [read_rgb(p) for p in bundled_photos()]
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        photo = photos[i % len(photos)]
        w, h = photo.size
        side = rng.randint(min(w, h) // 2, min(w, h))
        left, top = rng.randint(0, w - side), rng.randint(0, h - side)
        crop = photo.crop((left, top, left + side, top + side)).resize((size, size))
        if rng.random() < 0.5:
            crop = crop.transpose(0)  # mirror
        crop.save(folder / f"img{i:05d}.jpg", quality=90)
    return folder


def _model_arguments(options: ModelOptions, transforms: Sequence[str] | None, batch_size: int) -> list[str]:
    """The command-line options that choose the same model options, transforms and batch size."""
    args = options.argv() + ["--batch-size", str(batch_size)]
    for spec in transforms or ():
        args += ["--transform", spec]
    return args


def memory_scaling(counts: Sequence[int] = (32, 512), model: str | ModelOptions = "tf_efficientnet_lite0",
                   transforms: Sequence[str] | None = None, batch_size: int = 16, **model_settings) -> dict:
    """Peak RSS of ``alignscope analyze`` for each image count, each in a fresh process (same batch size).

    Each run is the command line a user would type (``--no-plots``, report
    written to a scratch folder, malloc set up as the command line does),
    on distinct JPEGs cut from the bundled photos. Peak RSS in MiB, measured
    by :func:`alignscope.bench.peakmemory.run_measured`; ``seconds`` include
    Python's start-up and model loading. ``model`` and ``model_settings``
    (``weights``, ``layers``, ...) as for :meth:`ModelOptions.build`.
    """
    if len(set(counts)) < 2:
        raise AlignscopeError(f"memory scaling needs two different image counts, got {list(counts)}")
    options = _model_arguments(ModelOptions.build(model, **model_settings), transforms, batch_size)
    results: dict[int, dict] = {}
    launcher = []
    with tempfile.TemporaryDirectory(prefix="alignscope-mem-") as tmp:
        folder = make_image_folder(max(counts), Path(tmp) / "images")
        for count in counts:
            out = Path(tmp) / f"report-{count}"
            argv = [sys.executable, "-m", "alignscope", "analyze", *options, "--images", str(folder),
                    "--max-images", str(count), "--no-plots", "--quiet", "--out", str(out)]
            run = run_measured(argv).succeeded(f"the analysis of {count} images")
            used = len(json.loads((out / "run.json").read_text())["images_used"])
            if used != count:
                raise AlignscopeError(f"the analysis asked for {count} images used {used}; its peak memory is not comparable")
            results[count] = {"images": used, "peak_rss_mb": round(run.peak_mb, 1), "seconds": round(run.seconds, 2)}
            launcher.append(run.launcher_mb)
        bare = run_measured([sys.executable, "-c", _BARE_FORWARD, json.dumps(_option_fields(model, model_settings)),
                             str(batch_size + 1)]).succeeded("the bare forward passes")
        launcher.append(bare.launcher_mb)
    small, large = results[min(counts)], results[max(counts)]
    floor = max((v for v in launcher if v is not None), default=None)
    return {"runs": results, "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3),
            "bare_forward": {"images": batch_size + 1, "peak_rss_mb": round(bare.peak_mb, 1)},
            "peak_rss_source": PEAK_SOURCE, "launcher_mb": None if floor is None else round(floor, 1)}


# The physical floor of the analysis's memory: Python, torch and timm, the model, and its bare forward passes on
# the largest batch the analysis feeds (a batch and its carried partner), malloc set up as the command line does.
_BARE_FORWARD = """
import json, sys
import torch
from alignscope.runtime.allocator import tune_malloc
tune_malloc()
from alignscope.model.options import ModelOptions
model, cfg = ModelOptions.build(**json.loads(sys.argv[1])).load()
x = torch.randn(int(sys.argv[2]), *cfg.input_size)
with torch.inference_mode():
    for _ in range(3):
        model(x)
"""


def _option_fields(model: str | ModelOptions, settings: dict) -> dict:
    """The fields of ``ModelOptions.build(model, **settings)`` that a fresh process needs, as JSON."""
    options = ModelOptions.build(model, **settings)
    if not isinstance(options.model, str):
        raise AlignscopeError("memory scaling runs fresh processes: pass a timm name, not an nn.Module")
    return {"model": options.model, "weights": options.weights, "pretrained": options.pretrained,
            "input_size": options.input_size, "mean": options.mean, "std": options.std}


def bench_arguments(model: str | ModelOptions = "tf_efficientnet_lite0", images=None, max_images: int | None = 64,
                    transforms: Sequence[str] | None = None, batch_size: int = 16, amp: str | None = None,
                    channels_last: bool | None = None, workers: int = 0, repeats: int = 3, **model_settings) -> list[str]:
    """The ``alignscope bench`` options that repeat a :func:`benchmark` call with these arguments.

    ``model`` and ``model_settings`` (``weights``, ``pretrained``, ``layers``, ``device``, ...) as for
    :meth:`ModelOptions.build`.
    """
    args = _model_arguments(ModelOptions.build(model, **model_settings), transforms, batch_size)
    if images is not None:
        args += ["--images", os.path.abspath(images)]
    if max_images is not None:
        args += ["--max-images", str(max_images)]
    if channels_last is not None:
        args.append("--channels-last" if channels_last else "--no-channels-last")
    return args + ["--amp", amp or "off", "--workers", str(workers), "--repeats", str(repeats)]


def malloc_comparison(tuned_first: bool = True, **options) -> dict:
    """:func:`benchmark` with ``options`` in two fresh processes: malloc set up as the command line does
    (tuned), and with ``ALIGNSCOPE_NO_MALLOC_TUNING=1`` (untuned). Each run's result with its own peak RSS
    (MiB), and untuned / tuned time ratios (``*_speedup``).

    Both start from this environment without ``MALLOC_*`` variables (which
    would tune the untuned run too). The two runs follow each other, so
    unlike A and B inside one run they may see different load; each says
    whether it was noisy, and ``noisy`` is set when either was.
    """
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "ALIGNSCOPE_MALLOC"))}
    base.pop(MALLOC_OPT_OUT, None)
    settings = {"tuned": base, "untuned": dict(base, **{MALLOC_OPT_OUT: "1"})}
    order = ["tuned", "untuned"] if tuned_first else ["untuned", "tuned"]
    argv = [sys.executable, "-m", "alignscope", "bench", *bench_arguments(**options), "--json"]
    runs = {}
    for name in order:
        run = run_measured(argv, env=settings[name]).succeeded(f"the {name} benchmark")
        result = json.loads(run.stdout.strip().splitlines()[-1])
        result["peak_rss_mb"] = round(run.peak_mb, 1)
        result["peak_rss_of"] = PEAK_SOURCE
        runs[name] = result
    tuned, untuned = runs["tuned"], runs["untuned"]
    return {
        "runs": runs,
        "order": order,
        "forward_speedup": round(untuned["forward_seconds"] / tuned["forward_seconds"], 3),
        "analysis_speedup": round(untuned["analysis_seconds"] / tuned["analysis_seconds"], 3),
        "noisy": tuned["noisy"] or untuned["noisy"],
    }
