"""Corruptions: severity ordering, range, shape, determinism, grey/RGB sizes, errors, grid, metrics."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from toolchain.errors import UnknownNameError, UserError
from toolchain.robustness.corruptions import (
    CORRUPTIONS,
    FAMILIES,
    SEVERITIES,
    corrupt,
    list_corruptions,
)
from toolchain.robustness.corruptions.grid import save_corruption_grid
from toolchain.robustness.corruptions.jpeg import jpeg_round_trip, quant_table
from toolchain.robustness.corruptions.metrics import corruption_errors, summarize

ALL = list_corruptions()
EXPECTED = {
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "saturate", "rain", "sun_glare", "low_light", "shadow",
    "dirty_lens",
}  # fmt: skip
# Corruptions whose output has no randomness: the seed cannot change them.
DETERMINISTIC = {
    "brightness",
    "contrast",
    "defocus_blur",
    "zoom_blur",
    "pixelate",
    "jpeg_compression",
    "saturate",
}


def scene_batch(size: int, channels: int = 3) -> torch.Tensor:
    """Four natural-ish images: smooth colour gradients with a red disc and a blue square."""
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for k in range(4):
        img = torch.stack([0.2 + 0.6 * xs, 0.3 + 0.4 * ys, 0.8 - 0.5 * xs * ys])
        disc = ((xs - 0.3 - 0.1 * k) ** 2 + (ys - 0.5) ** 2).sqrt() < 0.25
        square = ((xs - 0.7).abs() < 0.12) & ((ys - 0.3 + 0.05 * k).abs() < 0.12)
        img = torch.where(disc, torch.tensor([0.9, 0.1, 0.1]).view(3, 1, 1), img)
        img = torch.where(square, torch.tensor([0.1, 0.2, 0.8]).view(3, 1, 1), img)
        images.append(img)
    batch = torch.stack(images)
    return batch if channels == 3 else batch.mean(1, keepdim=True)


def l1(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().mean().item()


def decorrelation(a: torch.Tensor, b: torch.Tensor) -> float:
    """1 - Pearson correlation per image, averaged: blind to global gain/offset changes."""
    a, b = a.flatten(1), b.flatten(1)
    a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
    return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean().item()


@pytest.fixture(scope="module")
def rgb32() -> torch.Tensor:
    return scene_batch(32)


@pytest.fixture(scope="module")
def distances(rgb32: torch.Tensor) -> dict[str, list[float]]:
    return {n: [l1(corrupt(n, rgb32, s), rgb32) for s in range(1, 6)] for n in ALL}


def test_registry_has_every_required_corruption() -> None:
    assert set(ALL) == EXPECTED
    assert len(CORRUPTIONS) == 22
    assert {CORRUPTIONS.get(n).family for n in ALL} == set(FAMILIES)
    assert list_corruptions("driving") == ["dirty_lens", "low_light", "rain", "shadow", "sun_glare"]


# Where strict L1 monotonicity does not hold on 32x32 with the CIFAR-10-C table, and why:
# - glass_blur: the table scrambles with one pass at severities 1-3 and two at 4-5, and only
#   grows a near-identity blur (sigma 0.05 -> 0.4) within each group; the scramble (a random
#   walk several pixels wide, like the reference's sequential swaps) dominates, and the wider
#   blur even pulls a scrambled image slightly back towards the clean one. Checked separately.
# - motion_blur: sev 3 and 4 share sigma=2; the larger radius only adds taps weighing < 1e-3.
# - pixelate: BOX resampling to 30 vs 28 px (and 24 vs 20 px) - the error depends on how the
#   grids align as much as on the factor -> non-decreasing within a tolerance.
TOLERANT = {"motion_blur", "pixelate"}


@pytest.mark.parametrize("name", ALL)
def test_severity_increases_distortion(name: str, rgb32: torch.Tensor, distances: dict) -> None:
    d = distances[name]
    assert d[0] > 1e-3, f"{name} severity 1 leaves the image unchanged: {d}"
    if name == "glass_blur":
        assert min(d[3:]) > 1.2 * max(d[:3]), d  # two scrambling passes clearly beat one
        assert max(d[:3]) < 1.05 * min(d[:3]) and max(d[3:]) < 1.1 * min(d[3:]), d
    elif name in TOLERANT:
        assert all(b >= a - 1e-3 for a, b in itertools.pairwise(d)), d
        assert d[4] > d[0], d
    elif name == "frost":
        # Table lowers the scene weight (1 -> 0.75) and raises the ice weight (0.2 -> 0.45); on
        # bright pixels a lower scene weight cancels part of the added ice, so L1 is not
        # monotone, but the scene is monotonically drowned out: decorrelation increases.
        dc = [decorrelation(corrupt(name, rgb32, s), rgb32) for s in range(1, 6)]
        assert all(b > a for a, b in itertools.pairwise(dc)), dc
    elif name == "saturate":
        # The published table desaturates (sev 1-2) then oversaturates (3-5): two monotone arms.
        assert d[0] < d[1] and d[2] < d[3] < d[4], d
    elif name == "elastic_transform":
        # CIFAR-10-C shrinks the random affine (2.56 -> 0.96 px) while growing the local elastic
        # field, so pixel distance *falls* with severity (by design of the published table).
        # Only assert every severity warps the image and no two severities coincide.
        assert min(d) > 0.01 and len({round(v, 5) for v in d}) == 5, d
    else:
        assert all(b > a for a, b in itertools.pairwise(d)), f"{name}: {d}"


@pytest.mark.parametrize("name", ALL)
def test_range_shape_dtype_and_device(name: str, rgb32: torch.Tensor) -> None:
    out = corrupt(name, rgb32, 5)
    assert out.shape == rgb32.shape and out.dtype == torch.float32 and out.device == rgb32.device
    assert out.min().item() >= 0.0 and out.max().item() <= 1.0
    out64 = corrupt(name, rgb32.double(), 3)
    assert out64.dtype == torch.float64 and tuple(corrupt(name, rgb32[0], 2).shape) == (3, 32, 32)


@pytest.mark.parametrize("name", ALL)
def test_seeded_determinism(name: str, rgb32: torch.Tensor) -> None:
    a, b = corrupt(name, rgb32, 3, seed=7), corrupt(name, rgb32, 3, seed=7)
    assert torch.equal(a, b)
    c = corrupt(name, rgb32, 3, seed=8)
    if name in DETERMINISTIC:
        assert torch.equal(a, c)
    else:
        assert l1(a, c) > 1e-4, f"{name}: seed has no effect"


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize(("channels", "size"), [(1, 28), (3, 64)])
def test_grey_and_rgb_sizes(name: str, channels: int, size: int) -> None:
    x = scene_batch(size, channels)[:2]
    out = corrupt(name, x, 4, seed=1)
    assert out.shape == x.shape
    assert torch.isfinite(out).all() and out.min() >= 0 and out.max() <= 1
    if name == "saturate" and channels == 1:
        assert torch.equal(out, x)  # no saturation in a grey image: documented identity
    else:
        assert l1(out, x) > 1e-3


def test_unknown_name_lists_known_names(rgb32: torch.Tensor) -> None:
    with pytest.raises(UnknownNameError, match="known: brightness, contrast"):
        corrupt("fogg", rgb32, 1)


@pytest.mark.parametrize("severity", [0, 6, -1, 2.5, True, "3"])
def test_bad_severity(severity: object, rgb32: torch.Tensor) -> None:
    with pytest.raises(UserError, match="severity"):
        corrupt("fog", rgb32, severity)  # type: ignore[arg-type]


def test_bad_input_tensor() -> None:
    with pytest.raises(UserError, match="float"):
        corrupt("fog", torch.zeros(1, 3, 32, 32, dtype=torch.uint8), 1)
    with pytest.raises(UserError, match="shape"):
        corrupt("fog", torch.zeros(32, 32), 1)
    with pytest.raises(UserError, match="family"):
        list_corruptions("weathr")


def test_jpeg_matches_pil_round_trip(rgb32: torch.Tensor) -> None:
    import io

    import numpy as np

    assert quant_table(50)[0, 0].item() == 16 and quant_table(80)[0, 0].item() == 6
    ours = jpeg_round_trip(rgb32[:1], 40)[0]
    pixels = (rgb32[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=40)
    pil = torch.from_numpy(np.array(Image.open(buf))).permute(2, 0, 1).float() / 255
    assert l1(ours, pil) < 0.2 * l1(pil, rgb32[0])  # same artefacts, not merely "some blur"


def _pil_jpeg(u8: np.ndarray, quality: int) -> np.ndarray:
    import io

    buf = io.BytesIO()
    Image.fromarray(u8).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf)).astype(np.float64)


@pytest.mark.parametrize("size", [(224, 224), (37, 53)])  # whole 16x16 MCUs, and padded ones
def test_jpeg_matches_pil_on_photographs(size: tuple[int, int]) -> None:
    """The vectorised JPEG against PIL's libjpeg on a real photograph, RGB (4:2:0) and grey.

    libjpeg rounds its intermediate YCbCr and chroma samples to integers and uses an integer
    DCT; ours is float, so single pixels can differ where a coefficient sits on a rounding
    boundary, but on average they agree within about one 8-bit level (grey, with no colour
    conversion or subsampling, within a third of one) and the strength within 1.5 %.
    """
    data = pytest.importorskip("skimage.data")
    h, w = size
    u8 = np.ascontiguousarray(data.astronaut()[: 2 * h : 2, : 2 * w : 2])
    grey = u8.mean(2).round().astype(np.uint8)
    for quality in (7, 25, 80):  # ImageNet-C's mildest and harshest, and CIFAR-10-C's mildest
        pil = _pil_jpeg(u8, quality)
        x = torch.from_numpy(u8).permute(2, 0, 1)[None].float() / 255
        ours = (jpeg_round_trip(x, quality).clamp(0, 1)[0].permute(1, 2, 0).numpy() * 255).round()
        assert np.abs(ours - pil).mean() < 1.2, quality
        assert abs(np.abs(ours - u8).mean() / np.abs(pil - u8).mean() - 1) < 0.015, quality
        pil_grey = _pil_jpeg(grey, quality)
        ours_grey = jpeg_round_trip(torch.from_numpy(grey)[None, None].float() / 255, quality)
        ours_grey = (ours_grey.clamp(0, 1)[0, 0].numpy() * 255).round()
        assert np.abs(ours_grey - pil_grey).mean() < 0.35, quality


def test_grid_png_written(tmp_path) -> None:
    image = scene_batch(32)[0]
    path = save_corruption_grid(image, tmp_path / "g" / "grid.png", names=["fog", "rain"], cell_px=50)
    with Image.open(path) as im:
        assert im.size == (6 * 50, 2 * 50)
    grey = save_corruption_grid(image[:1], tmp_path / "grey.png", names=["snow"], severities=(1, 5))
    with Image.open(grey) as im:
        assert im.size == (3 * 96, 96)
    with pytest.raises(UserError):
        save_corruption_grid(torch.zeros(2, 3, 32, 32), tmp_path / "bad.png")


def test_metrics_hand_computed() -> None:
    model = {"fog": {1: 0.8, 2: 0.6}, "snow": {"1": 0.9, "2": 0.7}}
    dense = {"fog": {1: 0.9, 2: 0.7}, "snow": {"1": 0.9, "2": 0.8}}
    out = summarize(model, dense, model_clean=0.95, dense_clean=0.95)
    # fog: E_m = 0.2 + 0.4 = 0.6, E_d = 0.1 + 0.3 = 0.4 -> CE 1.5;
    #      relative: (0.15 + 0.35) / (0.05 + 0.25) = 0.5 / 0.3
    # snow: E_m = 0.4, E_d = 0.3 -> CE 4/3; relative: (0.05 + 0.25) / (0.05 + 0.15) = 1.5
    assert out["per_corruption"]["fog"]["ce"] == pytest.approx(1.5)
    assert out["per_corruption"]["fog"]["relative_ce"] == pytest.approx(5 / 3)
    assert out["per_corruption"]["snow"]["ce"] == pytest.approx(4 / 3)
    assert out["per_corruption"]["snow"]["relative_ce"] == pytest.approx(1.5)
    assert out["mce"] == pytest.approx((1.5 + 4 / 3) / 2)
    assert out["relative_mce"] == pytest.approx((5 / 3 + 1.5) / 2)
    assert out["mean_accuracy"] == pytest.approx(0.75)
    assert out["per_corruption"]["fog"]["mean_accuracy"] == pytest.approx(0.7)


def test_metrics_division_by_zero_and_mismatch() -> None:
    perfect = {"fog": {1: 1.0}}
    assert corruption_errors(perfect, perfect, 1.0, 1.0)["fog"] == {
        "ce": 1.0, "relative_ce": None, "floored": False, "mean_accuracy": 1.0,
    }  # fmt: skip
    worse = corruption_errors({"fog": {1: 0.5}}, perfect, 1.0, 1.0)["fog"]
    # The baseline does not degrade, the model loses 50 points: counted against the floor.
    assert worse["ce"] == math.inf and worse["relative_ce"] == pytest.approx(0.5 / 0.01)
    # A corruption that does not degrade the baseline leaves relative mCE to the others.
    model = {"fog": {1: 0.6}, "brightness": {1: 0.9}}
    dense = {"fog": {1: 0.7}, "brightness": {1: 0.95}}
    out = summarize(model, dense, model_clean=0.9, dense_clean=0.9)
    assert out["relative_excluded"] == ["brightness"]
    assert out["relative_mce"] == pytest.approx((0.4 - 0.1) / (0.3 - 0.1))
    with pytest.raises(UserError, match="different corruptions"):
        summarize({"fog": {1: 0.5}}, {"snow": {1: 0.5}}, 0.9, 0.9)
    with pytest.raises(UserError, match="not in"):
        summarize({"fog": {1: 1.5}}, {"fog": {1: 0.5}}, 0.9, 0.9)


def test_relative_mce_counts_a_corruption_only_the_compared_model_degrades_on() -> None:
    # Brightness does not degrade the dense model; the pruned one loses 30 points on it.
    dense = {"fog": {1: 0.7, 2: 0.5}, "brightness": {1: 0.9, 2: 0.9}}
    model = {"fog": {1: 0.7, 2: 0.5}, "brightness": {1: 0.6, 2: 0.6}}
    out = summarize(model, dense, model_clean=0.9, dense_clean=0.9)
    # fog: (0.2 + 0.4) / (0.2 + 0.4) = 1; brightness: (0.3 + 0.3) / floor (0.01 x 2 severities) = 30.
    assert out["per_corruption"]["brightness"]["relative_ce"] == pytest.approx(30.0)
    assert out["relative_mce"] == pytest.approx((1.0 + 30.0) / 2)
    assert out["relative_floored"] == ["brightness"] and out["relative_excluded"] == []


def test_relative_mce_is_never_negative_and_bounded_near_a_zero_denominator() -> None:
    dense = {"fog": {1: 0.7}, "snow": {1: 0.8999}}  # snow: the dense model loses 0.01 points
    # fog: the model does better corrupted than clean (sampling noise): no degradation, not a gain.
    model = {"fog": {1: 0.85}, "snow": {1: 0.6}}
    out = summarize(model, dense, model_clean=0.8, dense_clean=0.9)
    assert out["per_corruption"]["fog"]["relative_ce"] == 0.0  # was (0.15 - 0.2) / 0.2 = -0.25
    assert out["per_corruption"]["snow"]["relative_ce"] == pytest.approx(0.2 / 0.01)  # was 0.2 / 1e-4 = 2000
    assert out["relative_floored"] == ["snow"]
    g = torch.Generator().manual_seed(0)
    for _ in range(200):  # any accuracies: every relative CE in [0, 100]
        a = torch.rand(7, generator=g).tolist()
        rel = corruption_errors({"c": {1: a[0], 2: a[1]}}, {"c": {1: a[2], 2: a[3]}}, a[4], a[5])["c"]
        assert rel["relative_ce"] is None or 0.0 <= rel["relative_ce"] <= 100.0


@pytest.mark.parametrize("name", CORRUPTIONS.names())
def test_imagenet_sized_rgb_works(name: str) -> None:
    """224x224 uses the ImageNet-C table: every corruption runs, changes the image, keeps the contract."""
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    for severity in (1, 5):
        out = corrupt(name, x, severity, seed=1)
        assert out.shape == x.shape and out.dtype == x.dtype
        assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
        assert not torch.equal(out, x)


# --------------------------------------------------------------------------- against the reference

REFERENCE = "imagecorruptions-imaug"
try:
    import cv2
    import skimage.data
    from imagecorruptions import corrupt as reference_corrupt
except ImportError as err:  # part of the [dev] extra; a bare install skips with the reason
    reference_corrupt = None
    _MISSING = f"{REFERENCE} (the [dev] extra) not importable: {err}"

# Mean |corrupted - clean| ours / reference at 224x224, per severity, must lie in 1 +- TOL.
# Most corruptions reproduce the reference's algorithm and match within a few percent (8-bit
# rounding and random draws); the wider tolerances are the documented, measured deviations
# (README, Corruptions): frost uses a procedural texture instead of the reference's six
# photographs, fog's plasma cloud varies a lot between draws, glass blur samples the swap
# process's displacement instead of running it, and motion blur and snow draw their random
# angle per image differently, and elastic_transform's random field (on three images the draws
# alone move the strength by ~5 %; on the benchmark's 16 they agree within 1 %).
STRENGTH_TOL = {"frost": 0.35, "fog": 0.25, "glass_blur": 0.15, "snow": 0.12, "motion_blur": 0.08,
                "elastic_transform": 0.08, "impulse_noise": 0.06}  # fmt: skip
SEEDED_BY_KEYWORD = {"glass_blur", "impulse_noise"}


@pytest.fixture(scope="module")
def photos224() -> tuple[torch.Tensor, np.ndarray]:
    """Three 224x224 crops of real photographs: ours as floats, the reference's as uint8 HWC."""
    images = [skimage.data.astronaut()[:448:2, 32:480:2], skimage.data.coffee()[64:288, 100:324],
              skimage.data.chelsea()[40:264, 120:344]]  # fmt: skip
    u8 = np.stack(images)
    return torch.from_numpy(u8).permute(0, 3, 1, 2).float() / 255, u8


@pytest.mark.skipif(reference_corrupt is None, reason=_MISSING if reference_corrupt is None else "")
@pytest.mark.parametrize("name", [n for n in ALL if n not in {"rain", "sun_glare", "low_light", "shadow",
                                                              "dirty_lens"}])  # fmt: skip
def test_strength_matches_reference_at_224(name: str, photos224: tuple[torch.Tensor, np.ndarray]) -> None:
    x, u8 = photos224
    cv2.setNumThreads(1)
    tol = STRENGTH_TOL.get(name, 0.04)
    ratios = []
    for severity in SEVERITIES:
        ours = np.floor(corrupt(name, x, severity, seed=severity).permute(0, 2, 3, 1).numpy() * 255)
        ref = []
        for i, image in enumerate(u8):
            np.random.seed(10 * severity + i)
            kwargs = {"seed": 10 * severity + i} if name in SEEDED_BY_KEYWORD else {}
            ref.append(reference_corrupt(image, severity=severity, corruption_name=name, **kwargs))
        ratios.append(np.abs(ours - u8).mean() / np.abs(np.stack(ref).astype(np.float64) - u8).mean())
    assert all(abs(r - 1) <= tol for r in ratios), f"{name}: ours / reference = {np.round(ratios, 3)}"


# --------------------------------------------------------------------------- fast paths, exactly


def test_poisson_sampler_is_poisson() -> None:
    """The alias sampler reproduces Poisson(lam): mean, variance, P(0) and the whole pmf."""
    from toolchain.robustness.corruptions.ops import poisson_levels

    levels = torch.tensor([0, 3, 51, 128, 255], dtype=torch.float32) / 255
    x = levels.repeat_interleave(40_000)
    counts = poisson_levels(x, 60.0, torch.Generator().manual_seed(0)).view(5, -1)
    lam = (levels * 60).double()
    mean, var = counts.double().mean(1), counts.double().var(1)
    assert torch.equal(counts[0], torch.zeros_like(counts[0]))  # black stays black
    assert torch.allclose(mean[1:], lam[1:], rtol=0.02) and torch.allclose(var[1:], lam[1:], rtol=0.04)
    p0 = (counts[1] == 0).double().mean()
    assert abs(p0 - math.exp(-lam[1])) < 0.01  # exp(-0.706) = 0.49
    # The whole distribution at lam = 12 (level 51): total variation from the pmf below 0.02
    # (40k draws give ~0.01 by chance; a wrongly built alias table moves whole outcomes).
    c = torch.arange(60, dtype=torch.float64)
    pmf = torch.exp(c * math.log(lam[2]) - lam[2] - torch.lgamma(c + 1))
    freq = torch.bincount(counts[2].long(), minlength=60)[:60].double() / counts.shape[1]
    assert 0.5 * (freq - pmf).abs().sum() < 0.02


def test_pixelate_block_means_equal_the_box_taps() -> None:
    """At integer factors pixelate takes k x k block means: the same pixels as the general BOX path."""
    from toolchain.robustness.corruptions.filters import _pixelate_box, pixelate

    x = torch.rand(2, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    for factor in (0.5, 0.25):  # 24x32 and 12x16: integer factors 2 and 4
        sh, sw = int(48 * factor), int(64 * factor)
        assert torch.allclose(pixelate(x, factor), _pixelate_box(x, sh, sw), atol=1e-6)
    blocks = pixelate(x, 0.25).view(2, 3, 12, 4, 16, 4)
    assert torch.equal(blocks, blocks[:, :, :, :1, :, :1].expand_as(blocks))  # constant 4x4 blocks


def test_fancy_upsampling_equals_half_pixel_bilinear() -> None:
    from toolchain.robustness.corruptions.jpeg import _fancy_upsample

    c = torch.rand(2, 2, 9, 13, generator=torch.Generator().manual_seed(0))
    expected = torch.nn.functional.interpolate(c, scale_factor=2, mode="bilinear", align_corners=False)
    assert torch.allclose(_fancy_upsample(c) / 16, expected, atol=1e-6)  # it returns 16x the values


@pytest.mark.parametrize(
    ("name", "size"), [("zoom_blur", 96), ("jpeg_compression", 96), ("jpeg_compression", 88)]
)
def test_chunked_batch_equals_its_images_in_one_call(
    name: str, size: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch bigger than one chunk is processed in pieces: the same pixels as one image at a time.

    JPEG writes its chunks straight into the output (88 px: padded MCUs, through a bigger buffer).
    """
    corruption = CORRUPTIONS.get(name)
    monkeypatch.setattr(corruption, "chunk_bytes", 2 * 3 * size * size * 4)  # two images per chunk
    x = torch.rand(5, 3, size, size, generator=torch.Generator().manual_seed(0))
    out = corrupt(name, x, 3)  # deterministic, so chunks must equal image-by-image calls
    single = torch.cat([corrupt(name, x[i : i + 1], 3) for i in range(5)])
    assert torch.allclose(out, single, atol=1e-6) and l1(out, x) > 0.01
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0


@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize(
    ("mode", "scipy_mode"), [("replicate", "nearest"), ("symmetric", "reflect"), ("reflect101", "mirror")]
)
def test_gaussian_blur_matches_scipy(
    compiled: bool, mode: str, scipy_mode: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both paths of the separable blur (compiled kernel split over two threads, or an FFT beyond
    200 taps; torch shift-add or filter matrices) equal ``scipy.ndimage.gaussian_filter`` for each
    border mode, also where the kernel's radius exceeds the image (3 rows, sigma 2; 40 rows,
    sigma 70) and with a different sigma per axis."""
    ndimage = pytest.importorskip("scipy.ndimage")
    from toolchain.robustness.corruptions import filters, kernels

    if compiled and not kernels.AVAILABLE:
        pytest.skip("numba is not installed: the compiled separable kernel is not used")
    monkeypatch.setattr(kernels, "AVAILABLE", compiled)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    gen = torch.Generator().manual_seed(0)
    cases = [((2, 3, 30, 41), (1.3, 0.8)), ((1, 2, 3, 17), (2.0, 2.0)), ((4, 9, 12), (0.0, 1.5))]
    cases += [((1, 2, 40, 90), (70.0, 2.0)), ((1, 1, 20, 300), (3.0, 40.0))]  # > 200 taps: by FFT
    for shape, sigma in cases:
        x = torch.rand(shape, generator=gen)
        ours = filters.gaussian_blur(x, sigma, truncate=3.0, mode=mode)
        expected = np.stack(
            [
                ndimage.gaussian_filter(p.double().numpy(), sigma, truncate=3.0, mode=scipy_mode)
                for p in x.reshape(-1, *shape[-2:])
            ]
        ).reshape(shape)
        assert ours.shape == x.shape
        assert np.abs(ours.numpy() - expected).max() < 1e-5, (shape, sigma)


def test_warp_kernel_equals_grid_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled reflection warp (split over two threads) gives ``F.grid_sample``'s numbers,
    also for shifts that reflect several times (up to 3 image sizes) and land on edges."""
    from toolchain.robustness.corruptions import kernels, ops

    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed: the compiled warp kernel is not used")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 2, 17, 23, generator=gen)
    for reach in (1.5, 70.0):
        field = (torch.rand(3, 2, 17, 23, generator=gen) - 0.5) * 2 * reach
        field[0, :, :4] = field[0, :, :4].round()  # whole-pixel shifts: exactly on pixels and edges
        ours = ops.warp_by(x, field)
        with monkeypatch.context() as m:
            m.setattr(kernels, "AVAILABLE", False)
            expected = ops.warp_by(x, field)
        assert torch.allclose(ours, expected, atol=2e-5), float((ours - expected).abs().max())
        assert l1(ours, x) > 0.01


def test_poisson_kernel_draws_the_same_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled alias sampler (split over two threads) turns the same uniform draws into the
    same Poisson counts as the torch ops, values outside [0, 1] included."""
    from toolchain.robustness.corruptions import kernels, ops

    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed: the compiled Poisson sampler is not used")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.rand(3, 3, 21, 17, generator=torch.Generator().manual_seed(0)) * 1.2 - 0.1
    for photons in (3.0, 60.0, 500.0):
        ours = ops.poisson_levels(x, photons, torch.Generator().manual_seed(5))
        with monkeypatch.context() as m:
            m.setattr(kernels, "AVAILABLE", False)
            expected = ops.poisson_levels(x, photons, torch.Generator().manual_seed(5))
        assert torch.equal(ours, expected) and float(ours.std()) > 0, photons


def test_motion_blur_kernel_equals_padded_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled shifted sum (split over two threads) gives the padded-slice path's numbers,
    for every direction and for taps that reach past the image (clamped to its edge)."""
    from toolchain.robustness.corruptions import filters, kernels

    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed: the compiled motion-blur kernel is not used")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    x = torch.rand(5, 2, 13, 19, generator=torch.Generator().manual_seed(0))
    angles = torch.tensor([0.0, 37.0, 90.0, 200.0, -75.0])
    for radius, sigma in ((3, 2.0), (25, 12.0)):  # 25 px reaches past every edge
        ours = filters.motion_blur(x, radius, sigma, angles)
        with monkeypatch.context() as m:
            m.setattr(kernels, "AVAILABLE", False)
            ops = filters.motion_blur(x, radius, sigma, angles)
        assert torch.allclose(ours, ops, atol=1e-6) and l1(ours, x) > 0.01


@pytest.mark.parametrize(("size", "threads"), [((48, 64), 1), ((37, 53), 2), ((64, 40), 2)])
def test_jpeg_kernel_equals_torch_ops(
    size: tuple[int, int], threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled JPEG (one MCU row at a time, images split over threads, partial MCUs padded on
    the fly) gives the torch ops' pixels, except where the float rounding order moves a value
    across an 8-bit rounding boundary: one level, on a tiny fraction of the samples."""
    from toolchain.robustness.corruptions import kernels

    if not kernels.AVAILABLE:
        pytest.skip("numba is not installed: the compiled JPEG kernel is not used")
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    h, w = size
    x = torch.nn.functional.avg_pool2d(
        torch.rand(3, 3, h + 2, w + 2, generator=torch.Generator().manual_seed(1)), 3, 1
    )
    for quality in (7, 50, 90):
        ours = jpeg_round_trip(x, quality)
        into = torch.empty(3, h, w, 3).permute(0, 3, 1, 2)  # a non-contiguous out= goes via a copy
        assert jpeg_round_trip(x, quality, out=into) is into and torch.equal(into, ours)
        with monkeypatch.context() as m:
            m.setattr(kernels, "AVAILABLE", False)
            ops = jpeg_round_trip(x, quality).clamp(0, 1)
        diff = (ours - ops).abs()
        assert float(diff.max()) <= 1 / 255 + 1e-6 and float((diff > 1e-6).float().mean()) < 1e-3, quality
        assert l1(ours, x) > 0.002  # and it did compress


@pytest.mark.parametrize(("compiled", "threads"), [(True, 1), (True, 2), (False, 1)])
def test_zoom_blur_equals_one_resampling_per_factor(
    compiled: bool, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The compiled kernel (split over threads) and the grouped, plane-by-plane torch path both
    give the mean of plain per-factor bilinear zooms."""
    from toolchain.robustness.corruptions import filters, kernels
    from toolchain.robustness.corruptions.filters import _zoom_rows

    if compiled and not kernels.AVAILABLE:
        pytest.skip("numba is not installed: the compiled zoom kernel is not used")
    monkeypatch.setattr(kernels, "AVAILABLE", compiled)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)

    x = torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(0))
    zooms = [1 + 0.03 * k for k in range(11)]  # two groups of factors, one of them partial
    acc = x.clone()
    for z in zooms:
        r0, r1, fr = _zoom_rows(40, round(z, 6), x.device)
        c0, c1, fc = _zoom_rows(56, round(z, 6), x.device)
        rows = torch.lerp(x[..., r0, :], x[..., r1, :], fr.view(-1, 1))
        acc += torch.lerp(rows[..., c0], rows[..., c1], fc)
    assert torch.allclose(filters.zoom_blur(x, zooms), acc / (len(zooms) + 1), atol=1e-6)


def test_fft_sizes_are_smooth_and_prefer_multiples_of_16() -> None:
    from toolchain.robustness.corruptions.filters import _fast_size, _is_smooth

    for n in range(1, 600):
        m = _fast_size(n)
        assert m >= n and _is_smooth(m)
    assert _fast_size(242) == 256  # not 243 = 3^5: odd real FFTs run at half the speed
    assert _fast_size(240) == 240 and _fast_size(7) == 8
