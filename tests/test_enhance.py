"""`semi-llie enhance`, the Enhancer, checkpoint/MLflow loading and tiled inference."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps
from torch import nn

from semi_llie import cli
from semi_llie.data.images import apply_exif_orientation, read_image, write_image
from semi_llie.errors import UserError
from semi_llie.inference.loading import load_enhancer
from semi_llie.inference.tiling import TilePlan, blend_window, enhance_image, tile_starts
from semi_llie.models import TINY_MODEL_CONFIG, build_model
from semi_llie.models.enhancer import Enhancer, illumination_maps

torch.set_num_threads(1)


def identity_mambalowlight() -> nn.Module:
    """A real tiny MambaLowlight whose last conv is zero: y = x exactly (global residual)."""
    model = build_model(TINY_MODEL_CONFIG)
    nn.init.zeros_(model.conv_last.weight)
    nn.init.zeros_(model.conv_last.bias)
    return model


def write_checkpoint(step_dir: Path, model: nn.Module, model_cfg: dict | None = None) -> Path:
    """A checkpoint step dir as the trainer writes it (config.yaml + teacher.pt + student.pt)."""
    step_dir.mkdir(parents=True)
    cfg = dict(model_cfg or TINY_MODEL_CONFIG)
    cfg["depths"] = list(cfg["depths"])
    (step_dir / "config.yaml").write_text(yaml.safe_dump({"model": cfg, "seed": 0}))
    for which in ("teacher", "student"):
        torch.save(model.state_dict(), step_dir / f"{which}.pt")
    return step_dir


def psnr_numpy(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(1.0 / mse))


class Pointwise(nn.Module):
    """A per-pixel network (1×1 convs): tiles cannot change its output, so tiled must equal untiled."""

    def __init__(self) -> None:
        super().__init__()
        self.mix = nn.Conv2d(3, 3, 1)

    def forward(
        self, x: torch.Tensor, illum: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.sigmoid(self.mix(x))
        return y, y


def test_tile_starts_cover_the_image_with_the_overlap() -> None:
    for length, tile, overlap in [(700, 256, 32), (500, 256, 32), (257, 256, 16), (100, 256, 32)]:
        starts = tile_starts(length, tile, overlap)
        assert starts[0] == 0 and starts[-1] + min(tile, length) == length
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:], strict=False))


def test_blend_window_is_positive_and_flat_inside() -> None:
    window = blend_window(64, 48, 16)
    assert window.shape == (1, 1, 64, 48)
    assert window.min() > 0 and window[0, 0, 16:48, 16:32].eq(1).all()


def test_tiled_equals_untiled_for_a_pointwise_model() -> None:
    enhancer = Enhancer(Pointwise()).eval()
    x = torch.rand(2, 3, 150, 210)
    whole = enhance_image(enhancer, x, TilePlan(None, 16))
    tiled = enhance_image(enhancer, x, TilePlan(64, 16))
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)


def test_automatic_plan_tiles_only_over_the_budget() -> None:
    assert TilePlan.for_image(400, 600, bytes_per_pixel=1000, max_memory_mb=1000).tile is None
    plan = TilePlan.for_image(1500, 2000, bytes_per_pixel=1000, max_memory_mb=100)
    assert plan.tile is not None and plan.tile**2 * 1000 <= 100 * 2**20
    assert TilePlan.for_image(300, 300, 1.0, tile=256).tile == 256
    assert TilePlan.for_image(200, 200, 1.0, tile=256).tile is None


@pytest.mark.slow
def test_tiled_matches_untiled_for_a_tiny_mambalowlight() -> None:
    torch.manual_seed(0)
    # Smaller than TINY_MODEL_CONFIG so the 700×500 pass stays well under a minute on a shared CPU; the last
    # conv is scaled up so the network changes the image a lot and the comparison is not trivially met.
    model = build_model({**TINY_MODEL_CONFIG, "embed_dim": 8, "depths": (1,), "d_state": 2})
    nn.init.normal_(model.conv_last.weight, std=0.05)
    enhancer = Enhancer(model).eval()
    x = torch.rand(1, 3, 500, 700) * 0.3
    whole = enhance_image(enhancer, x, TilePlan(None, 32))
    tiled = enhance_image(enhancer, x, TilePlan(256, 32))
    assert (whole - x).abs().mean() > 0.05
    assert psnr_numpy(tiled.numpy(), whole.numpy()) >= 45.0


def test_tiles_share_the_whole_images_exposure_gain() -> None:
    model = build_model({**TINY_MODEL_CONFIG, "exposure": True})
    nn.init.zeros_(model.conv_last.weight)  # y = gain · x exactly
    nn.init.zeros_(model.conv_last.bias)
    enhancer = Enhancer(model).eval()
    x = torch.full((1, 3, 96, 128), 0.02)
    x[..., 64:] = 0.2  # a dark left and a bright right: each tile alone would get its own gain
    with torch.no_grad():
        model.exposure.linear.weight.copy_(-0.5 * torch.eye(3))
        whole = enhance_image(enhancer, x, TilePlan(None, 16))
        tiled = enhance_image(enhancer, x, TilePlan(64, 16))
        torch.testing.assert_close(whole, (x * model.exposure_gain(x)).clamp(0, 1))
        torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
        assert not torch.allclose(enhancer(x[..., :64]), whole[..., :64])  # the left tile's own gain differs


def test_precomputed_illumination_is_computed_like_the_shards() -> None:
    torch.manual_seed(0)
    model = build_model({**TINY_MODEL_CONFIG, "illumination": "precomputed"}).eval()
    enhancer = Enhancer(model)
    x = torch.rand(1, 3, 24, 32)
    expected = model(x, illumination_maps(x))[0].clamp(0, 1)
    torch.testing.assert_close(enhancer(x), expected)


def test_size_multiple_reflect_pads_and_crops_back() -> None:
    class NeedsMultipleOf8(nn.Module):
        size_multiple = 8

        def forward(
            self, x: torch.Tensor, illum: torch.Tensor | None = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            assert x.shape[-2] % 8 == 0 and x.shape[-1] % 8 == 0
            return x, x

    x = torch.rand(1, 3, 21, 30)
    torch.testing.assert_close(Enhancer(NeedsMultipleOf8())(x), x)


def test_load_enhancer_from_step_dir_and_output_dir(tmp_path: Path) -> None:
    model = identity_mambalowlight()
    step = write_checkpoint(tmp_path / "run" / "checkpoints" / "step-4", model)
    (step / "trainer_state.json").write_text("{}")
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step-4")
    x = torch.rand(1, 3, 16, 20)
    for source in (step, tmp_path / "run"):
        enhancer = load_enhancer(source, which="student")
        torch.testing.assert_close(enhancer(x), x, atol=1e-6, rtol=0)


def test_load_enhancer_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="does not exist"):
        load_enhancer(tmp_path / "missing")
    step = write_checkpoint(tmp_path / "step-1", build_model(TINY_MODEL_CONFIG))
    bigger = {**TINY_MODEL_CONFIG, "embed_dim": 24, "depths": [1, 1]}
    (step / "config.yaml").write_text(yaml.safe_dump({"model": bigger}))
    with pytest.raises(UserError, match="does not match the model block"):
        load_enhancer(step)
    (step / "teacher.pt").write_bytes(b"not a zip")
    with pytest.raises(UserError, match="cannot be read"):
        load_enhancer(step)
    (step / "config.yaml").write_text("seed: 1\n")
    with pytest.raises(UserError, match="no 'model:' block"):
        load_enhancer(step)


@pytest.mark.slow
def test_a_model_pickled_before_the_rooms_still_loads(tmp_path: Path) -> None:
    """Registered models pickle the Enhancer by reference; before the package had rooms it lived in
    semi_llie.modelio. Rewrite a saved model's pickle to that old name and load it as MLflow would."""
    import zipfile

    import mlflow.pytorch

    enhancer = Enhancer(build_model(TINY_MODEL_CONFIG)).eval()
    folder = tmp_path / "model"
    mlflow.pytorch.save_model(enhancer, folder, serialization_format="pickle", pip_requirements=[])
    weights = next((tmp_path / "model").rglob("model.pth"))
    with zipfile.ZipFile(weights) as archive:
        members = {info: archive.read(info) for info in archive.infolist()}
    new_name, old_name = b"semi_llie.models.enhancer\nEnhancer\n", b"semi_llie.modelio\nEnhancer\n"
    pickles = [info for info in members if info.filename.endswith("data.pkl")]
    assert len(pickles) == 1 and new_name in members[pickles[0]]  # protocol 2: the class path as text
    members[pickles[0]] = members[pickles[0]].replace(new_name, old_name)
    with zipfile.ZipFile(weights, "w") as archive:
        for info, data in members.items():
            archive.writestr(info, data)

    loaded = mlflow.pytorch.load_model(str(tmp_path / "model"))
    assert type(loaded) is Enhancer
    x = torch.rand(1, 3, 20, 28)
    torch.testing.assert_close(loaded(x), enhancer(x), rtol=0, atol=0)


def test_load_enhancer_from_mlflow_model_uri(tmp_path: Path) -> None:
    import mlflow.pytorch

    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    enhancer = Enhancer(build_model(TINY_MODEL_CONFIG)).eval()
    client = mlflow.MlflowClient(uri)
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "artifacts").as_uri())
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment) as run:
            info = mlflow.pytorch.log_model(
                enhancer,
                name="teacher",
                serialization_format="pickle",
                pip_requirements=[],
                registered_model_name="semi-llie-teacher",
            )
    finally:
        mlflow.set_tracking_uri(previous)
    client.set_registered_model_alias("semi-llie-teacher", "champion", info.registered_model_version)
    x = torch.rand(1, 3, 20, 28)
    for source in ("models:/semi-llie-teacher@champion", f"runs:/{run.info.run_id}/teacher"):
        loaded = load_enhancer(source, tracking_uri=uri)
        assert isinstance(loaded, Enhancer)
        torch.testing.assert_close(loaded(x), enhancer(x))
    with pytest.raises(UserError, match="semi-llie-missing"):
        load_enhancer("models:/semi-llie-missing@champion", tracking_uri=uri)

    # Loading leaves the caller's MLflow settings as they were: an unset registry keeps following the
    # tracking URI instead of staying pinned to the store the model came from.
    other = f"sqlite:///{tmp_path / 'other.db'}"
    mlflow.set_tracking_uri(other)
    try:
        assert mlflow.get_registry_uri() == other
    finally:
        mlflow.set_tracking_uri(previous)


@pytest.mark.parametrize("suffix", [".png", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(tmp_path: Path, orientation: int, suffix: str) -> None:
    # OpenCV turns TIFFs upright itself and leaves PNGs (and JPEGs) as stored: each must be turned once.
    pixels = np.random.default_rng(orientation).integers(0, 256, (6, 10, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{suffix}"
    image.save(path, exif=exif)
    with Image.open(path) as stored:
        expected = np.asarray(ImageOps.exif_transpose(stored).convert("RGB"))
    np.testing.assert_array_equal(apply_exif_orientation(pixels, orientation), expected)
    np.testing.assert_array_equal(read_image(path).pixels, expected)


def test_the_orientation_is_read_without_decoding_the_pixels(tmp_path: Path, monkeypatch) -> None:
    from PIL import ImageFile

    from semi_llie.data.images import exif_orientation

    image = Image.fromarray(np.zeros((4, 6, 3), dtype=np.uint8))
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "tagged.png", exif=exif)
    image.save(tmp_path / "plain.png")

    def no_decoding(self):
        raise AssertionError("the pixels were decoded to read the orientation")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    assert exif_orientation(tmp_path / "tagged.png") == 6 and exif_orientation(tmp_path / "plain.png") == 1


def test_sixteen_bit_and_grayscale_inputs_keep_their_precision(tmp_path: Path) -> None:
    rgb16 = np.random.default_rng(0).integers(0, 65536, (5, 7, 3), dtype=np.uint16)
    cv2.imwrite(str(tmp_path / "rgb16.png"), rgb16[:, :, ::-1])
    loaded = read_image(tmp_path / "rgb16.png")
    assert loaded.bit_depth == 16
    np.testing.assert_array_equal(loaded.pixels, rgb16)
    np.testing.assert_allclose(loaded.to_float(), rgb16 / 65535.0, atol=1e-7)
    write_image(tmp_path / "out.png", loaded.to_float(), loaded.bit_depth)
    np.testing.assert_array_equal(
        cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED)[:, :, ::-1], rgb16
    )

    gray = np.arange(35, dtype=np.uint8).reshape(5, 7)
    Image.fromarray(gray).save(tmp_path / "gray.png")
    loaded = read_image(tmp_path / "gray.png")
    assert loaded.pixels.shape == (5, 7, 3) and loaded.bit_depth == 8
    np.testing.assert_allclose(loaded.to_float()[:, :, 1], gray / 255.0, atol=1e-7)


def _images(folder: Path, count: int, size: tuple[int, int] = (24, 32)) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    paths = []
    for index in range(count):
        path = folder / f"img{index}.png"
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(path)
        paths.append(path)
    return paths


def test_enhance_cli_writes_good_files_and_reports_unreadable_ones(tmp_path: Path, capsys) -> None:
    step = write_checkpoint(tmp_path / "step-1", identity_mambalowlight())
    inputs = _images(tmp_path / "in", 3)
    (tmp_path / "in" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    code = cli.main(
        ["enhance", str(tmp_path / "in"), "--out", str(out), "--checkpoint", str(step), "--device", "cpu"]
        + ["--batch-size", "2", "--suffix", "_x", "--format", "jpg"]
    )
    assert code == 1
    assert "broken.png" in capsys.readouterr().err
    for path in inputs:
        written = np.asarray(Image.open(out / f"{path.stem}_x.jpg"))
        assert written.shape == (24, 32, 3)
    assert not (out / "broken_x.jpg").exists()


def test_enhance_cli_tiles_and_keeps_names_and_values(tmp_path: Path) -> None:
    step = write_checkpoint(tmp_path / "step-1", identity_mambalowlight())
    (path,) = _images(tmp_path / "in", 1, size=(90, 130))
    out = tmp_path / "out"
    args = ["enhance", str(tmp_path / "in" / "*.png"), "--out", str(out), "--checkpoint", str(step)]
    assert cli.main(args + ["--device", "cpu", "--tile", "64", "--overlap", "16"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / path.name)), np.asarray(Image.open(path)))


def test_enhance_cli_refuses_to_overwrite_inputs(tmp_path: Path) -> None:
    step = write_checkpoint(tmp_path / "step-1", identity_mambalowlight())
    (path,) = _images(tmp_path / "in", 1)
    before = path.read_bytes()
    code = cli.main(["enhance", str(path), "--out", str(tmp_path / "in"), "--checkpoint", str(step)])
    assert code == 2
    assert path.read_bytes() == before
