import os

import pytest
import torch

os.environ.setdefault("MPLBACKEND", "Agg")
# Tests never reach a model hub: hub lookups answer "offline" at once.
os.environ["HF_HUB_OFFLINE"] = "1"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def lite0():
    from alignscope.model.build import load_model

    return load_model("tf_efficientnet_lite0")


@pytest.fixture()
def photo_tensor():
    """The bundled photos prepared at 64 x 64 (ImageNet mean/std), as an N x 3 x 64 x 64 tensor."""
    from alignscope.inputs.images import image_stream
    from alignscope.model.build import DataConfig

    cfg = DataConfig(input_size=(3, 64, 64), crop_pct=1.0, interpolation="bilinear")
    return torch.cat([b.pixels for b in image_stream(None, cfg, batch_size=8)])
