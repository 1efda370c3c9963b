"""Two CPU processes under torchrun (gloo) give the single-process result."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch.distributed as dist

ARGS = ["--max-images", "7", "--batch-size", "2", "--transform", "rot90", "--transform", "rotate30", "--transform",
        "translate5,0", "--layers", "blocks.1", "--layers", "blocks.4", "--per-image", "--no-plots", "--quiet"]


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_two_gloo_processes_match_one(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    subprocess.run([sys.executable, "-m", "alignscope", "analyze", *ARGS, "--out", str(single)], check=True, env=env,
                   timeout=600, capture_output=True)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "alignscope", "analyze", *ARGS, "--out", str(sharded)], env=env, timeout=600,
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    meta = json.loads((sharded / "run.json").read_text())
    assert meta["world_size"] == 2
    assert meta["images_used"] == json.loads((single / "run.json").read_text())["images_used"]
    a, b = pd.read_csv(single / "alignment.csv"), pd.read_csv(sharded / "alignment.csv")
    numeric = a.select_dtypes("number").columns
    np.testing.assert_allclose(b[numeric].to_numpy(), a[numeric].to_numpy(), rtol=1e-6, atol=1e-9)
    # 7 images in batches of 2: the last batch holds one image, measured on rank 1 against batch 2's last image (rank 0)
    pa, pb = pd.read_csv(single / "per_image.csv"), pd.read_csv(sharded / "per_image.csv")
    assert list(pa["image"]) == list(pb["image"]) and len(pa) == 7 * 3 * (2 + 1)  # 2 layers and the output row
    np.testing.assert_allclose(pb["chance_distance"], pa["chance_distance"], rtol=1e-6)
