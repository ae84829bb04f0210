"""Correcting a slice with clicks and carrying a corrected slice on (refinement, Segmenter.propagate).

The fast tests drive the engine with OracleModel, whose answer to each prompt is known, so they
check the bookkeeping: coordinates, which prompts reach the decoder, which slices change. The
slow ones run LiteMedSAM on the synthetic CT.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from oracle_model import OracleModel  # noqa: E402
from SAMFineTuneLib import imaging, model_input  # noqa: E402
from SAMFineTuneLib.phantom import make_ct_phantom  # noqa: E402
from SAMFineTuneLib.refinement import mask_prompt, refine_slice, simulated_click  # noqa: E402
from SAMFineTuneLib.segmenter import Segmenter  # noqa: E402


def dice(a, b):
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    return 2.0 * (a & b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture(scope="module")
def phantom():
    """A bright ball in dark tissue: the structure OracleModel finds is exactly the label."""
    from SAMFineTuneLib.volume_io import Volume

    k, j, i = np.meshgrid(np.arange(14), np.arange(48), np.arange(56), indexing="ij")
    ball = ((k - 7) * 2.0) ** 2 + (j - 22.0) ** 2 + (i - 30.0) ** 2 <= 11.0 ** 2
    ct = np.where(ball, 200, -100).astype(np.int16)
    return Volume(ct, spacing=(1.0, 1.0, 2.0)), Volume(ball.astype(np.uint8), spacing=(1.0, 1.0, 2.0))


def test_a_click_decodes_its_points_on_the_cached_slice_and_lands_where_clicked(phantom):
    """A model that learned clicks (SAM) gets them, with the previous result as the mask prompt."""
    ct, label = phantom
    segmenter = Segmenter(OracleModel(point_prompts=True))
    k = 7
    ys, xs = np.nonzero(label.array[k])
    x, y = int(np.median(xs)), int(np.median(ys))
    first = refine_slice(segmenter, ct, "axial", k, [(x, y, 1)])
    assert first.mask[y, x] and first.mask.shape == label.array[k].shape
    calls = segmenter.encoder_calls
    # The second click starts from the first one's logits and costs no encoding.
    second = refine_slice(segmenter, ct, "axial", k, [(x, y, 1), (x, y, 0)], previous=first)
    assert segmenter.encoder_calls == calls
    assert not second.mask[y, x] and second.mask.sum() < first.mask.sum()
    _, points, box, has_mask, _ = segmenter.model.decode_log[-1]
    assert box is None and has_mask and points[1].tolist() == [[1, 0]]


def test_clicks_map_to_model_pixels_on_every_axis_and_aspect(phantom):
    """A click on pixel (x, y) of an anisotropic slice reaches the model at that pixel's centre."""
    ct, label = phantom
    segmenter = Segmenter(OracleModel(point_prompts=True))
    for axis in ("axial", "coronal", "sagittal"):
        index = label.array.shape[imaging.axis_index(axis)] // 2
        plane = imaging.extract_slice(label.array, axis, index)
        ys, xs = np.nonzero(plane)
        x, y = int(xs[len(xs) // 2]), int(ys[len(ys) // 2])
        refined = refine_slice(segmenter, ct, axis, index, [(x, y, 1)])
        assert refined.mask[y, x], axis
        assert dice(refined.mask & plane.astype(bool), refined.mask) > 0.9, axis


def click_on_a_miss(phantom, missed_columns):
    """The ball's middle slice with its rightmost ``missed_columns`` columns missed, corrected by
    one simulated click with a box-trained model: (segmenter, reference, start, click, refined)."""
    ct, label = phantom
    segmenter = Segmenter(OracleModel())
    reference = label.array[7] > 0
    start = reference.copy()
    start[:, np.nonzero(reference)[1].max() + 1 - missed_columns:] = False
    click = simulated_click(start, reference)
    return segmenter, reference, start, click, refine_slice(segmenter, ct, "axial", 7, [click], start_mask=start)


def test_a_box_trained_model_gets_the_box_the_clicks_edit(phantom):
    """LiteMedSAM's decoder learned boxes only: a positive click grows the box to take in what was
    missed, a negative one moves the nearest edge past it and drops the piece it lies on."""
    segmenter, reference, half, (x, y, positive), fixed = click_on_a_miss(phantom, 12)  # the right half
    prompts = [entry for entry in segmenter.model.decode_log if entry[0] == "prompts"]
    assert positive and prompts and all(points is None and box is not None for _, points, box, _, _ in prompts)
    assert dice(fixed.mask, reference) > 0.94 > dice(half, reference) + 0.2
    assert not (fixed.mask & ~reference).any()


def test_a_box_trained_models_click_changes_the_mask_only_near_the_click(phantom):
    """Within CLICK_REACH times the click's distance from the mask's edge: a click in the middle of
    a small miss does not take in the rest of what the edited box's decode adds."""
    from SAMFineTuneLib.refinement import CLICK_REACH

    _, reference, notched, (x, y, positive), fixed = click_on_a_miss(phantom, 4)  # a thin strip on the right
    added = fixed.mask & ~notched
    ys, xs = np.nonzero(added)
    my, mx = np.nonzero(notched)
    depth = np.hypot(mx - x, my - y).min()  # the click's distance from the mask
    assert positive and added.any() and not (added & ~reference).any()
    missed_y, missed_x = np.nonzero(reference & ~notched)
    # The strip reaches farther from the click than the change may: without the rule it was all added.
    assert np.hypot(xs - x, ys - y).max() <= CLICK_REACH * depth < np.hypot(missed_x - x, missed_y - y).max()
    assert added.sum() < (reference & ~notched).sum()


def test_a_positive_click_the_decode_leaves_out_tries_boxes_around_it_only_away_from_the_mask(phantom):
    """Next to the mask, a click the edited box's decode leaves outside it adds the round piece
    reaching the mask (one decode); farther away, boxes around the click are tried as well."""
    from SAMFineTuneLib.refinement import BOX_FALLBACK_DEPTH, CLICK_BOX_FRACTIONS

    ct, label = phantom
    k = 7
    reference = label.array[k] > 0
    rows, cols = np.nonzero(reference)
    y = int(np.median(rows))
    for gap, far in ((int(BOX_FALLBACK_DEPTH), False), (int(BOX_FALLBACK_DEPTH) + 4, True)):
        segmenter = Segmenter(OracleModel())
        x = cols.max() + gap  # in the dark beside the ball: the oracle finds nothing there
        fixed = refine_slice(segmenter, ct, "axial", k, [(float(x), float(y), True)], start_mask=reference)
        tried = [entry for entry in segmenter.model.decode_log if entry[0] == len(CLICK_BOX_FRACTIONS)]
        assert bool(tried) == far
        # Near: the round piece reaching the mask; far: the boxes' answer, nothing in the dark.
        assert fixed.mask[y, x] != far and (fixed.mask & ~reference).sum() <= np.pi * (1.5 * gap + 1) ** 2


def test_a_box_trained_model_whose_adapter_learned_clicks_gets_them_with_the_edited_box(phantom):
    """An adapter trained with simulated clicks (training.clicks) is asked as it was trained: the
    clicks, the box they edit and the previous result as the mask prompt; its answer is taken
    as decoded (no local patching)."""
    ct, label = phantom
    segmenter = Segmenter(OracleModel())
    segmenter.adapters.clicks = True  # what set_adapter reads from such an adapter's card
    k = 7
    reference = label.array[k] > 0
    half = reference.copy()
    half[:, int(np.median(np.nonzero(reference)[1])):] = False
    click = simulated_click(half, reference)
    fixed = refine_slice(segmenter, ct, "axial", k, [click], start_mask=half)
    _, points, box, has_mask, _ = segmenter.model.decode_log[-1]
    assert points is not None and points[1].tolist() == [[1]] and box is not None and has_mask
    assert dice(fixed.mask, reference) > 0.95


def test_bad_clicks_are_named_before_any_decoding(phantom):
    ct, _ = phantom
    segmenter = Segmenter(OracleModel())
    with pytest.raises(ValueError, match=r"point 1 \(90, 3\) lies outside the 56x48 slice"):
        refine_slice(segmenter, ct, "axial", 3, [(90, 3, 1)])
    with pytest.raises(ValueError, match="give at least one point or a box"):
        refine_slice(segmenter, ct, "axial", 3, [])
    with pytest.raises(ValueError, match="must be 1 \\(positive\\) or 0"):
        refine_slice(segmenter, ct, "axial", 3, [(3, 3, 7)])
    with pytest.raises(ValueError, match="slice 20 is outside the volume's 14 axial slices"):
        refine_slice(segmenter, ct, "axial", 20, [(3, 3, 1)])
    with pytest.raises(ValueError, match=r"the box \[60, 50, 70, 60\] lies outside"):
        refine_slice(segmenter, ct, "axial", 3, [], box=(60, 50, 70, 60))
    assert not segmenter.model.decode_log


def test_the_users_mask_becomes_the_mask_prompt_laid_out_as_the_input():
    geometry = model_input.SliceGeometry((40, 80), (1.0, 1.0), 256)  # resized to 128 x 256, padded below
    mask = np.zeros((40, 80), bool)
    mask[10:20, 40:60] = True
    logits = mask_prompt(mask, geometry)
    assert logits.shape == (1, 1, 256, 256)
    inside = (logits[0, 0] > 0).numpy()
    rows, cols = np.nonzero(inside)
    # Slice rows 10-19 of 40 span input rows 32-63 of 128; columns 40-59 of 80 span 128-191 of 256.
    assert 31 <= rows.min() <= 33 and 62 <= rows.max() <= 64 and 127 <= cols.min() <= 129 and 190 <= cols.max() <= 192
    with pytest.raises(ValueError, match=r"the start mask is \(40, 40\), the slice \(40, 80\)"):
        mask_prompt(np.zeros((40, 40), bool), geometry)


def test_the_simulated_click_goes_to_the_middle_of_the_largest_error():
    reference = np.zeros((30, 30), bool)
    reference[5:25, 5:25] = True
    predicted = reference.copy()
    predicted[5:25, 5:12] = False  # missed: 20 x 7
    predicted[0:3, 0:3] = True  # leaked: 3 x 3
    x, y, positive = simulated_click(predicted, reference)
    assert positive and 7 <= x <= 9 and 13 <= y <= 16
    predicted = reference.copy()
    predicted[5:25, 25:30] = True  # leaked only
    x, y, positive = simulated_click(predicted, reference)
    assert not positive and 26 <= x <= 28
    assert simulated_click(reference, reference) is None


def test_propagation_follows_the_structure_from_a_corrected_slice_and_stops_where_it_ends(phantom):
    ct, label = phantom
    segmenter = Segmenter(OracleModel())
    k = 7
    result = segmenter.propagate(ct, "axial", k, label.array[k])
    present = [i for i in range(label.array.shape[0]) if label.array[i].any()]
    assert k not in result.slices and not result.mask[k].any()  # the corrected slice is the user's
    assert set(result.slices) <= set(present) and len(result.slices) >= len(present) - 3
    others = [i for i in present if i != k]
    assert dice(result.mask[others], label.array[others]) > 0.9


def test_propagation_never_changes_a_locked_slice_nor_crosses_it(phantom):
    ct, label = phantom
    segmenter = Segmenter(OracleModel())
    present = [i for i in range(label.array.shape[0]) if label.array[i].any()]
    k, locked = present[len(present) // 2], present[len(present) // 2 + 2]
    result = segmenter.propagate(ct, "axial", k, label.array[k], locked=[locked], first=present[0] + 1)
    assert result.slices and locked not in result.slices and not result.mask[locked:].any()
    assert min(result.slices) == present[0] + 1 and not result.mask[:present[0] + 1].any()


def test_propagation_ends_with_each_carried_slice_in_its_own_box_when_asked_and_still_keeps_locked_ones(phantom):
    """``TrackingOptions.own_box_px`` (an adapter trained on loose ROIs): each carried slice is
    decoded once more with its own mask's box; the corrected and the locked slices stay untouched."""
    from SAMFineTuneLib.tracking import TrackingOptions

    ct, label = phantom
    present = [i for i in range(label.array.shape[0]) if label.array[i].any()]
    k, locked = present[len(present) // 2], present[len(present) // 2 + 2]
    runs = {}
    for px in (0, 2):
        model = OracleModel()
        result = Segmenter(model, tracking=TrackingOptions(own_box_px=px)).propagate(ct, "axial", k, label.array[k],
                                                                                     locked=[locked])
        runs[px] = result, sum(entry[0] for entry in model.decode_log if isinstance(entry[0], int))
    (plain, plain_decodes), (own, own_decodes) = runs[0], runs[2]
    assert own.slices == plain.slices and locked not in own.slices and not own.mask[[k, locked]].any()
    assert own_decodes - plain_decodes == sum(1 for i in plain.slices if plain.mask[i].any())
    assert dice(own.mask, label.array) >= dice(plain.mask, label.array) > 0.5


def box_inside(box, shape):
    x0, y0, x1, y1 = box
    inside = np.zeros(shape, bool)
    inside[y0:y1 + 1, x0:x1 + 1] = True
    return inside


def test_propagation_fills_the_slices_between_two_corrections_with_boxes_interpolated_between_theirs(phantom):
    """Given the other corrected slices' masks, each slice between two corrections is decoded with
    the box on the straight line between theirs, grown as tracking grows its box; no corrected
    slice is written."""
    from SAMFineTuneLib.propagation import interpolated_boxes
    from SAMFineTuneLib.tracking import TrackingOptions

    ct, label = phantom
    present = [i for i in range(label.array.shape[0]) if label.array[i].any()]
    low, high = present[0], present[-1]
    result = Segmenter(OracleModel()).propagate(ct, "axial", high, label.array[high], locked=[low],
                                                corrections={low: label.array[low]})
    shape = label.array.shape[1:]
    boxes = interpolated_boxes(low, label.array[low] > 0, high, label.array[high] > 0,
                               (0, 0, shape[1] - 1, shape[0] - 1), TrackingOptions())
    assert sorted(boxes) == list(range(low + 1, high))
    for i, box in boxes.items():
        assert np.array_equal(result.mask[i] > 0, (label.array[i] > 0) & box_inside(box, shape)), i
    middle = (low + high) // 2  # the ball's box is no straight line between its ends: not tracked there
    assert 0 < result.mask[middle].sum() < 0.6 * label.array[middle].sum()
    assert sorted(result.slices) == list(range(low + 1, high)) and not result.mask[[low, high]].any()


def test_propagation_tracks_up_to_a_cleared_correction_and_never_past_it(phantom):
    """A correction that holds nothing (the user cleared the slice: the structure ends there) gives
    no box to interpolate to: the gap is tracked into from the other side, and nothing starts from it."""
    ct, label = phantom
    present = [i for i in range(label.array.shape[0]) if label.array[i].any()]
    start, cleared = present[len(present) // 2], present[-3]
    empty = np.zeros_like(label.array[cleared])
    result = Segmenter(OracleModel()).propagate(ct, "axial", start, label.array[start], locked=[cleared],
                                                corrections={cleared: empty, present[0] - 5: label.array[start]})
    between = list(range(start + 1, cleared))
    assert set(between) <= set(result.slices) and cleared not in result.slices
    assert not result.mask[cleared:].any()
    assert dice(result.mask[between], label.array[between]) > 0.95
    assert set(range(present[0], start)) <= set(result.slices)  # a correction outside the slices is left out


def test_bad_propagation_requests_are_named(phantom):
    ct, label = phantom
    segmenter = Segmenter(OracleModel())
    with pytest.raises(ValueError, match="the corrected slice is empty"):
        segmenter.propagate(ct, "axial", 0, np.zeros((48, 56), np.uint8))
    with pytest.raises(ValueError, match=r"the corrected slice is \(48, 48\), the volume's axial slices \(48, 56\)"):
        segmenter.propagate(ct, "axial", 7, np.ones((48, 48), np.uint8))
    with pytest.raises(ValueError, match="between slices 9 and 13 does not fit"):
        segmenter.propagate(ct, "axial", 7, label.array[7], first=9)
    with pytest.raises(ValueError, match=r"the corrected slice is \(48, 48\), the volume's axial slices \(48, 56\)"):
        segmenter.propagate(ct, "axial", 7, label.array[7], locked=[3], corrections={3: np.ones((48, 48), np.uint8)})


def test_propagation_keeps_to_the_roi_it_is_given(phantom):
    ct, label = phantom
    segmenter = Segmenter(OracleModel())
    box = (16, 8, 5, 30, 40, 9)  # i0, j0, k0, i1, j1, k1: slices 5-9, the ball's left half
    result = segmenter.propagate(ct, "axial", 7, label.array[7], box=box)
    assert set(result.slices) == {5, 6, 8, 9}
    inside = np.zeros(label.array.shape, bool)
    inside[5:10, 8:41, 16:31] = True
    assert result.mask.any() and not result.mask[~inside].any()
    assert np.array_equal(result.mask[[5, 6, 8, 9]] > 0, (label.array > 0)[[5, 6, 8, 9]] & inside[[5, 6, 8, 9]])
    with pytest.raises(ValueError, match="between slices 5 and 9 inside the ROI does not fit"):
        segmenter.propagate(ct, "axial", 11, label.array[11], box=box)
    outside = np.zeros_like(label.array[7])
    outside[20:24, 40:44] = 1
    with pytest.raises(ValueError, match=r"the corrected slice is empty \(inside the ROI\)"):
        segmenter.propagate(ct, "axial", 7, outside, box=box)


class HalfOracle(OracleModel):
    """Answers a box wider than ``WIDE`` model pixels (an ROI) with its left half only, as an
    adapter's answer to a loose ROI may leave out what tracking from a corrected slice keeps."""

    WIDE = 160

    def decode(self, embeddings, boxes, multimask=False, decoder=None, window_margin=None):
        logits, score = super().decode(embeddings, boxes, multimask, decoder, window_margin)
        x = torch.arange(logits.shape[-1], dtype=torch.float32)
        wide = (boxes[:, 2] - boxes[:, 0] > self.WIDE)[:, None]
        right = wide & (x[None, :] > ((boxes[:, 0] + boxes[:, 2]) / 2)[:, None])
        return torch.where(right[:, None, None, :], torch.full_like(logits, -20.0), logits), score


def test_propagation_with_an_adapter_trained_on_loose_rois_keeps_what_its_answer_to_the_roi_keeps(phantom):
    """TrackingOptions.fixed_fallback > 0 (such an adapter's card sets it): inside an ROI, the
    carried slices are trimmed to the model's answer to the ROI on each slice, as tracked mode's."""
    from SAMFineTuneLib.tracking import TrackingOptions

    ct, label = phantom
    box = (9, 1, 0, 51, 43, 13)  # the ball grown by about 10 voxels: wide enough for HalfOracle's rule
    carried = {}
    for fallback in (0.0, 0.5):
        segmenter = Segmenter(HalfOracle(), tracking=TrackingOptions(fixed_fallback=fallback))
        carried[fallback] = segmenter.propagate(ct, "axial", 7, label.array[7], box=box).mask > 0
    right = np.zeros(label.array.shape, bool)
    right[:, :, 31:] = True  # right of the ROI's middle column (30), where HalfOracle's answer to it is empty
    assert (carried[0.0] & right).sum() > 100 and not (carried[0.5] & right).any()
    assert (carried[0.5] & ~right).sum() == (carried[0.0] & ~right).sum() > 100
    whole = Segmenter(HalfOracle(), tracking=TrackingOptions(fixed_fallback=0.5))
    assert (whole.propagate(ct, "axial", 7, label.array[7]).mask[:, :, 31:] > 0).sum() > 100  # no ROI, no check


@pytest.mark.slow
def test_litemedsam_clicks_fix_a_missed_part_and_a_leak(litemedsam):
    """Real weights: a positive click in a missed region raises Dice, a negative one in a leak
    lowers the false positives; propagating a corrected slice stays on the organ."""
    ct, label = make_ct_phantom(shape_kji=(12, 80, 80), spacing_xyz=(1.5, 1.5, 4.0), seed=3)
    segmenter = Segmenter(litemedsam)
    k = 6
    reference = label.array[k] > 0
    from scipy import ndimage

    missed = ndimage.binary_erosion(reference, iterations=4)
    click = simulated_click(missed, reference)
    fixed = refine_slice(segmenter, ct, "axial", k, [click], start_mask=missed)
    assert click[2] and dice(fixed.mask, reference) > dice(missed, reference) + 0.03  # measured 0.631 -> 0.679

    leaked = ndimage.binary_dilation(reference, iterations=4)
    click = simulated_click(leaked, reference)
    fixed = refine_slice(segmenter, ct, "axial", k, [click], start_mask=leaked)
    assert not click[2] and (fixed.mask & ~reference).sum() < (leaked & ~reference).sum()

    carried = segmenter.propagate(ct, "axial", k, reference)
    others = [i for i in carried.slices]
    assert others and dice(carried.mask[others], label.array[others]) > 0.85
