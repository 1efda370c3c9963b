"""Benchmark output, worker processes, autocast and channels_last: same answers, no timing claims."""
import json

import numpy as np
import pytest
import torch

import alignscope
from alignscope.cli.main import main

NUMERIC = ["aligned_error", "unaligned_error", "floor_error", "chance_distance", "aligned_cosine"]


def cli(*args):
    with pytest.raises(SystemExit) as info:
        main(list(args))
    return info.value.code


def test_bench_json_counts_the_forward_inputs(capsys):
    assert cli("bench", "--max-images", "4", "--batch-size", "2", "--transform", "rot90", "--transform", "rotate30",
               "--layers", "blocks.1", "--repeats", "1", "--json") == 0
    result = json.loads(capsys.readouterr().out)
    for key in ("overhead_ratio", "images_per_second", "peak_rss_mb", "forward_seconds", "analysis_seconds", "machine"):
        assert key in result
    # per image: the original, its disk-masked copy, rot90, rotate30, rotate30's round trip, and the original
    # shifted by rot90's grid residual on blocks.1's lattice (-3, 0 px) for the registered comparison; plus the
    # second batch's carried chance partner in both reference passes (plain and disk): (4 * 6 + 2) / 4
    assert result["forward_images_per_image"] == 6.5
    assert result["images"] == 4 and result["forward_seconds"] > 0 and result["analysis_seconds"] > 0
    assert result["overhead_ratio"] == pytest.approx(result["analysis_seconds"] / result["forward_seconds"], rel=1e-2)
    assert set(result["phase_seconds"]) == {"loading", "warping", "forward", "metrics"}


def _table(**kw):
    return alignscope.analyze(transforms=["rot90", "rotate30"], layers=["blocks.1", "blocks.4"], max_images=5,
                              batch_size=2, input_size=(3, 96, 96), **kw).table


@pytest.fixture(scope="module")
def reference_table(lite0):
    return _table()


def test_worker_processes_give_the_same_table(reference_table, monkeypatch):
    loaders = []
    original = torch.utils.data.DataLoader

    def spy(*args, **kwargs):
        loaders.append(kwargs.get("num_workers"))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.utils.data, "DataLoader", spy)
    np.testing.assert_allclose(_table(workers=2)[NUMERIC].to_numpy(), reference_table[NUMERIC].to_numpy(), rtol=1e-6)
    assert loaders and set(loaders) == {2}  # the images really came through worker processes


def test_channels_last_gives_the_same_table(reference_table, monkeypatch):
    from alignscope.model.capture import FeatureCapture

    layouts = []
    original = FeatureCapture.__call__

    def spy(self, x):
        layouts.append(x.is_contiguous(memory_format=torch.channels_last))
        return original(self, x)

    monkeypatch.setattr(FeatureCapture, "__call__", spy)
    np.testing.assert_allclose(_table(channels_last=True)[NUMERIC].to_numpy(), reference_table[NUMERIC].to_numpy(),
                               rtol=1e-4, atol=1e-5)
    assert layouts and all(layouts)  # the model was fed NHWC tensors


def test_bf16_autocast_stays_close_and_keeps_float64_statistics(reference_table):
    table = _table(amp="bf16")
    assert table["aligned_error"].dtype == np.float64
    np.testing.assert_allclose(table["aligned_error"], reference_table["aligned_error"], atol=0.05)


def test_bad_amp_is_a_usage_error():
    with pytest.raises(alignscope.UsageError, match="amp must be one of"):
        alignscope.analyze(amp="int8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(reference_table):
    table = _table(device="cuda")
    np.testing.assert_allclose(table[NUMERIC].to_numpy(), reference_table[NUMERIC].to_numpy(), rtol=1e-3, atol=1e-4)
