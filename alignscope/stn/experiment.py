"""The STN placement experiment: train every variant with several seeds, evaluate, save.

For each (variant, seed): train (:mod:`alignscope.stn.train`) on freshly
transformed training images, then evaluate (:mod:`alignscope.stn.evaluate`)
on the fixed random test set: accuracy averaged over the test passes, the
angle metric and the alignment at the STN output and after each layer.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch

from ..errors import UsageError
from ..report.files import csv_text, publish_folder
from .data import TASKS, FixedTestSet, UprightData, canonical_spec, load_data
from .evaluate import CurveProbe, Evaluation, evaluate
from .models import DEFAULT_VARIANTS, WARPS, STNClassifier, validate_variant
from .stability import flags, run_stability, stability_summary
from .train import DIGITS_RECIPE, TrainConfig, parameter_counts, train_variant

MODELS_FILE = "stn_models.pt"
ALIGNMENT_COLUMNS = ["variant", "seed", "layer", "alignment_error", "alignment_error_ci_low", "alignment_error_ci_high",
                     "n_images"]
CURVE_COLUMNS = ["variant", "seed", "step", "train_loss", "probe_accuracy", "probe_angle_std_deg"]
CURVE_POINTS = 20  # checkpoints of the learning curve per run (plus step 0)
QUICK = {"seeds": 1, "sweep_seeds": 3, "iterations": 150, "batch_size": 64, "test_passes": 2, "variants": ("none", "input", "features@1", "shared@1", "deep@1")}


@dataclass
class STNExperiment:
    """``results``: one row per (variant, seed); ``alignment``: per (variant, seed, layer); ``angles``: per test image
    of pass 0 (variant, seed, label, true_deg, warp_deg); ``curves``: the learning curves, per (variant, seed, step)
    (:class:`alignscope.stn.evaluate.CurveProbe`; empty for runs saved without them)."""

    results: pd.DataFrame
    alignment: pd.DataFrame
    angles: pd.DataFrame
    settings: dict
    models: dict[str, STNClassifier] = field(default_factory=dict)  # seed-0 model per variant, for pictures
    test: FixedTestSet | None = None
    curves: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CURVE_COLUMNS))

    def summary(self) -> pd.DataFrame:
        """Per variant: mean and std across seeds of accuracy and the angle metric, the alignment at the STN, and
        training stability (:func:`alignscope.stn.stability.stability_summary`: diverged and collapsed fractions,
        the worst seed). A seed whose loss or warp became non-finite has no numbers and is left out of the means and
        spreads; a seed that diverged by its accuracy counts in them."""
        grouped = self.results.groupby("variant", sort=False)
        table = pd.DataFrame({
            "parameters": grouped["parameters"].first(),
            "localization_parameters": grouped["localization_parameters"].first(),
            "seeds": grouped["seed"].count(),
            "test_accuracy_mean": grouped["test_accuracy"].mean(),
            "test_accuracy_std": grouped["test_accuracy"].std(ddof=1),
            "angle_std_deg_mean": grouped["angle_std_deg"].mean(),
            "angle_std_deg_std": grouped["angle_std_deg"].std(ddof=1),
            "deming_slope_mean": grouped["deming_slope"].mean(),
            "deming_slope_std": grouped["deming_slope"].std(ddof=1),
        })
        if len(self.alignment):
            at = self.alignment.groupby(["variant", "layer"])["alignment_error"].mean()
            # the classifier's deepest layer (a control's rows stop at its STN output)
            numbered = [name for name in dict.fromkeys(self.alignment["layer"]) if re.fullmatch(r"layer\d+", str(name))]
            last = max(numbered, key=lambda name: int(name[5:])) if numbered else None
            table["alignment_at_stn"] = [at.get((v, "stn"), math.nan) for v in table.index]
            table["alignment_last_layer"] = [at.get((v, last), math.nan) for v in table.index]
        table = table.join(stability_summary(self.results))
        return table.reindex(list(dict.fromkeys(self.results["variant"]))).reset_index(names="variant")

    def answer(self) -> str:
        """One line: which placement reached the best test accuracy, against warping the input and no STN."""
        summary = self.summary().set_index("variant")
        if summary.empty:
            return "no runs to answer from"
        accuracy = summary["test_accuracy_mean"]
        best = str(accuracy.idxmax())
        seeds = int(summary["seeds"].min())

        def shown(variant: str) -> str:
            mean, std = accuracy[variant], summary.loc[variant, "test_accuracy_std"]
            return f"{mean:.3f}" + (f" ± {std:.3f}" if seeds > 1 and math.isfinite(std) else "")

        others = [f"{name} {shown(name)}" for name in ("input", "none") if name in accuracy.index and name != best]
        line = f"where should the STN go? best test accuracy: {best} {shown(best)}"
        if others:
            line += "; " + ", ".join(others)
        if seeds < 2:
            line += " (1 seed: no spread; use --seeds 3 or more before reading a difference)"
        else:
            line += f" (mean ± std over {seeds} seeds)"
        return line

    def depth_answer(self) -> str | None:
        """For a depth sweep (two or more k of shared@k or deep@k): per family, the unstable seeds over all k and the
        angle std at the deepest k against the shallowest; None otherwise."""
        from .models import variant_depth

        summary = self.summary().set_index("variant")
        parts = []
        for family in ("shared", "deep"):
            names = [v for v in summary.index if str(v).startswith(f"{family}@")]
            if len(names) < 2:
                continue
            rows = self.results[self.results["variant"].isin(names)]
            diverged, collapsed = int(flags(rows, "diverged").sum()), int(flags(rows, "collapsed").sum())
            first, last = min(names, key=variant_depth), max(names, key=variant_depth)
            parts.append(f"{family}@k: {diverged + collapsed} of {len(rows)} seeds unstable ({diverged} diverged, "
                         f"{collapsed} collapsed); angle std {summary.loc[first, 'angle_std_deg_mean']:.1f} deg at "
                         f"{first}, {summary.loc[last, 'angle_std_deg_mean']:.1f} deg at {last}")
        if not parts:
            return None
        return "does sharing keep a deeper localization net stable? " + "; ".join(parts)

    def figures(self) -> dict:
        from .plots import accuracy_figure, angle_figure, curve_figure, depth_figure, depth_points, warp_grid_figure

        figures = {"stn_accuracy": accuracy_figure(self)}
        if len(depth_points(self)):
            figures["stn_depth"] = depth_figure(self)
        if len(self.curves) and ((self.curves["variant"] != "none") & self.curves["probe_angle_std_deg"].notna()).any():
            figures["stn_curves"] = curve_figure(self)
        if len(self.angles):
            figures["stn_angles"] = angle_figure(self)
        if self.models and self.test is not None:
            figures["stn_warps"] = warp_grid_figure(self)
        return figures

    def save(self, out: str | Path, force: bool = False) -> Path:
        def write(folder: Path) -> None:
            from ..report.plots import save_figures

            (folder / "stn_results.csv").write_text(csv_text(self.results), encoding="utf-8")
            (folder / "stn_alignment.csv").write_text(csv_text(self.alignment), encoding="utf-8")
            (folder / "stn_angles.csv").write_text(csv_text(self.angles), encoding="utf-8")
            (folder / "stn_curves.csv").write_text(csv_text(self.curves), encoding="utf-8")
            (folder / "stn_summary.csv").write_text(csv_text(self.summary()), encoding="utf-8")
            (folder / "run.json").write_text(json.dumps(self.settings, indent=2, default=str), encoding="utf-8")
            # seed-0 weights per variant (small), so saved runs can be combined and their warps drawn again
            torch.save({v: {"classifier": m.classifier, "warp": m.warp, "n_classes": m.n_classes,
                            "state_dict": m.state_dict()} for v, m in self.models.items()}, folder / MODELS_FILE)
            save_figures(self.figures(), folder)

        return publish_folder(Path(out), write, force, kind="stn")


def run_experiment(
    data: str | UprightData = "digits",
    task: str = "rotate",
    variants: Sequence[str] = DEFAULT_VARIANTS,
    seeds: int = 3,
    config: TrainConfig = DIGITS_RECIPE,
    classifier: str = "narrow",
    warp: str = "affine",
    test_passes: int = 10,
    data_seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    jobs: int = 1,
) -> STNExperiment:
    """Train each variant with seeds 0..seeds-1 and evaluate it (see the module docstring).

    ``progress(done, total)`` counts training steps over the whole experiment;
    ``log(line)`` gets one line per finished run. ``jobs`` > 1 trains that many
    runs at once, each in its own process with one torch thread (small
    networks use one core far better than several threads do); every run
    draws its own seeded stream, so the numbers are those of ``jobs=1`` with
    one torch thread.
    """
    if task not in TASKS:
        raise UsageError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if warp not in WARPS:
        raise UsageError(f"warp must be one of {', '.join(WARPS)}, got {warp!r}")
    if seeds < 1 or not variants:
        raise UsageError("need at least one variant and one seed")
    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, got {jobs}")
    for variant in variants:
        validate_variant(variant, classifier)
    upright = load_data(data, data_seed) if isinstance(data, str) else data
    test = FixedTestSet.make(upright.test_images, upright.test_labels, task, test_passes, seed=10_000 + data_seed)
    runs = [(variant, seed) for variant in variants for seed in range(seeds)]
    total = len(runs) * config.iterations
    load_start = _load_average()
    common = (upright, test, task, config, classifier, warp)
    if jobs == 1:
        outcomes = []
        for index, (variant, seed) in enumerate(runs):
            on_step = None if progress is None else (lambda step, base=index * config.iterations: progress(base + step, total))
            outcomes.append(_train_and_evaluate(variant, seed, *common, on_step))
            _log_run(log, outcomes[-1])
    else:
        outcomes = _run_in_processes(runs, common, jobs, progress, log, total)
    rows, alignment_rows, angle_frames, models, curve_rows = [], [], [], {}, []
    for outcome in outcomes:
        rows.append(outcome.row)
        curve_rows += outcome.curve_rows
        alignment_rows += outcome.alignment_rows
        if len(outcome.angles):
            angle_frames.append(outcome.angles)
        if outcome.row["seed"] == 0:
            models[outcome.row["variant"]] = outcome.model
    angle_columns = ["variant", "seed", "label", "true_deg", "warp_deg"]
    angles = pd.concat(angle_frames, ignore_index=True)[angle_columns] if angle_frames else pd.DataFrame(columns=angle_columns)
    settings = {"data": upright.source, "data_spec": canonical_spec(data) if isinstance(data, str) else None, "task": task, "classifier": classifier, "variants": list(variants),
                "seeds": seeds, "warp": warp, **config.as_dict(), "test_passes": test_passes, "data_seed": data_seed,
                "train_images": len(upright.train_labels), "test_images": len(upright.test_labels),
                "torch": torch.__version__, "torch_threads": 1 if jobs > 1 else torch.get_num_threads(), "jobs": jobs,
                # timings in stn_results.csv mean little without the machine's load: 1-minute load average, start and end
                "load_average_start": load_start, "load_average_end": _load_average(), "cpu_count": os.cpu_count()}
    return STNExperiment(pd.DataFrame(rows), pd.DataFrame(alignment_rows, columns=ALIGNMENT_COLUMNS), angles, settings,
                         models, test, pd.DataFrame(curve_rows, columns=CURVE_COLUMNS))


@dataclass
class _Outcome:
    row: dict
    alignment_rows: list[dict]
    angles: pd.DataFrame
    model: STNClassifier
    seconds: float
    curve_rows: list[dict]


def _train_and_evaluate(variant: str, seed: int, upright: UprightData, test: FixedTestSet, task: str, config: TrainConfig,
                        classifier: str, warp: str, on_step: Callable[[int], None] | None) -> _Outcome:
    """One (variant, seed): train, evaluate, and the rows it adds to each table."""
    probe = CurveProbe(test)
    result = train_variant(variant, upright.train_images, upright.train_labels, task, seed, config, classifier, warp,
                           len(upright.classes), on_step, checkpoint=probe,
                           checkpoint_every=max(1, config.iterations // CURVE_POINTS))
    diverged_at = result.diverged_at
    found = None
    if diverged_at is None:
        try:
            found = evaluate(result.model, test)
        except FloatingPointError:  # finite on every training batch, not on some test image
            diverged_at = config.iterations
    if found is None:  # NaN weights or sampling matrices: nothing to evaluate
        found = Evaluation({"test_accuracy": math.nan, "test_accuracy_std": math.nan, "test_passes": test.passes,
                            "angle_std_deg": math.nan, "deming_slope": math.nan}, {}, pd.DataFrame())
    tail = result.losses[-min(50, len(result.losses)):]
    stability = run_stability(variant, found.metrics["test_accuracy"], found.metrics["angle_std_deg"], diverged_at,
                              len(upright.classes))
    row = {"variant": variant, "classifier": classifier, "task": task, "seed": seed, **parameter_counts(result.model),
           **found.metrics, "final_train_loss": sum(tail) / len(tail), "iterations": config.iterations,
           **stability, "diverged_at_step": diverged_at,
           "seconds": round(result.seconds, 2), "cpu_seconds": round(result.cpu_seconds, 2)}
    curve_rows = [{"variant": variant, "seed": seed, **r} for r in probe.rows]
    alignment_rows = [{"variant": variant, "seed": seed, "layer": layer, "alignment_error": values["aligned_error"],
                       "alignment_error_ci_low": values["aligned_error_ci_low"],
                       "alignment_error_ci_high": values["aligned_error_ci_high"], "n_images": int(values["aligned_error_n"])}
                      for layer, values in found.alignment.items()]
    angles = found.angles.assign(variant=variant, seed=seed) if len(found.angles) else found.angles
    return _Outcome(row, alignment_rows, angles, result.model, result.seconds, curve_rows)


def _log_run(log: Callable[[str], None] | None, outcome: _Outcome) -> None:
    if log is not None:
        r = outcome.row
        if r["diverged_at_step"] is not None:
            log(f"{r['variant']} seed {r['seed']}: DIVERGED, the loss or the sampling matrix became NaN or infinite at "
                f"step {r['diverged_at_step']} ({outcome.seconds:.0f} s)")
            return
        flag = " DIVERGED: accuracy at most twice chance" if r["diverged"] else " (collapsed)" if r["collapsed"] else ""
        log(f"{r['variant']} seed {r['seed']}: test accuracy {r['test_accuracy']:.3f}, angle std {r['angle_std_deg']:.1f} deg, "
            f"Deming slope {r['deming_slope']:.2f} ({outcome.seconds:.0f} s){flag}")


_PROGRESS_EVERY = 10  # steps between a worker's progress messages
_worker_queue = None


def _worker_start(queue) -> None:
    global _worker_queue
    _worker_queue = queue
    torch.set_num_threads(1)


def _worker_run(index: int, variant: str, seed: int, common: tuple) -> _Outcome:
    def on_step(step: int) -> None:
        if step % _PROGRESS_EVERY == 0 or step == common[3].iterations:
            _worker_queue.put((index, step))

    return _train_and_evaluate(variant, seed, *common, on_step)


def _run_in_processes(runs: list[tuple[str, int]], common: tuple, jobs: int, progress: Callable[[int, int], None] | None,
                      log: Callable[[str], None] | None, total: int) -> list[_Outcome]:
    """Each run in a worker process (spawned: a forked copy of a process that has used torch's threads can hang)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    messages = context.Queue()
    steps = [0] * len(runs)
    outcomes: list[_Outcome | None] = [None] * len(runs)
    with ProcessPoolExecutor(max_workers=min(jobs, len(runs)), mp_context=context, initializer=_worker_start,
                             initargs=(messages,)) as pool:
        pending = {pool.submit(_worker_run, i, variant, seed, common): i for i, (variant, seed) in enumerate(runs)}
        try:
            _collect(pending, messages, steps, outcomes, common[3].iterations, progress, log, total)
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)  # runs not started yet are dropped, not trained for nothing
            raise
    return outcomes


def _collect(pending: dict, messages, steps: list[int], outcomes: list, iterations: int,
             progress: Callable[[int, int], None] | None, log: Callable[[str], None] | None, total: int) -> None:
    """Wait for the workers, forwarding their step counts to ``progress`` and each finished run to ``log``."""
    import queue as queues
    from concurrent.futures import FIRST_COMPLETED, wait

    while pending:
        done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
        try:
            while True:
                index, step = messages.get_nowait()
                steps[index] = max(steps[index], step)
        except queues.Empty:
            pass
        for future in done:
            index = pending.pop(future)
            outcomes[index] = future.result()  # a worker's error surfaces here, as it would in one process
            steps[index] = iterations
            _log_run(log, outcomes[index])
        if progress is not None:
            progress(sum(steps), total)


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):  # not on every platform
        return None
