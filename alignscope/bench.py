"""Benchmark: alignscope's analysis against the bare forward passes it cannot avoid.

(A) bare forward passes: the full model, ``torch.inference_mode()``, the
same batch size, over exactly the inputs the analysis feeds it (the
originals, their disk-masked copies where a transform uses the disk, every
transformed batch, and the round-trip batches the floor needs), built
before the clock starts. (B) the analysis itself (``analyze`` without
plotting or files; model loading and the layer probe are excluded from
both and reported as ``setup_seconds``). Both run in one process,
interleaved, after one warm-up of each; the median of ``repeats`` runs is
reported. ``overhead_ratio`` = B / A. With fitted alignments asked for
(``optimal``, ``channel_map``), (C) the analysis with them runs interleaved
too, and ``fit_seconds`` (the calibration pass plus the fits, as the
analysis reports them) is set against B: ``fit_ratio`` = fits / B.

``memory_scaling`` runs the analysis in fresh processes for a small and a
large image count (distinct JPEG images cut from the bundled photos) and
reports each one's peak resident memory.
"""
from __future__ import annotations

import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from .engine import _setup, analyze, resolve_amp, resolve_device
from .images import ImageBatch, bundled_photos, image_stream, read_rgb
from .pairs import PairFeeder
from .timing import PhaseTimer


def machine_info(device: torch.device) -> dict:
    """CPU model, cores, threads, torch version and the accelerator's name."""
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
    from .allocator import TUNED_ENVIRONMENT

    info["malloc_environment"] = {k: os.environ[k] for k in TUNED_ENVIRONMENT if k in os.environ}
    return info


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, MiB (Linux reports KiB)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024.0 if sys.platform != "darwin" else peak / 2**20


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_forward_seconds(model, batches: list[ImageBatch], feeder: PairFeeder, device: torch.device,
                         amp: torch.dtype | None, channels_last: bool) -> tuple[float, int]:
    """Seconds of full-model forward passes over every input the analysis feeds, and the images fed.

    The inputs are :meth:`PairFeeder.model_inputs`, built before the clock starts.
    """
    total, fed = 0.0, 0
    with torch.inference_mode():
        for image_batch in batches:
            inputs = [b for _, _, _, b in feeder.model_inputs(image_batch.pixels.to(device), image_batch.partner) if b is not None]
            for inp in inputs:
                if channels_last:
                    inp = inp.contiguous(memory_format=torch.channels_last)
                _sync(device)
                started = time.perf_counter()
                if amp is None:
                    model(inp)
                else:
                    with torch.autocast(device.type, dtype=amp):
                        model(inp)
                _sync(device)
                total += time.perf_counter() - started
                fed += inp.shape[0]
    return total, fed


def benchmark(
    model: str = "tf_efficientnet_lite0",
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
    optimal: Sequence[str] | None = None,
    channel_map: Sequence[str] | None = None,
    calibration_images: int | None = None,
) -> dict:
    """Time (A) bare forwards and (B) the analysis; see the module docstring. Returns a JSON-able dict."""
    dev = resolve_device(device)
    amp_dtype = resolve_amp(amp)
    channels_last = dev.type == "cuda" if channels_last is None else channels_last
    started = time.perf_counter()
    setup = _setup(model, weights, pretrained, None, None, None, layers, transforms, dev)
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
                          workers, repeats, mask, fits)
    finally:
        if scratch is not None:
            scratch.cleanup()


def _benchmark(setup, setup_seconds, images, max_images, batch_size, dev, amp, amp_dtype, channels_last, workers,
               repeats, mask, fits: dict | None = None) -> dict:
    cfg = setup.cfg
    batches = list(image_stream(images, cfg, batch_size, max_images))
    n_images = sum(b.pixels.shape[0] for b in batches)
    fill = [-m / s for m, s in zip(cfg.mean, cfg.std)]
    feeder = PairFeeder(setup.layers, setup.transforms, mask, fill, tuple(cfg.input_size[1:]), dev)
    spec = [t.spec for t in setup.transforms]

    def run_bare() -> float:
        seconds, _ = bare_forward_seconds(setup.model, batches, feeder, dev, amp_dtype, channels_last)
        return seconds

    fitting = bool(fits and (fits.get("optimal") or fits.get("channel_map")))

    def run_analysis(with_fits: bool = False) -> tuple[float, dict]:
        timer = PhaseTimer(dev, synchronize=dev.type == "cuda")
        report = analyze(setup.model, transforms=spec, images=images, layers=[layer.name for layer in setup.layers],
                         batch_size=batch_size, mask=mask, device=dev, max_images=max_images, input_size=cfg.input_size,
                         mean=cfg.mean, std=cfg.std, amp=amp, channels_last=channels_last, workers=workers, timer=timer,
                         **(fits if with_fits else {}))
        if with_fits:
            return report.meta["fits"]["seconds"], {"analysis": report.meta["timings_seconds"]["analysis"]}
        return report.meta["timings_seconds"]["analysis"], timer.as_dict()

    run_bare(), run_analysis()  # warm-up: allocator, kernel selection, file cache
    if fitting:
        run_analysis(True)
    bare, full, phases, fit_runs = [], [], [], []
    for _ in range(max(1, repeats)):
        bare.append(run_bare())
        seconds, split = run_analysis()
        full.append(seconds)
        phases.append(split)
        if fitting:
            fit_runs.append(run_analysis(True)[0])
    forward_seconds, analysis_seconds = statistics.median(bare), statistics.median(full)
    median_phases = {k: statistics.median(p.get(k, 0.0) for p in phases) for k in phases[0]}
    forward_images = sum(b.shape[0] for batch in batches for _, _, _, b in feeder.model_inputs(batch.pixels, batch.partner)
                         if b is not None)
    fitted = {}
    if fitting:
        fit_seconds = statistics.median(fit_runs)
        fitted = {"fits": {k: v for k, v in fits.items() if v}, "fit_seconds": round(fit_seconds, 3),
                  "fit_ratio": round(fit_seconds / analysis_seconds, 3), "all_fit_seconds": [round(v, 3) for v in fit_runs]}
    return fitted | {
        "model": cfg.model_name,
        "pretrained": cfg.pretrained,
        "images": n_images,
        "batch_size": batch_size,
        "layers": [layer.name for layer in setup.layers],
        "transforms": spec,
        "forward_images_per_image": round(forward_images / n_images, 2),
        "repeats": len(full),
        "setup_seconds": round(setup_seconds, 3),
        "forward_seconds": round(forward_seconds, 3),
        "analysis_seconds": round(analysis_seconds, 3),
        "overhead_ratio": round(analysis_seconds / forward_seconds, 3),
        "images_per_second": round(n_images / analysis_seconds, 2),
        "phase_seconds": {k: round(v, 3) for k, v in median_phases.items()},
        "phase_share": {k: round(v / analysis_seconds, 3) for k, v in median_phases.items()},
        "all_forward_seconds": [round(v, 3) for v in bare],
        "all_analysis_seconds": [round(v, 3) for v in full],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "amp": amp or "off",
        "channels_last": channels_last,
        "workers": workers,
        "machine": machine_info(dev),
    }


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


def memory_scaling(counts: Sequence[int] = (32, 512), **options) -> dict:
    """Peak RSS of the analysis for each image count, each in a fresh process (same batch size)."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="alignscope-mem-") as tmp:
        folder = make_image_folder(max(counts), Path(tmp) / "images")
        for count in counts:
            child = dict(options, images=str(folder), max_images=count)
            code = ("import json, sys; from alignscope.bench import _memory_child; "
                    "print(json.dumps(_memory_child(**json.loads(sys.argv[1]))))")
            out = subprocess.run([sys.executable, "-c", code, json.dumps(child)], capture_output=True, text=True, check=True)
            results[count] = json.loads(out.stdout.strip().splitlines()[-1])
    small, large = results[min(counts)], results[max(counts)]
    return {"runs": results, "rss_ratio": round(large["peak_rss_mb"] / small["peak_rss_mb"], 3)}


def _memory_child(**options) -> dict:
    started = time.perf_counter()
    report = analyze(**options)
    return {"images": len(report.meta["images_used"]), "peak_rss_mb": round(peak_rss_mb(), 1),
            "seconds": round(time.perf_counter() - started, 2)}
