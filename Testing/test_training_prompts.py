"""The prompts fine-tuning trains on (training/prompts.py) and its loss with empty targets, on a
small 3D phantom made in code; no model weights, no shared data."""
import types

import numpy as np
import pytest
import torch

from SAMFineTuneLib.catalogue import get_spec
from SAMFineTuneLib.dataset import case_samples
from SAMFineTuneLib.windows import window_volume
from SAMFineTuneLib.phantom_lowcontrast import make_case
from SAMFineTuneLib.training import TrainConfig, prepare
from SAMFineTuneLib.training.optimisation import loss_function
from SAMFineTuneLib.tracking import TrackingOptions
from SAMFineTuneLib.training.prompts import KINDS, PromptSampler, end_samples, prompt_boxes, tracking_box

SHAPE_MODEL = types.SimpleNamespace(spec=get_spec("litemedsam"))  # what prepare(encode=False) reads


def phantom_with_ends(slices=6, first=1, last=4):
    """A phantom whose organ is labelled on slices first..last only: slices past both ends exist."""
    image, label = make_case(3, size=64, slices=slices)
    array = np.asarray(label.array).copy()
    array[:first] = 0
    array[last + 1:] = 0
    return image, array


def prepared_case(depth=2):
    image, label = phantom_with_ends()
    samples = case_samples("c", image, label, "axial", "auto") + end_samples("c", image, label, "axial", "auto", depth)
    return prepare(SHAPE_MODEL, samples, None, encode=False), label


def test_end_slices_are_empty_slices_just_past_each_end_windowed_like_the_rest():
    image, label = phantom_with_ends()
    ends = end_samples("c", image, label, "axial", "auto", depth=2)
    assert [s.index for s in ends] == [0, 5]  # one slice on each side lies inside the volume
    windowed = window_volume(np.asarray(image.array), "auto")
    for sample in ends:
        assert not sample.mask.any() and sample.box is None
        np.testing.assert_array_equal(sample.image, windowed[sample.index])
    assert end_samples("c", image, label, "axial", "auto", depth=0) == []


def test_tracking_box_is_the_neighbours_mask_box_grown_by_the_tracking_margin():
    mask = np.zeros((100, 80), bool)
    mask[20:80, 10:50] = True  # x 10..49 (40 wide), y 20..79 (60 high)
    # 5% of 40 = 2 px (the 2 px minimum), 5% of 60 = 3 px, as TrackingOptions grows them
    options = TrackingOptions(margin=0.05, min_margin_px=2)
    assert tracking_box(mask, options) == (8, 17, 51, 82)
    edge = np.zeros((100, 80), bool)
    edge[0:10, 75:80] = True
    assert tracking_box(edge, options) == (73, 0, 79, 11)  # kept inside the slice


def test_candidate_boxes_of_a_3d_case():
    prepared, label = prepared_case()
    boxes = prompt_boxes(prepared)
    indices = [s.index for s in prepared.samples]
    assert indices == [1, 2, 3, 4, 0, 5] and boxes.empty.tolist() == [False] * 4 + [True] * 2
    # past the ends the target is empty (the adapter learns to return nothing there); inside, it is not
    assert not prepared.targets[4:].any() and all(bool(t.any()) for t in prepared.targets[:4])
    geometry = prepared.geometries[0]
    rows, cols = np.nonzero(label.any(axis=0))
    union = geometry.box_to_model((cols.min(), rows.min(), cols.max(), rows.max()))
    assert torch.allclose(boxes.roi, torch.tensor(union, dtype=torch.float32).expand(6, 4))
    # slice 2 tracks from slice 1 (before) and 3 (after); slice 1 only from 2; the end slice 0 from 1
    by_index = {s.index: n for n, s in enumerate(prepared.samples)}
    assert boxes.has_track[by_index[2]].tolist() == [True, True]
    assert boxes.has_track[by_index[1]].tolist() == [False, True]
    assert boxes.has_track[by_index[0]].tolist() == [False, True]
    assert boxes.has_track[by_index[5]].tolist() == [True, False]
    expected = geometry.box_to_model(tracking_box(label[1] > 0, TrackingOptions()))
    assert torch.allclose(boxes.track[by_index[0], 1], torch.tensor(expected, dtype=torch.float32))
    assert torch.allclose(boxes.track[by_index[2], 0], torch.tensor(expected, dtype=torch.float32))


def test_sampler_draws_each_kind_at_its_share_and_only_where_it_exists():
    prepared, _ = prepared_case()
    sampler = PromptSampler(prepared, tracked=0.3, roi=0.3, jitter=0.1, roi_margin=0.2)
    generator = torch.Generator().manual_seed(0)
    filled, empty = torch.arange(4).repeat(500), torch.tensor([4, 5]).repeat(500)
    kinds = sampler.kinds(filled, generator)
    shares = torch.bincount(kinds, minlength=3).float() / len(kinds)
    assert torch.allclose(shares, torch.tensor([0.4, 0.3, 0.3]), atol=0.04), shares
    beyond = torch.bincount(sampler.kinds(empty, generator), minlength=3)
    assert beyond[KINDS.index("box")] == 0 and beyond[1] > 300 and beyond[2] > 300  # no reference box past an end
    boxes = sampler.draw(torch.arange(6).repeat(50), generator)
    limits = sampler.boxes.limits[0]
    assert (boxes >= 0).all() and (boxes[:, 2] <= limits[1]).all() and (boxes[:, 3] <= limits[0]).all()
    assert ((boxes[:, 2] - boxes[:, 0]) >= 1).all() and ((boxes[:, 3] - boxes[:, 1]) >= 1).all()
    # a one-slice case (a 2D image) has nothing to track from: box or ROI only
    image, label = make_case(4, size=64, slices=1)
    flat = prepare(SHAPE_MODEL, case_samples("d", image, np.asarray(label.array), "axial", "auto"), None, encode=False)
    kinds = PromptSampler(flat, 0.3, 0.3, 0.1, 0.2).kinds(torch.zeros(300, dtype=torch.long), generator)
    assert KINDS.index("tracked") not in kinds.tolist()
    only_tracked = PromptSampler(flat, 1.0, 0.0, 0.1, 0.2).kinds(torch.zeros(10, dtype=torch.long), generator)
    assert only_tracked.tolist() == [0] * 10  # no tracked prompt to give: its reference box instead


def test_roi_prompts_are_the_structures_rectangle_grown_outwards_only():
    prepared, _ = prepared_case()
    sampler = PromptSampler(prepared, tracked=0.0, roi=1.0, jitter=0.1, roi_margin=0.2)
    boxes = sampler.draw(torch.arange(6).repeat(100), torch.Generator().manual_seed(1))
    roi = sampler.boxes.roi[0]
    side = torch.stack([roi[2] - roi[0], roi[3] - roi[1]]).repeat(2)
    outward = (boxes - roi) * torch.tensor([-1.0, -1.0, 1.0, 1.0])
    assert (outward >= -1e-4).all() and (outward <= 0.2 * side + 1e-4).all() and outward.max() > 0.1 * side.min()
    # so every ROI prompt holds the whole structure on its slice (the tight box of each labelled slice)
    index = torch.arange(6).repeat(100)
    tight, filled = sampler.boxes.tight[index], ~sampler.boxes.empty[index]
    holds = (boxes[:, :2] <= tight[:, :2] + 1e-4).all(dim=1) & (boxes[:, 2:] >= tight[:, 2:] - 1e-4).all(dim=1)
    assert holds[filled].all() and filled.sum() == 400


def test_loss_is_monais_without_empty_targets_and_skips_their_dice_term():
    from monai.losses import DiceCELoss, DiceFocalLoss

    torch.manual_seed(0)
    logits = torch.randn(4, 1, 32, 32)
    target = (torch.rand(4, 1, 32, 32) > 0.6).float()
    for name, reference in (("dicece", DiceCELoss), ("dicefocal", DiceFocalLoss)):
        loss = loss_function(TrainConfig(dataset="", output="", loss=name))
        expected = reference(sigmoid=True, squared_pred=True, reduction="mean")(logits, target)
        assert float(loss(logits, target)) == pytest.approx(float(expected), rel=1e-6)
    loss = loss_function(TrainConfig(dataset="", output=""))
    target[1] = 0.0
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    p, t = torch.sigmoid(logits).flatten(1), target.flatten(1)  # monai's squared Dice, smoothed by 1e-5
    dice = 1.0 - (2.0 * (p * t).sum(1) + 1e-5) / ((p * p).sum(1) + (t * t).sum(1) + 1e-5)
    assert float(loss(logits, target)) == pytest.approx(float(dice[[0, 2, 3]].mean() + bce), rel=1e-6)
    # an all-empty batch still has a gradient: every pixel should go to background
    logits.requires_grad_(True)
    loss(logits, torch.zeros_like(target)).backward()
    assert logits.grad.abs().sum() > 0 and (logits.grad >= 0).all()


def test_simulated_clicks_for_training_mark_the_error_and_edit_the_box():
    """A missed part draws a positive click in it and the box grows past it; a leak draws a
    negative click; an exact mask draws none; SAM's point tensors are padded with label -1."""
    from SAMFineTuneLib.training.clicks import as_points, clicked_boxes, next_clicks

    target = torch.zeros(3, 1, 256, 256)
    target[:, :, 100:140, 100:180] = 1
    logits = torch.full((3, 1, 256, 256), -10.0)
    logits[0, :, 100:140, 100:140] = 10  # missed the right half
    logits[1, :, 100:160, 100:180] = 10  # leaked 20 rows below
    logits[2] = torch.where(target[2] > 0, 10.0, -10.0)  # exact
    clicks = next_clicks(logits, target, [[], [], []])
    (x, y, positive), = clicks[0]
    assert positive and 140 <= x < 180 and 100 <= y < 140
    (x, y, positive), = clicks[1]
    assert not positive and 140 <= y < 160
    assert clicks[2] == []
    boxes = torch.tensor([[100.0, 100.0, 140.0, 140.0]] * 3)  # model-input pixels (LiteMedSAM: the low-res frame)
    edited = clicked_boxes(logits, boxes, clicks, input_size=256)
    assert edited[0, 2] > x and edited[0, 2] > 160 and torch.equal(edited[0, :2], boxes[0, :2])
    assert torch.equal(edited[2], boxes[2])
    coords, labels = as_points(clicks, 256, "cpu")
    assert labels.tolist() == [[1], [0], [-1]] and coords.shape == (3, 1, 2)
    assert as_points([[], []], 256, "cpu") is None
    with pytest.raises(ValueError, match="click_prompts is a share"):
        from SAMFineTuneLib.training.config import check_config

        check_config(TrainConfig(dataset="d", output="o", click_prompts=1.5))


def test_training_slices_each_case_along_the_axis_it_was_segmented_along(tmp_path):
    from SAMFineTuneLib.dataset import export_dataset, read_dataset
    from SAMFineTuneLib.phantom import make_ct_phantom
    from SAMFineTuneLib.training import TrainConfig
    from SAMFineTuneLib.training.slices import load_slices

    cases = []
    for seed in range(2):
        ct, label = make_ct_phantom((6, 32, 40), seed=seed)
        cases.append((f"c{seed}", ct, label))
    export_dataset(cases, str(tmp_path / "set"), slice_axes={"c1": "coronal"}, label_names={1: "organ"})
    info = read_dataset(str(tmp_path / "set"))
    config = TrainConfig(dataset=str(tmp_path / "set"), output=str(tmp_path / "a"), end_slices=1)
    found = load_slices(info, ["c0", "c1"], config, ends=True)
    assert {s.axis for s in found if s.case == "c0"} == {"axial"}
    assert {s.axis for s in found if s.case == "c1"} == {"coronal"}
    assert {s.image.shape for s in found if s.case == "c1"} == {(6, 40)}  # a coronal slice of a 6x32x40 volume
    asked = TrainConfig(dataset=str(tmp_path / "set"), output=str(tmp_path / "a"), axis="sagittal", end_slices=0)
    assert {s.axis for s in load_slices(info, ["c0", "c1"], asked, ends=False)} == {"sagittal"}
