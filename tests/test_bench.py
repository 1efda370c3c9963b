"""The benchmark's bookkeeping: interleaving, noise detection and peak memory of children.

No timing assertions: time comes from fake clocks whose answers are known by
construction; real runs are checked for what was fed where, not how fast.
"""
import json
import os
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import alignscope.bench.bench as bench
import alignscope.runtime.timing as timing
from alignscope.cli.main import main
from alignscope.errors import AlignscopeError
from alignscope.bench.interleave import Interleaver, PassTiming, assess_noise, summarize_passes
from alignscope.bench.peakmemory import CommandRun, run_measured
from alignscope.runtime.timing import BoundaryTimer

MIB = 2**20


class FakeClock:
    """Seconds that pass only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def _drive(n, forward_cost, loading_cost, analysis_cost, monkeypatch, extra_boundaries=0):
    """A fake engine loop driving a BoundaryTimer as the engine does: 'loading' opens before each batch and once after."""
    clock, events = FakeClock(), []
    monkeypatch.setattr(timing, "time", SimpleNamespace(perf_counter=clock))

    def forward(inputs):
        events.append(("A", inputs))
        clock.advance(forward_cost[inputs])

    interleaver = Interleaver(n, forward, prepare=lambda k: k, clock=clock)
    timer = BoundaryTimer(interleaver.boundary)
    for k in range(n):
        with timer("loading"):
            events.append(("load", k))
            clock.advance(loading_cost[k])
        with timer("forward"):
            events.append(("B", k))
            clock.advance(analysis_cost[k])
    for _ in range(1 + extra_boundaries):
        with timer("loading"):
            pass
    return interleaver, timer, events


def test_interleaver_times_each_batch_forward_then_its_analysis(monkeypatch):
    forward_cost, loading_cost, analysis_cost = [3.0, 5.0, 7.0], [0.5, 0.25, 0.125], [11.0, 13.0, 17.0]
    interleaver, timer, events = _drive(3, forward_cost, loading_cost, analysis_cost, monkeypatch)
    assert events == [("A", 0), ("load", 0), ("B", 0), ("A", 1), ("load", 1), ("B", 1), ("A", 2), ("load", 2), ("B", 2)]
    result = interleaver.result()
    assert result.forward == forward_cost
    assert result.analysis == [lo + an for lo, an in zip(loading_cost, analysis_cost)]
    # the bare forwards run before the phase clock starts: no phase of the analysis contains them
    assert timer.seconds["loading"] == sum(loading_cost)
    assert timer.seconds["forward"] == sum(analysis_cost)


def test_interleaver_refuses_boundaries_that_do_not_pair_up(monkeypatch):
    too_many, _, _ = _drive(3, [1.0] * 3, [0.0] * 3, [1.0] * 3, monkeypatch, extra_boundaries=1)
    too_few = Interleaver(3, lambda inputs: None)
    for _ in range(3):  # the boundary after the last batch never comes
        too_few.boundary()
    for interleaver in (too_many, too_few):
        with pytest.raises(AlignscopeError, match="did not pair up"):
            interleaver.result()


def test_summary_is_a_ratio_of_sums_with_per_batch_spread():
    passes = [PassTiming(forward=[1.0, 3.0], analysis=[2.0, 3.0]), PassTiming(forward=[1.0, 5.0], analysis=[2.0, 5.0])]
    summary = summarize_passes(passes)
    assert summary["overhead_ratio"] == pytest.approx((5.0 + 7.0) / (4.0 + 6.0))  # not the mean of ratios (1.5)
    assert summary["batch_ratio"] == pytest.approx({"min": 1.0, "median": 1.5, "max": 2.0, "spread": 1 / 1.5, "batches": 4})
    assert summary["forward"] == {"min": 4.0, "median": 5.0, "all": [4.0, 6.0]}
    assert summary["analysis"] == {"min": 5.0, "median": 6.0, "all": [5.0, 7.0]}
    assert summary["pass_ratios"] == pytest.approx([5 / 4, 7 / 6])


def _summary(forward_totals, analysis_totals):
    return summarize_passes([PassTiming([a], [b]) for a, b in zip(forward_totals, analysis_totals)])


def test_a_quiet_run_is_not_noisy():
    noise = assess_noise(_summary([9.6, 9.8, 9.7], [10.4, 10.6, 10.5]), [0.3, 1.9, 2.0], cores=2)
    assert not noise["noisy"] and noise["reasons"] == [] and noise["unchecked"] == []
    assert noise["load_average"]["max"] == 2.0


def test_one_slow_repeat_makes_the_run_noisy():
    # the repeat from the report: one bare-forward pass of 29.1 s against 9.6 and 9.8
    noise = assess_noise(_summary([9.6, 29.1, 9.8], [10.4, 10.6, 10.5]), [0.3, 0.5], cores=2)
    assert noise["noisy"]
    assert any(reason.startswith("bare forward (A)") for reason in noise["reasons"])
    assert any(reason.startswith("B/A") for reason in noise["reasons"])
    assert noise["repeat_spread"]["forward"] == pytest.approx(29.1 / 9.6 - 1)


@pytest.mark.parametrize("slow, noisy", [(12.0, False), (12.01, True)])
def test_spread_limit_is_twenty_percent_between_repeats(slow, noisy):
    noise = assess_noise(_summary([10.0, 10.0], [10.0, slow]), [0.1], cores=4)
    assert noise["noisy"] is noisy
    assert [r.split(" ")[0] for r in noise["reasons"]] == (["analysis", "B/A"] if noisy else [])


@pytest.mark.parametrize("load, noisy", [(2.5, False), (2.51, True)])
def test_load_average_a_quarter_above_the_core_count_makes_the_run_noisy(load, noisy):
    noise = assess_noise(_summary([10.0, 10.1], [11.0, 11.1]), [0.2, load, 1.0], cores=2)
    assert noise["noisy"] is noisy
    assert any("load average" in r for r in noise["reasons"]) is noisy


def test_what_could_not_be_checked_is_said():
    noise = assess_noise(_summary([10.0], [30.0]), [None, None], cores=2)
    assert not noise["noisy"]
    assert len(noise["unchecked"]) == 2 and noise["repeat_spread"] == {"forward": None, "analysis": None, "ratio": None}


# --- the real analysis, interleaved -------------------------------------------------------------------------------

LOG = []  # module-level: the model's deep copy must log to the same place


class TinyNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.down = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.head = nn.Conv2d(6, 8, 3, padding=1)

    def forward(self, x):
        LOG.append((id(self), x.shape[0], float(x.double().sum()), tuple(x.shape[-2:])))
        return self.head(torch.relu(self.down(torch.relu(self.stem(x)))))


def _tiny_benchmark(run=bench.benchmark, **kwargs):
    torch.manual_seed(0)
    model = TinyNet().eval()
    images = torch.randn(6, 3, 32, 32)
    options = dict(model=model, images=images, max_images=None, transforms=["rot90", "rotate30"],
                   layers=["stem", "down"], batch_size=2, repeats=2, input_size=(3, 32, 32))
    return model, run(**(options | kwargs))


def test_each_batch_is_forwarded_bare_on_a_copy_right_before_its_analysis():
    LOG.clear()
    model, result = _tiny_benchmark()
    # drop the layer and lattice probes (everything before the first bare pass); the rest alternates:
    # the copy (A) then the hooked model (B)
    runs = []
    first_bare = next(i for i, (owner, *_) in enumerate(LOG) if owner != id(model))
    for owner, n, total, size in LOG[first_bare:]:
        if total == 0.0 or size != (32, 32):
            continue
        who = "B" if owner == id(model) else "A"
        if not runs or runs[-1][0] != who:
            runs.append((who, []))
        runs[-1][1].append((n, total))
    batches, passes = 3, 1 + 2  # warm-up and two timed passes
    assert [who for who, _ in runs] == ["A", "B"] * (batches * passes)
    for (_, bare), (_, analysed) in zip(runs[::2], runs[1::2]):
        assert [n for n, _ in bare] == [n for n, _ in analysed]  # same batches, same order
        assert [t for _, t in bare] == pytest.approx([t for _, t in analysed], rel=1e-9)  # the same pixels
    assert result["batches"] == batches and result["repeats"] == 2 and result["batch_ratio"]["batches"] == batches * 2
    # per image: the original, its disk-masked copy, rot90, rotate30 and its round trip, and the original shifted
    # by rot90's grid residual on the stride-2 layer's lattice (the registered comparison); batches 2 and 3 also
    # carry the image before them (their chance partner) through both reference passes
    assert result["forward_images_per_image"] == pytest.approx((6 * 6 + 2 * 2) / 6, abs=0.006)  # rounded to 2 places
    assert sum(result["all_forward_seconds"]) > 0 and sum(result["all_analysis_seconds"]) > 0
    assert set(result["noise"]) >= {"noisy", "reasons", "unchecked", "repeat_spread", "load_average"}


def test_the_bench_command_says_a_run_is_noisy(monkeypatch, capsys):
    def tiny(**options):  # what the command asked for, on the tiny model and tensor images
        return _tiny_benchmark(run, repeats=options["repeats"])[1]

    run = bench.benchmark
    monkeypatch.setattr(bench, "benchmark", tiny)
    monkeypatch.setattr(bench, "load_average", lambda: 99.0)
    with pytest.raises(SystemExit) as info:
        main(["bench", "--repeats", "2"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "NOISY RUN" in out and "load average reached 99.00" in out
    with pytest.raises(SystemExit):
        main(["bench", "--repeats", "2", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["noisy"] and result["noise"]["load_average"]["max"] == 99.0


# --- peak memory of children -------------------------------------------------------------------------------------

def _allocate(mib):
    return [sys.executable, "-S", "-c", f"data = b'\\x01' * ({mib} * {MIB}); assert data[-1] == 1"]


@pytest.mark.skipif(sys.platform != "linux", reason="the inherited peak is a Linux exec behaviour")
def test_a_child_reports_its_own_peak_not_its_parents():
    held = b"\x02" * (600 * MIB)  # this process now peaks at least 600 MiB above any child here
    baseline = run_measured([sys.executable, "-S", "-c", "pass"]).succeeded("python")
    allocating = run_measured(_allocate(200)).succeeded("python")
    assert allocating.peak_mb - baseline.peak_mb == pytest.approx(200, abs=20)
    assert allocating.peak_mb < 400
    assert baseline.launcher_mb is not None and baseline.peak_mb >= baseline.launcher_mb - 1  # the floor
    # control: the same child reaped by this large process directly inherits its peak (what the bug reported)
    child = os.spawnv(os.P_NOWAIT, sys.executable, _allocate(200))
    _, status, usage = os.wait4(child, 0)
    assert status == 0 and usage.ru_maxrss / 1024 > 600
    assert held[-1] == 2


def test_a_failing_child_is_an_error_with_its_message():
    failed = run_measured([sys.executable, "-S", "-c", "import sys; print('went wrong', file=sys.stderr); sys.exit(3)"])
    assert failed.returncode == 3
    with pytest.raises(AlignscopeError, match="the child failed [(]exit 3[)]: went wrong"):
        failed.succeeded("the child")


@pytest.mark.skipif(sys.platform != "linux", reason="the inherited peak is a Linux exec behaviour")
def test_memory_scaling_measures_the_analysis_not_this_process():
    held = b"\x03" * (2000 * MIB)
    parent_peak = bench.peak_rss_mb()
    result = bench.memory_scaling(counts=(2, 4), transforms=["rot90"], layers=["blocks.1"], batch_size=2)
    assert set(result["runs"]) == {2, 4} and [r["images"] for r in result["runs"].values()] == [2, 4]
    for run in result["runs"].values():
        assert 50 < run["peak_rss_mb"] < parent_peak - 1000  # the child does not inherit the held 2000 MiB
    assert result["rss_ratio"] == pytest.approx(result["runs"][4]["peak_rss_mb"] / result["runs"][2]["peak_rss_mb"], abs=1e-3)
    assert "launcher" in result["peak_rss_source"]
    # the floor: the model's bare forward passes alone, in a fresh process (not this one's held 2000 MiB). On a run
    # this small it is not always below the analysis's peak: the analysis returns freed heap to the system
    # (malloc_trim) between its phases, the bare passes keep theirs; on 32 images it is 535 MiB below.
    assert result["bare_forward"]["images"] == 3
    assert 50 < result["bare_forward"]["peak_rss_mb"] < parent_peak - 1000
    assert result["bare_forward"]["peak_rss_mb"] < 1.25 * min(run["peak_rss_mb"] for run in result["runs"].values())
    assert held[-1] == 3


# --- tuned against untuned malloc --------------------------------------------------------------------------------

def test_malloc_comparison_launches_children_with_and_without_the_opt_out(monkeypatch):
    calls = []

    def fake_run(argv, env=None, timeout=None):
        calls.append((argv, env))
        untuned = env.get("ALIGNSCOPE_NO_MALLOC_TUNING") == "1"
        out = {"forward_seconds": 10.0, "analysis_seconds": 15.0 if untuned else 12.0, "overhead_ratio": 1.0, "noisy": False}
        return CommandRun(peak_mb=100.0, launcher_mb=10.0, seconds=1.0, returncode=0, stdout=json.dumps(out) + "\n", stderr="")

    monkeypatch.setattr(bench, "run_measured", fake_run)
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1")
    monkeypatch.setenv("ALIGNSCOPE_NO_MALLOC_TUNING", "1")
    result = bench.malloc_comparison(model="resnet18", pretrained=False, max_images=8, repeats=2)
    (tuned_argv, tuned_env), (untuned_argv, untuned_env) = calls
    assert tuned_argv == untuned_argv and tuned_argv[1:4] == ["-m", "alignscope", "bench"] and tuned_argv[-1] == "--json"
    assert "ALIGNSCOPE_NO_MALLOC_TUNING" not in tuned_env and untuned_env["ALIGNSCOPE_NO_MALLOC_TUNING"] == "1"
    assert not any(k.startswith("MALLOC_") for env in (tuned_env, untuned_env) for k in env)
    assert result["analysis_speedup"] == pytest.approx(15.0 / 12.0, abs=1e-3) and result["forward_speedup"] == 1.0


def test_bench_arguments_repeat_the_same_benchmark():
    from alignscope.cli.experiments import bench as command

    options = dict(model="resnet18", weights="w.safetensors", pretrained=False, images="photos/", max_images=12,
                   transforms=["rot90", "scale0.8"], layers=["layer1", "layer2"], batch_size=4, device="cpu", amp="bf16",
                   channels_last=True, workers=2, repeats=5)
    params = command.make_context("bench", bench.bench_arguments(**options)).params
    assert params["model"] == "resnet18" and params["weights"] == os.path.abspath("w.safetensors") and params["no_pretrained"]
    assert tuple(params["images"]) == (os.path.abspath("photos/"),) and params["max_images"] == 12 and params["batch_size"] == 4
    assert list(params["transforms"]) == options["transforms"] and list(params["layers"]) == options["layers"]
    assert params["amp"] == "bf16" and params["channels_last"] is True and params["workers"] == 2 and params["repeats"] == 5


def test_readme_figures_script_prints_the_rows_and_refuses_noisy_runs(monkeypatch, capsys, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "readme_figures.py"
    spec = importlib.util.spec_from_file_location("readme_figures", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _, measured = _tiny_benchmark()
    timed = dict(measured, noisy=False, noise=dict(measured["noise"], reasons=[]))  # quiet, whatever this machine is
    memory = dict(timed, memory_scaling={"runs": {"32": {"peak_rss_mb": 100.0}, "512": {"peak_rss_mb": 104.0}},
                                         "rss_ratio": 1.04, "launcher_mb": 10.5})
    noisy = dict(timed, noisy=True, noise=dict(timed["noise"], reasons=["load average reached 9.00 on 2 cores"]))
    answers = {"--memory-scaling": memory, "resnet50": noisy}
    monkeypatch.setattr(script, "bench", lambda args: next((v for k, v in answers.items() if k in args), timed))
    with pytest.raises(SystemExit, match="noisy runs: resnet50"):
        script.main(["--out", str(tmp_path), "--only", "lite0", "--only", "resnet50", "--only", "memory"])
    out = capsys.readouterr().out
    weights = "ImageNet weights" if timed["pretrained"] else "random weights"
    assert f"| {timed['model']} ({weights}) | {timed['forward_seconds_min']:.1f} / {timed['forward_seconds']:.1f} |" in out
    assert "memory: 32 images 100 MiB, 512 images 104 MiB, ratio 1.040" in out
    assert "resnet50: " in out and "NOISY: load average reached 9.00" in out
    assert json.loads((tmp_path / "memory.json").read_text())["memory_scaling"]["rss_ratio"] == 1.04


def test_a_killed_child_is_named_by_its_signal_not_by_its_last_warning():
    from alignscope.errors import AlignscopeError
    from alignscope.bench.peakmemory import CommandRun

    killed = CommandRun(peak_mb=1.0, launcher_mb=None, seconds=1.0, returncode=-9, stdout="",
                        stderr="warning: a border effect at blocks.6\n")
    with pytest.raises(AlignscopeError, match="killed by SIGKILL.*out-of-memory"):
        killed.succeeded("the analysis of 512 images")
    failed = CommandRun(peak_mb=1.0, launcher_mb=None, seconds=1.0, returncode=1, stdout="",
                        stderr="error: no images\nwarning: something after it\n")
    with pytest.raises(AlignscopeError, match="exit 1\\): error: no images"):
        failed.succeeded("the analysis")
