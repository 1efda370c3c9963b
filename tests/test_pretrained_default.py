"""The paper's contrast on the real pretrained default (EfficientNet-Lite0, bundled photos)."""
import pytest

import alignscope


@pytest.fixture(scope="module")
def table():
    table = alignscope.analyze(transforms=["rot90", "translate32,0"], batch_size=8).table
    return table[table["kind"] == "layer"]  # the stages; the output rows are tested in test_prediction.py


def test_rot90_does_not_align_on_average(table):
    rot90 = table[table["transform"] == "rot90"]
    assert len(rot90) == 5 and (rot90["n_images"] == 8).all()
    assert rot90["aligned_error"].mean() > 0.5


def test_translation_by_deepest_stride_aligns_better_at_every_stage(table):
    rot90 = table[table["transform"] == "rot90"].set_index("layer")
    shift = table[table["transform"] == "translate32,0"].set_index("layer")
    assert (shift["aligned_error"] < rot90["aligned_error"]).all()
    assert (shift["aligned_error"] < shift["unaligned_error"]).all()
    assert shift["exact"].all()  # 32 px is a whole number of cells at every stage
