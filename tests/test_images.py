import numpy as np
import pytest
from PIL import Image

from alignscope.errors import ImageError
from alignscope.inputs.images import bundled_photos, discover_images, image_stream, read_rgb
from alignscope.model.build import DataConfig

CFG = DataConfig(input_size=(3, 32, 32), crop_pct=1.0, interpolation="bilinear")


def test_bundled_photos_are_real_and_documented():
    photos = bundled_photos()
    assert len(photos) >= 6
    assert {"coffee.jpg", "chelsea.jpg"} <= {p.name for p in photos}
    assert (photos[0].parent / "SOURCES.md").is_file()
    assert all(min(Image.open(p).size) == 256 for p in photos)


def test_odd_formats_become_rgb(tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (20, 30, 4), dtype=np.uint8), "RGBA").save(tmp_path / "a.png")
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), "L").save(tmp_path / "b.png")
    Image.fromarray(rng.integers(0, 255, (20, 30), dtype=np.uint8), "L").convert("P").save(tmp_path / "c.bmp")
    sixteen = np.full((20, 30), 65535, dtype=np.uint16)
    sixteen[:, :15] = 0
    Image.fromarray(sixteen).save(tmp_path / "d.tiff")
    Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8)).save(tmp_path / "e.webp")
    for path in sorted(tmp_path.iterdir()):
        img = read_rgb(path)
        assert img.mode == "RGB" and img.size == (30, 20), path
    sixteen_rgb = np.asarray(read_rgb(tmp_path / "d.tiff"))
    assert sixteen_rgb[0, 0].tolist() == [0, 0, 0] and sixteen_rgb[0, -1].tolist() == [255, 255, 255]
    rgba = np.asarray(read_rgb(tmp_path / "a.png"))
    assert rgba.shape == (20, 30, 3)


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    img.save(tmp_path / "o.jpg", exif=exif)
    assert read_rgb(tmp_path / "o.jpg").size == (20, 40)


def test_corrupt_files_are_skipped_and_counted(tmp_path, caplog):
    good = Image.fromarray(np.zeros((40, 40, 3), dtype=np.uint8))
    for name in ("a.jpg", "b.jpg", "c.jpg"):
        good.save(tmp_path / name)
    data = (tmp_path / "b.jpg").read_bytes()
    (tmp_path / "b.jpg").write_bytes(data[: len(data) // 3])  # truncated jpeg
    (tmp_path / "d.png").write_bytes(b"not an image")
    stream = image_stream(tmp_path, CFG, batch_size=2)
    batches = list(stream)
    assert sum(b.pixels.shape[0] for b in batches) == 2
    assert {p.split("/")[-1] for p, _ in stream.skipped} == {"b.jpg", "d.png"}
    assert sum("skipping unreadable image" in r.message for r in caplog.records) == 2


def test_discovery_recursive_glob_and_seeded_sample(tmp_path):
    (tmp_path / "sub").mkdir()
    for i in range(6):
        Image.new("RGB", (8, 8)).save(tmp_path / ("sub" if i % 2 else ".") / f"{i}.png")
    (tmp_path / "notes.txt").write_text("x")
    assert len(discover_images(tmp_path)) == 6
    assert len(discover_images(str(tmp_path / "sub" / "*.png"))) == 3
    first = discover_images(tmp_path, max_images=3, seed=1)
    assert first == discover_images(tmp_path, max_images=3, seed=1) == sorted(first)
    assert first != discover_images(tmp_path, max_images=3, seed=2) or len(set(map(str, first))) == 3
    with pytest.raises(ImageError):
        discover_images(tmp_path / "missing")
    with pytest.raises(ImageError):
        discover_images(str(tmp_path / "*.gif"))


def test_stream_is_lazy_in_batches():
    stream = image_stream(None, CFG, batch_size=3)
    iterator = iter(stream)
    first = next(iterator)
    assert first.pixels.shape == (3, 3, 32, 32)
    assert len(stream.used) == 3  # only the first batch has been read


def test_paths_are_read_in_a_seeded_shuffled_order(tmp_path):
    for i in range(8):
        Image.new("RGB", (8, 8), (i * 30, 0, 0)).save(tmp_path / f"{i}.png")
    order = lambda seed: [p.name for p in image_stream(tmp_path, CFG, 2, seed=seed).paths]
    assert order(0) == order(0)
    assert sorted(order(0)) == sorted(order(1)) == [f"{i}.png" for i in range(8)]
    assert order(0) != sorted(order(0)) or order(1) != sorted(order(1))
