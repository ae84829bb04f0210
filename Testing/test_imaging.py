"""Windowing, normalisation, slicing and coordinate mapping."""
import numpy as np
import pytest
import torch

from SAMFineTuneLib import imaging, windows
from SAMFineTuneLib.catalogue import WINDOW_PRESETS
from SAMFineTuneLib.model_input import SliceGeometry, to_model_input
from SAMFineTuneLib.models import MODEL_SPECS


@pytest.mark.parametrize("name", sorted(WINDOW_PRESETS))
def test_each_preset_maps_its_width_and_level(name):
    width, level = WINDOW_PRESETS[name]
    ct = np.array([level - width, level - width / 2, level, level + width / 4, level + width], dtype=np.float32)
    lo, hi = windows.window_range(ct.reshape(1, 1, -1), name)
    out = windows.apply_window(ct, lo, hi)
    np.testing.assert_allclose(out, [0.0, 0.0, 0.5, 0.75, 1.0], atol=1e-3)


def test_width_level_numbers_and_bad_windows():
    assert windows.window_range(np.zeros((1, 1, 2)), "400/40") == (-160.0, 240.0)
    with pytest.raises(ValueError, match="unknown window 'lungs'"):
        windows.window_range(np.zeros((1, 1, 2)), "lungs")
    with pytest.raises(ValueError, match="width must be positive"):
        windows.window_range(np.zeros((1, 1, 2)), "0/40")


def test_auto_window_is_soft_tissue_on_ct_and_percentiles_on_mri():
    rng = np.random.default_rng(0)
    ct = rng.integers(-1024, 1500, size=(4, 32, 32)).astype(np.int16)
    assert windows.window_range(ct, "auto") == windows.window_range(ct, "abdomen")
    mri = rng.gamma(2.0, 100.0, size=(4, 64, 64)).astype(np.float32)
    mri[0, 0, 0] = 1e6  # one hot voxel must not squash the contrast
    lo, hi = windows.window_range(mri, "auto")
    assert lo == pytest.approx(np.percentile(mri, 0.5), rel=0.05)
    assert hi == pytest.approx(np.percentile(mri, 99.5), rel=0.05)
    assert hi < 1e5


def test_two_names_for_one_window_are_one_setting():
    ct, mri = np.full((2, 4, 4), -1000.0), np.full((2, 4, 4), 5.0)
    assert windows.window_setting(ct, "auto") == windows.window_setting(ct, "abdomen") == (400.0, 40.0)
    assert windows.window_setting(mri, " 400/40 ") == windows.window_setting(mri, "Abdomen")
    assert windows.window_setting(mri, "auto") == windows.window_setting(mri, "percentile") == "percentile"
    assert windows.window_setting(ct, "auto") != windows.window_setting(ct, "lung")
    with pytest.raises(ValueError, match="unknown window 'soft'"):
        windows.window_setting(mri, "soft")


def mr_with_bright_fat():
    """An MR-like volume (no air at -1000): a textured structure in the middle, and bright fat in
    one corner far from it that the volume's percentiles take in and a window around it must not."""
    rng = np.random.default_rng(1)
    mri = rng.normal(300.0, 20.0, size=(30, 64, 64))
    mri[12:18, 26:38, 26:38] += 150.0  # the structure
    mri[:, :16, :16] = 3000.0  # fat
    return mri


def test_the_roi_window_reads_the_rois_neighbourhood_not_the_volume():
    mri = mr_with_bright_fat()
    box = (26, 26, 12, 37, 37, 17)  # (i0, j0, k0, i1, j1, k1) around the structure
    block = windows.roi_neighbourhood(box, mri.shape)
    # the box grown by half its extent on each side, onto a grid, inside the volume
    for part, lo, hi, size in zip(block, (12, 26, 26), (17, 37, 37), mri.shape):
        grown = int(np.ceil(0.5 * (hi - lo + 1)))
        assert 0 <= part.start <= lo - grown or part.start == 0
        assert min(size, hi + 1 + grown) <= part.stop <= size
    low, high = windows.window_range(mri, "roi", box)
    assert high < 600.0 < windows.window_range(mri, "percentile")[1]  # the fat is not in it
    lo, hi = np.percentile(mri[block], [0.5, 99.5])  # the block's range, held within 1/16 of it per end
    assert lo - (hi - lo) / 16 <= low <= lo and hi <= high <= hi + (hi - lo) / 16
    # a neighbourhood that is the whole volume (a crop around the structure) keeps the volume's window
    crop = mri[6:24, 16:48, 16:48]
    assert windows.window_range(crop, "roi", (10, 10, 5, 21, 21, 12)) == windows.window_range(crop, "percentile")
    # without a box (a volume's slices, training) "roi" is the volume's percentiles
    assert windows.window_range(mri, "roi") == windows.window_range(mri, "percentile")
    assert windows.window_setting(mri, "roi") == "roi" != windows.window_setting(mri, "auto")


def test_a_large_neighbourhood_is_sampled_along_each_axis_and_its_percentiles_hold():
    mri = np.random.default_rng(2).gamma(2.0, 100.0, size=(40, 400, 400)).astype(np.float32)
    box = (150, 150, 10, 249, 249, 29)  # its neighbourhood, a block of the volume, holds about 2.6M voxels
    block = mri[windows.roi_neighbourhood(box, mri.shape)]
    assert not block.flags.c_contiguous and block.size > 1_000_000
    sample = windows._sample(block)
    assert sample.size <= 1_000_000 and np.shares_memory(sample, mri) is False
    np.testing.assert_allclose(np.percentile(sample, [0.5, 99.5]), np.percentile(block, [0.5, 99.5]), rtol=0.02)


def test_a_box_nudged_by_a_voxel_keeps_the_roi_window_and_with_it_the_cached_embeddings():
    mri = mr_with_bright_fat()
    box = np.array((25, 24, 11, 38, 39, 18))
    window = windows.window_range(mri, "roi", tuple(box))
    nudges = [tuple(box + shift * np.eye(6, dtype=int)[n]) for n in range(6) for shift in (-1, 1)]
    kept = sum(windows.window_range(mri, "roi", nudged) == window for nudged in nudges)
    assert kept >= 10, f"only {kept} of 12 nudged boxes kept the window"


def test_auto_follows_the_roi_for_the_base_model_on_mr_only():
    mri, ct = mr_with_bright_fat(), np.full((2, 4, 4), -1000.0)
    assert windows.roi_window(mri, " Auto", base_model=True) == "roi"
    assert windows.roi_window(mri, "auto", base_model=False) == "auto"  # an adapter learned the volume's window
    assert windows.roi_window(ct, "auto", base_model=True) == "auto"  # the abdomen window on CT
    assert windows.roi_window(mri, "percentile", base_model=True) == "percentile"


def test_percentile_of_a_constant_volume_does_not_divide_by_zero():
    lo, hi = windows.window_range(np.full((2, 4, 4), 7.0), "percentile")
    assert hi > lo
    assert np.all(np.isfinite(windows.apply_window(np.full((4, 4), 7.0), lo, hi)))


@pytest.mark.parametrize("name", ["litemedsam", "sam_vit_b", "medsam"])
def test_model_input_normalisation(name):
    spec = MODEL_SPECS[name]
    plane = np.linspace(0, 1, 20 * 30, dtype=np.float32).reshape(20, 30)
    geometry = SliceGeometry((20, 30), (1.0, 1.0), spec.input_size)
    x = to_model_input(plane, geometry, spec)
    assert x.shape == (3, spec.input_size, spec.input_size)
    if spec.normalisation == "unit":
        assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    else:  # SAM: (255 * x - mean) / std; zero padding becomes -mean/std
        assert float(x[0, -1, -1]) == pytest.approx(-123.675 / 58.395, rel=1e-4)
        assert float(x.max()) > 2.0


def test_anisotropic_slice_keeps_its_physical_aspect():
    # A coronal slice of a 5 mm CT: 40 slices x 200 columns at 0.8 mm -> 200 mm tall, 160 mm wide.
    geometry = SliceGeometry((40, 200), (5.0, 0.8), 256)
    assert geometry.resized_shape == (256, 205)
    box = geometry.box_to_model((0, 0, 199, 39))
    assert box == pytest.approx((0.0, 0.0, 205.0, 256.0))


def test_logits_come_back_on_the_slice_pixels():
    geometry = SliceGeometry((40, 200), (5.0, 0.8), 256)
    nh, nw = geometry.resized_shape
    logits = torch.full((256, 256), -1.0)
    logits[: nh // 2, : nw // 4] = 1.0  # top-left quarter-width, half-height of the real image area
    mask = geometry.logits_to_slice(logits) > 0
    assert mask.shape == (40, 200)
    rows, cols = np.nonzero(mask)
    assert rows.max() in (19, 20) and cols.max() in (49, 50)


def test_a_crop_maps_boxes_relative_to_its_origin():
    """A crop of rows 30..69, columns 50..89 of a slice: a box at its corner lands at the input's corner."""
    whole = SliceGeometry((100, 120), (1.0, 1.0), 256)
    crop = SliceGeometry((40, 40), (1.0, 1.0), 256, origin=(30, 50))
    assert crop.resized_shape == (256, 256)
    assert crop.box_to_model((50, 30, 59, 39)) == pytest.approx((0.0, 0.0, 64.0, 64.0))
    # 40 slice pixels fill the crop's input where 120 fill the whole slice's: 3x larger.
    x0, y0, x1, y1 = whole.box_to_model((50, 30, 59, 39))
    assert (x1 - x0) * 3 == pytest.approx(64.0)


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_slices_to_box_inverts_box_to_slices(axis):
    box = (3, 5, 7, 20, 30, 12)
    slices, box2d = imaging.box_to_slices(box, axis)
    assert imaging.slices_to_box(slices[0], slices[-1], box2d, axis) == box


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_slices_and_boxes_per_axis(axis):
    volume = np.arange(4 * 5 * 6).reshape(4, 5, 6)  # k, j, i
    box = (1, 2, 0, 4, 3, 2)  # i0 j0 k0 i1 j1 k1
    slices, (x0, y0, x1, y1) = imaging.box_to_slices(box, axis)
    plane = imaging.extract_slice(volume, axis, slices[0])
    expected = {"axial": (volume[0], range(0, 3), (1, 2, 4, 3)),
                "coronal": (volume[:, 2, :], range(2, 4), (1, 0, 4, 2)),
                "sagittal": (volume[:, :, 1], range(1, 5), (2, 0, 3, 2))}[axis]
    np.testing.assert_array_equal(plane, expected[0])
    assert slices == expected[1] and (x0, y0, x1, y1) == expected[2]
    out = np.zeros_like(volume)
    imaging.place_slice(out, axis, slices[0], plane)
    np.testing.assert_array_equal(imaging.extract_slice(out, axis, slices[0]), plane)


def test_physical_box_on_an_oblique_flipped_volume():
    spacing, origin = (0.7, 0.9, 3.0), (10.0, -20.0, 5.0)
    angle = np.deg2rad(25)
    direction = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, -1.0]])
    to_physical = imaging.index_to_physical_matrix(spacing, direction.ravel(), origin)
    lo, hi = np.array([3, 4, 2]), np.array([9, 12, 6])
    corners = np.array([[i, j, k] for i in (lo[0], hi[0]) for j in (lo[1], hi[1]) for k in (lo[2], hi[2])], float)
    physical = (to_physical @ np.c_[corners, np.ones(8)].T).T[:, :3]
    box, clipped = imaging.physical_box_to_voxels(physical, np.linalg.inv(to_physical), (20, 30, 40))
    assert box == (3, 4, 2, 9, 12, 6) and not clipped
    half_out = physical - (to_physical[:3, :3] @ np.array([6.0, 0, 0]))
    box, clipped = imaging.physical_box_to_voxels(half_out, np.linalg.inv(to_physical), (20, 30, 40))
    assert clipped and box[0] == 0 and box[3] == 3
    with pytest.raises(ValueError, match="does not contain any voxel"):
        imaging.physical_box_to_voxels(physical + 1e4, np.linalg.inv(to_physical), (20, 30, 40))


def test_a_batch_of_logits_maps_like_one_at_a_time():
    geometry = SliceGeometry((40, 70), (1.0, 0.6), 256)
    logits = torch.randn(3, 256, 256)
    batch = geometry.logits_to_slices(logits)
    assert batch.shape == (3, 40, 70)
    for n in range(3):
        np.testing.assert_allclose(batch[n].numpy(), geometry.logits_to_slice(logits[n]), atol=1e-6)
