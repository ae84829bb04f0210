"""What an adapter changed, shown in the scene: its model card's scores per validation case, and
one validation case segmented with and without it beside the reference.

The comparison starts, as a user does, from one ROI a few voxels looser than the reference
structure, and runs the panel's segmentation twice in the background worker: once with the base
model ("base") and once with the adapter ("adapted"), into one segmentation that also holds the
case's reference label ("reference").
"""

import numpy as np
import slicer

from . import geometry, segments, storage
from .library import ensureLibraryImportable
from .options import VALIDATION_ROI_MARGIN, checkOptions
from .scene import removeNodes

ensureLibraryImportable()
#: In-plane margin, in voxels, of the ROI around the reference (one slice along the slicing axis):
#: the one adapters are judged from.
ROI_MARGIN = VALIDATION_ROI_MARGIN
SCORE_COLUMNS = ("case", "base Dice", "adapted Dice")


def scoresTable(scene, card, name="SAMFineTune adapter scores"):
    """A table node: one row per validation case of the model card, base and adapted Dice."""
    import vtk

    rows = (card.get("scores") or {}).get("per_case") or []
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
    columns = [vtk.vtkStringArray()] + [vtk.vtkDoubleArray() for _ in SCORE_COLUMNS[1:]]
    for column, title in zip(columns, SCORE_COLUMNS):
        column.SetName(title)
        table.AddColumn(column)
    for row in rows:
        index = table.AddEmptyRow()
        table.SetCellText(index, 0, str(row["case"]))
        for column, run in ((1, "base"), (2, "adapted")):
            table.GetTable().SetValue(index, column, float(row[run]["dice"]))
    table.Modified()
    return table


def trackingSummary(card):
    """How the adapter segments from one ROI (the tracking options training chose
    for it on the validation cases, ``inference.tracking``); empty when the card chose none."""
    choice = (card or {}).get("tracking_choice") or {}
    chosen = ((card or {}).get("inference") or {}).get("tracking") or {}
    if "min_margin_px" not in chosen:
        return ""
    seed = ("predicted IoU x mask area" if chosen.get("seed_area_weight", 0) > 0 else "predicted IoU")
    dice = (choice.get("dice") or {}).get(str(chosen["min_margin_px"]))
    measured = ("" if dice is None else " From one ROI it scored 3D Dice %.3f on %d validation structures."
                % (dice, choice.get("structures", 0)))
    fallback = chosen.get("fixed_fallback", 0)
    fallsBack = (", and takes the ROI on every slice where tracking disagrees with it (3D Dice below %.2f)" % fallback
                 if fallback > 0 else "")
    ownBox = chosen.get("own_box_px", 0)
    redecodes = (" Each slice it keeps is decoded again with its own box grown by %d px." % ownBox if ownBox > 0
                 else "")
    smoothMm = chosen.get("smooth_mm", 0)
    smooths = " Its result is smoothed in 3D by %g mm." % smoothMm if smoothMm > 0 else ""
    return "It tracks with a %d px margin and seeds by %s%s.%s%s%s%s%s" % (
        chosen["min_margin_px"], seed, fallsBack, redecodes, smooths, measured, epochChoice(card), boxModeChoice(card))


def epochChoice(card):
    """Why the adapter holds another epoch than the one the validation Dice with reference boxes
    chose (``training.epoch_choice``), with both epochs' 3D Dice from one ROI; empty otherwise."""
    record = (card or {}).get("epoch_choice") or {}
    if not record or record["kept"] == record["by_validation_dice"]:
        return ""
    tracked = record["tracked_dice"]
    return (" Epoch %d is kept, not epoch %d (best Dice with reference boxes): from one ROI it scored %.3f"
            " against %.3f." % (record["kept"], record["by_validation_dice"], tracked[str(record["kept"])],
                                tracked[str(record["by_validation_dice"])]))


def boxModeChoice(card):
    """Which box mode "auto" runs with the adapter (``training.box_mode_choice``), with the 3D Dice
    of both from one ROI on the validation cases; empty where its card chose none."""
    choice = (card or {}).get("tracking_choice") or {}
    if "dice_crossed" not in choice:
        return ""
    mode = card["inference"]["box_mode"]
    other = "tracked" if mode == "crossed" else "crossed"
    return " Box mode auto runs %s boxes with it (3D Dice %.3f from one ROI, %s %.3f)." % (
        mode, choice["dice_" + mode], other, choice["dice_" + other])


def roiBoxAroundLabel(label, axis, margin=ROI_MARGIN):
    """Inclusive IJK box of a KJI label grown by ``margin`` voxels in-plane and one slice along ``axis``."""
    k, j, i = np.nonzero(label)
    if k.size == 0:
        raise ValueError("The reference label of this case is empty: nothing to compare.")
    grow = np.array([margin, margin, margin])
    grow[{"axial": 2, "coronal": 1, "sagittal": 0}[axis]] = 1
    low = np.maximum(np.array([i.min(), j.min(), k.min()]) - grow, 0)
    high = np.minimum(np.array([i.max(), j.max(), k.max()]) + grow, np.array(label.shape[::-1]) - 1)
    return tuple(int(v) for v in np.r_[low, high])


def loadCase(dataset, caseId):
    """(volume node, reference label as a KJI array) of one case of an exported dataset."""
    from SAMFineTuneLib.dataset import read_dataset

    entry = read_dataset(dataset).case(caseId)
    volume = storage.loadVolume(entry.image, name=caseId)
    labelNode = storage.loadVolume(entry.label, name=caseId + " reference")
    try:
        label = np.asarray(slicer.util.arrayFromVolume(labelNode)) > 0
    finally:
        removeNodes(labelNode)
    return volume, label


def compareOnCase(logic, dataset, caseId, adapter, axis="axial", onFinished=None, **engineOptions):
    """Load the case, add its reference, and start the base and adapted segmentations from one loose
    ROI (non-blocking, in the worker). Returns (segmentation node, [base task, adapted task])."""
    checkOptions(dict(engineOptions, adapter=adapter, axis=axis))  # both runs can start: checked first
    volume, label = loadCase(dataset, caseId)
    scene = volume.GetScene()
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", caseId + " ROI")
    box = roiBoxAroundLabel(label, geometry.engineAxis(volume, axis))
    geometry.placeRoiAroundBox(roi, volume, box)
    node = logic.createSegmentation(volume, caseId + " comparison")
    reference = segments.ensureSegment(node, segmentName="reference", color=[0.2, 0.8, 0.2])
    segments.writeMaskToSegment(label, volume, node, reference, box)  # the box holds the whole label
    tasks = []
    for name, used in (("base", None), ("adapted", adapter)):
        tasks += logic.segmentROIs(volume, [roi], node, segmentNames=[name], waitForCompletion=False,
                                   onFinished=onFinished, axis=axis, **dict(engineOptions, adapter=used))
    return node, tasks


def diceAgainstReference(task, referenceName="reference"):
    """Dice of a finished comparison task's segment against the case's reference segment, both read
    inside the ROI's box, which holds the reference and every voxel the task wrote."""
    from SAMFineTuneLib.metrics import dice_score

    node = task.segmentationNode
    reference = node.GetSegmentation().GetSegmentIdBySegmentName(referenceName)
    extent = task.roiBox.extent()
    return dice_score(segments.segmentBlock(node, task.segmentId, task.volumeNode, extent),
                      segments.segmentBlock(node, reference, task.volumeNode, extent))
