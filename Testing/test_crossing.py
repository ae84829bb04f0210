"""The crossed box mode: planes across the ROI along the other two axes give each slice its box."""
import numpy as np
import pytest

from SAMFineTuneLib import crossing, imaging
from SAMFineTuneLib.catalogue import AXES, CROSSING_DEFAULTS
from SAMFineTuneLib.phantom import bounding_box
from SAMFineTuneLib.segmenter import Segmenter

from oracle_model import OracleModel
from test_segmenter import WINDOW, dice, organ_in_a_loose_roi, with_and_without_own_boxes


def ellipsoid(shape=(15, 23, 31), centre=(7, 11, 15), radii=(5, 8, 12)):
    """An axis-aligned ellipsoid centred on the middle plane of its own bounding box along every axis:
    the middle planes through it hold its widest extent on every slice."""
    k, j, i = np.ogrid[:shape[0], :shape[1], :shape[2]]
    return sum(((axis - c) / r) ** 2 for axis, c, r in zip((k, j, i), centre, radii)) <= 1


def planes_of(structure, box, other, fractions=(0.5,)):
    """The structure's own masks on the planes crossing ``box`` along ``other`` (by default the middle
    one, at one-voxel steps)."""
    return {index: imaging.extract_slice(structure, other, index)
            for index in crossing.plane_indices(box, other, fractions, grid=1000)}


@pytest.mark.parametrize("axis", list(AXES))
def test_the_planes_of_a_structure_give_each_of_its_slices_its_own_box(axis):
    """Planes through the structure itself: each slice's box is the structure's own box there, and the
    slices past its ends get none. A swapped row and column, or a plane put on the wrong axis, fails."""
    structure = ellipsoid()
    box = bounding_box(structure.astype(np.uint8))
    crossed = {other: planes_of(structure, box, other) for other in AXES if other != axis}
    slices, roi = imaging.box_to_slices(box, axis)
    boxes = crossing.crossed_boxes(crossed, axis, range(slices[0] - 2, slices[-1] + 3), roi, grow=0)
    own = {int(index): imaging.mask_box(imaging.extract_slice(structure, axis, index))
           for index in imaging.slices_holding(structure, axis)}
    assert boxes == own
    grown = crossing.crossed_boxes(crossed, axis, slices, roi, grow=2)
    middle = slices[len(slices) // 2]
    x0, y0, x1, y1 = own[middle]
    assert grown[middle] == (max(roi[0], x0 - 2), max(roi[1], y0 - 2), min(roi[2], x1 + 2), min(roi[3], y1 + 2))


def test_a_slice_that_planes_of_one_other_axis_alone_reach_gets_no_box():
    structure = ellipsoid()
    box = bounding_box(structure.astype(np.uint8))
    slices, roi = imaging.box_to_slices(box, "axial")
    assert crossing.crossed_boxes({"coronal": planes_of(structure, box, "coronal")}, "axial", slices, roi) == {}
    crossed = {"coronal": planes_of(structure, box, "coronal"), "sagittal": {}}
    assert crossing.crossed_boxes(crossed, "axial", slices, roi) == {}


def test_crossed_mode_decodes_the_structures_slices_with_boxes_near_its_own():
    """A ROI four voxels loose and two slices past each end: the planes (two along each other axis,
    each encoded once) find the organ's slices, so no slice past its ends is decoded. The organ's
    rounded tips reach no plane, so a few of its end slices are left out too."""
    ct, label, roi = organ_in_a_loose_roi()
    model = OracleModel()
    result = Segmenter(model, batch_size=1).segment(ct, roi, window=WINDOW, box_mode="crossed")
    organ_slices = set(np.flatnonzero(label.array.any(axis=(1, 2))))
    assert set(result.slices) <= organ_slices and len(result.slices) >= len(organ_slices) - 4
    assert model.encode_calls == len(result.slices) + 2 * len(CROSSING_DEFAULTS["planes"])
    assert dice(result.mask, label.array) > 0.95
    x0, y0, x1, y1 = model.last_boxes[0].tolist()  # the last slice decoded, an end of the organ
    assert x1 - x0 < 0.8 * (roi[3] - roi[0] + 1) * (256 / 48)


def test_crossed_mode_tracks_a_structure_that_no_plane_crosses():
    """A small organ in a corner of a large ROI lies between the planes; tracking still finds it."""
    ct = np.full((12, 64, 64), 40.0)
    ct[3:9, 4:12, 4:12] = 240.0
    roi = (2, 2, 2, 60, 60, 9)
    planes = [plane for other in ("coronal", "sagittal") for plane in crossing.plane_indices(roi, other)]
    assert not any(4 <= plane <= 11 for plane in planes)
    crossed = Segmenter(OracleModel()).segment(ct, roi, window=WINDOW, box_mode="crossed", spacing=(1, 1, 1))
    tracked = Segmenter(OracleModel()).segment(ct, roi, window=WINDOW, box_mode="tracked", spacing=(1, 1, 1))
    assert crossed.mask.any() and np.array_equal(crossed.mask, tracked.mask)
    assert crossed.stats["box_mode"] == "tracked"  # the result says what ran


def test_the_auto_box_mode_crosses_for_the_base_model():
    """(With an adapter it runs the mode the adapter's card names: test_tracking_choice.py.)"""
    ct, _, roi = organ_in_a_loose_roi()
    results = {mode: Segmenter(OracleModel()).segment(ct, roi, window=WINDOW, box_mode=mode).mask
               for mode in ("crossed", "tracked")}
    assert not np.array_equal(results["crossed"], results["tracked"])
    segmenter = Segmenter(OracleModel())
    auto = segmenter.segment(ct, roi, window=WINDOW)
    assert np.array_equal(auto.mask, results["crossed"]) and auto.stats["box_mode"] == "crossed"


def test_an_adapter_that_ends_tracking_in_each_slices_own_box_ends_crossed_boxes_so_too():
    """``own_box_px`` (an adapter's tracking option): each slice crossed boxes kept is decoded once
    more in its own mask's box; the base model (0) decodes nothing more."""
    from SAMFineTuneLib.tracking import TrackingOptions

    ct, label, roi = organ_in_a_loose_roi()
    results = with_and_without_own_boxes(ct, roi, "crossed", TrackingOptions())
    assert dice(results[2].mask, label.array) > 0.95


def test_a_box_nudged_by_a_few_voxels_crosses_at_the_same_planes():
    """So a re-prompt finds the planes' embeddings in the cache (unless a plane's target crosses into
    the next grid cell: a nudge of a few voxels in a cell of 8 keeps most planes)."""
    box = (40, 60, 10, 100, 130, 50)
    for other in ("coronal", "sagittal"):
        planes = crossing.plane_indices(box, other)
        assert len(planes) == 2
        for nudged in ((42, 62, 10, 98, 128, 50), (41, 59, 10, 101, 131, 50)):
            assert crossing.plane_indices(nudged, other) == planes, (other, nudged)


def test_a_roi_on_one_or_two_slices_is_tracked_without_planes():
    """On a 2D image (one slice) or a two-slice ROI a plane across it is a line or two of pixels."""
    ct = np.full((2, 64, 64), 40.0)
    ct[:, 20:40, 24:44] = 240.0
    for roi in ((18, 16, 0, 47, 43, 0), (18, 16, 0, 47, 43, 1)):
        model = OracleModel()
        crossed = Segmenter(model).segment(ct, roi, window=WINDOW, box_mode="crossed", spacing=(1, 1, 1))
        tracked = Segmenter(OracleModel()).segment(ct, roi, window=WINDOW, box_mode="tracked", spacing=(1, 1, 1))
        assert model.encode_calls == roi[5] + 1 and np.array_equal(crossed.mask, tracked.mask) and crossed.mask.any()


def test_with_an_adapter_the_planes_are_decoded_by_the_base_model():
    """An adapter learns the slices of its own axis and answers the planes across it poorly, so the
    planes are decoded by the base model and the slices by the adapter; the adapter is back in place
    afterwards, also when the user cancels while the planes are decoded."""
    import torch

    from SAMFineTuneLib.progress import Cancelled

    ct, _, roi = organ_in_a_loose_roi()
    model = OracleModel()
    segmenter = Segmenter(model)
    base = model.mask_decoder
    adapted = torch.nn.Identity()
    model.mask_decoder, model.prompt_encoder = adapted, torch.nn.Identity()  # what set_adapter swaps in
    segmenter.adapters.path = "an adapter's folder"
    decode, decoders = model.decode, []

    def recording(*args, **kwargs):
        decoders.append(model.mask_decoder)
        return decode(*args, **kwargs)

    model.decode = recording
    result = segmenter.segment(ct, roi, window=WINDOW, box_mode="crossed")
    first = decoders.index(adapted)
    assert first >= 2 and all(d is base for d in decoders[:first])  # the planes, along both other axes
    assert all(d is adapted for d in decoders[first:]) and len(decoders) - first >= len(result.slices) // 2
    assert model.mask_decoder is adapted and result.mask.any()
    with pytest.raises(Cancelled):
        segmenter.segment(ct, roi, window=WINDOW, box_mode="crossed", cancel=lambda: model.mask_decoder is base)
    assert model.mask_decoder is adapted and isinstance(model.prompt_encoder, torch.nn.Identity)
