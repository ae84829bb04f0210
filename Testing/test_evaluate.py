"""Metrics (monai Dice, IoU, HD95, surface Dice) and the evaluation report helpers; no model needed."""
import math
import os

import numpy as np
import pytest

from SAMFineTuneLib.evaluate import format_table, write_csv, write_plot
from SAMFineTuneLib.metrics import binary_metrics, dice_score, summarise


def square(shape, top, left, size):
    mask = np.zeros(shape, bool)
    mask[top:top + size, left:left + size] = True
    return mask


def test_identical_and_shifted_masks():
    ref = square((64, 64), 10, 10, 20)
    same = binary_metrics(ref, ref)
    assert same == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    shifted = binary_metrics(square((64, 64), 13, 10, 20), ref)  # 3 rows down
    assert shifted["dice"] == pytest.approx(2 * 17 * 20 / 800)
    assert shifted["iou"] == pytest.approx(17 * 20 / (23 * 20))
    assert shifted["hd95"] == pytest.approx(3.0)
    assert 0.0 < shifted["nsd"] < 1.0
    assert dice_score(square((64, 64), 13, 10, 20), ref) == pytest.approx(shifted["dice"])


@pytest.mark.filterwarnings("ignore::FutureWarning")  # monai's own, about its arguments
@pytest.mark.parametrize("where", ["inside", "at the border", "apart"])
def test_scores_from_the_block_around_the_masks_are_those_of_the_whole_volume(where):
    """The masks are scored in the block that holds them (monai's one-hot tensors of a whole CT
    take gigabytes); every score must be what the whole arrays give, wherever the masks lie."""
    from SAMFineTuneLib.metrics import _monai_scores, _one_hot

    rng = np.random.default_rng(3)
    ref = np.zeros((30, 40, 50), bool)
    pred = np.zeros_like(ref)
    ref[10:18, 12:25, 20:33] = True
    pred[11:19, 13:24, 19:35] = rng.random((8, 11, 16)) < 0.8  # ragged, with holes
    if where == "at the border":
        ref, pred = np.roll(ref, (-10, 15, 17), axis=(0, 1, 2)), np.roll(pred, (-10, 15, 17), axis=(0, 1, 2))
    elif where == "apart":
        pred = np.roll(pred, 12, axis=0)
    spacing = (2.5, 0.8, 0.7)
    whole = _monai_scores(_one_hot(pred), _one_hot(ref), list(spacing), 2.0)
    assert binary_metrics(pred, ref, spacing) == pytest.approx(whole, abs=1e-6)


def test_spacing_is_in_millimetres_and_3d_works():
    ref = square((64, 64), 10, 10, 20)
    pred = square((64, 64), 13, 10, 20)
    assert binary_metrics(pred, ref, spacing=(2.0, 1.0))["hd95"] == pytest.approx(6.0)
    assert binary_metrics(pred, ref, spacing=(0.5, 1.0), tolerance_mm=2.0)["nsd"] == pytest.approx(1.0)
    volume = np.stack([ref] * 4)
    moved = np.stack([pred] * 4)
    out = binary_metrics(moved, volume, spacing=(5.0, 1.0, 1.0))
    assert out["hd95"] == pytest.approx(3.0) and out["dice"] == pytest.approx(0.85)


def test_empty_mask_conventions_and_summary():
    empty = np.zeros((16, 16), bool)
    full = square((16, 16), 2, 2, 5)
    assert binary_metrics(empty, empty) == {"dice": 1.0, "iou": 1.0, "hd95": 0.0, "nsd": 1.0}
    missed = binary_metrics(empty, full)
    assert missed["dice"] == 0.0 and missed["nsd"] == 0.0 and math.isnan(missed["hd95"])
    summary = summarise([missed, binary_metrics(full, full)])
    assert summary["dice"] == 0.5 and summary["hd95"] == 0.0 and summary["n_hd95"] == 1 and summary["n_dice"] == 2
    with pytest.raises(ValueError, match="shape"):
        binary_metrics(empty, np.zeros((8, 8)))
    with pytest.raises(ValueError, match="spacing"):
        binary_metrics(empty, empty, spacing=(1.0, 1.0, 1.0))


def test_report_table_csv_and_plot(tmp_path):
    row = {"dice": 0.5, "iou": 0.4, "hd95": float("nan"), "nsd": 0.7}
    report = {"dataset": "/x/data", "split": "val",
              "cases": [{"case": "a", "label": 1, "slices": 3, "base": row, "adapted": dict(row, dice=0.9)}],
              "mean": {"base": row, "adapted": dict(row, dice=0.9)}}
    table = format_table(report)
    assert "base dice" in table and "0.9000" in table and "n/a" in table
    write_csv(report, str(tmp_path / "r.csv"))
    lines = (tmp_path / "r.csv").read_text().splitlines()
    assert lines[0].startswith("case,label,slices,base_dice") and lines[1].startswith("a,1,3,0.5,")
    write_plot(report, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"


def test_evaluate_refuses_its_options_and_dataset_before_the_model_loads(tmp_path):
    """The model named cannot load here: each error proves its check came first."""
    from SAMFineTuneLib.evaluate import evaluate

    unloadable = dict(model="medsam", checkpoint=str(tmp_path / "absent.pth"), device="cpu")
    with pytest.raises(ValueError, match="the folder of the CSV file .* does not exist"):
        evaluate(str(tmp_path), csv_path=str(tmp_path / "absent" / "scores.csv"), **unloadable)
    with pytest.raises(ValueError, match="surface Dice tolerance is a distance in mm > 0"):
        evaluate(str(tmp_path), tolerance_mm=-1.0, **unloadable)
    with pytest.raises(ValueError, match="box_margin .* >= 0"):
        evaluate(str(tmp_path), box_margin=-0.5, **unloadable)
    (tmp_path / "card.txt").write_text("not an adapter")
    with pytest.raises(ValueError, match="is a file; give the adapter folder"):
        evaluate(str(tmp_path), adapter=str(tmp_path / "card.txt"), **unloadable)
    with pytest.raises(ValueError, match="is not a dataset"):
        evaluate(str(tmp_path), **unloadable)
    assert os.listdir(tmp_path) == ["card.txt"]
