"""Fine-tuning from the scene: cases from segmentations, the live loss/Dice table and plot.

- ``findCases`` collects (volume, segmentation, segment) triples: every segmentation in the
  scene that has a source volume and a non-empty segment with the structure's name;
- ``caseFromNodes`` turns one into the engine's ``(case_id, Volume, label Volume)`` with the
  volume's geometry (LPS, parent transforms included), for ``dataset.export_dataset``;
  ``casesToExport`` names them against the dataset they go to (a volume it holds is that case);
- ``TrainingCurve`` keeps a table node (epoch, loss, validation Dice) and a plot chart of it,
  filled from the trainer's messages while the worker trains.
"""

import re

import numpy as np
import slicer
import vtk

from .geometry import nodeName, volumeGeometryLPS, volumeToArray
from .paths import folderName
from .segments import SOURCE_VOLUME_ROLE, segmentToArray

_EPOCH_RE = re.compile(r"epoch (\d+)(?:/\d+)?: loss ([-+0-9.eE]+|nan),? (?:val|validation) Dice ([-+0-9.eE]+|nan)")


def parseEpochMetrics(text):
    """(epoch, loss, validation Dice) from a trainer message such as
    'epoch 3: loss 0.2134 val Dice 0.8123 ...' or 'epoch 3/20: loss 0.2134, validation Dice 0.81';
    None for other messages."""
    match = _EPOCH_RE.search(text or "")
    if not match:
        return None
    return int(match.group(1)), float(match.group(2)), float(match.group(3))


def sourceVolume(segmentationNode):
    geometryRole = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    return segmentationNode.GetNodeReference(SOURCE_VOLUME_ROLE) or segmentationNode.GetNodeReference(geometryRole)


def findCases(scene, structureName):
    """[(volumeNode, segmentationNode, segmentId)] for every segmentation with a source volume
    and a non-empty segment named ``structureName``."""
    cases = []
    # GetNthNodeByClass, not GetNodesByClass: the collection that returns is the caller's to delete
    # and Python's reference would keep it, and every segmentation in it, alive.
    for index in range(scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode")):
        node = scene.GetNthNodeByClass(index, "vtkMRMLSegmentationNode")
        volume = sourceVolume(node)
        segmentId = node.GetSegmentation().GetSegmentIdBySegmentName(structureName)
        if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode") or not segmentId:
            continue
        if segmentToArray(node, segmentId, volume).any():
            cases.append((volume, node, segmentId))
    return cases


def caseId(volumeNode, used):
    """An id after the node's name (``paths.folderName``) that no id in ``used`` has, ignoring case:
    Windows and macOS file names ignore it, and "CT" and "ct" would write the same files."""
    base = folderName(nodeName(volumeNode)) or "case"
    taken = {name.casefold() for name in used}
    name, n = base, 2
    while name.casefold() in taken:
        name, n = "%s_%d" % (base, n), n + 1
    used.add(name)
    return name


def caseFromNodes(volumeNode, segmentationNode, segmentId, identifier):
    """(case_id, Volume, label Volume) for ``SAMFineTuneLib.dataset.export_dataset``. The image is
    a view of the node's voxels, not a copy: an export holds every case it writes at once, and ten
    large CTs are gigabytes; it runs to its end before the scene can change."""
    from SAMFineTuneLib.volume_io import Volume

    array, _ = volumeToArray(volumeNode, copy=False)
    spacing, origin, direction = volumeGeometryLPS(volumeNode)
    label = segmentToArray(segmentationNode, segmentId, volumeNode).view(np.uint8)
    return (identifier, Volume(array, spacing, origin, direction), Volume(label, spacing, origin, direction))


def casesToExport(cases, datasetDir, progress=None, cancel=None):
    """([(case_id, Volume, label Volume)], the ids among them the dataset holds, the dataset's cases
    as read, for ``export_dataset(known=)``) for ``cases`` ((volume, segmentation, segment) triples).
    A volume the dataset holds (the same voxels, whatever its grid: ``dataset.checks.KnownCases``,
    which compares a record written without fingerprints with its stored image) is that case
    exported again, corrected further or moved (registered), under its id; any other gets an id of
    its own after its node's name, never one the dataset holds, so a volume of another patient with
    the same name never takes over a case, nor one patient's scan becomes two cases.
    ``progress(done, total, message)`` and ``cancel()`` as in the engine, once per case."""
    from SAMFineTuneLib.dataset.checks import KnownCases
    from SAMFineTuneLib.progress import check_cancel, report

    known = KnownCases.of(datasetDir)
    used = {entry.case for entry in known.entries}
    again, prepared = set(), []
    for n, (volumeNode, segmentationNode, segmentId) in enumerate(cases):
        check_cancel(cancel)
        report(progress, n, len(cases), "reading case %s" % nodeName(volumeNode))
        _, image, label = caseFromNodes(volumeNode, segmentationNode, segmentId, None)
        # the same volume segmented twice: the second is another case the dataset holds, or a new one
        identifier = known.case_of(image, taken=again)
        if identifier is None:
            identifier = caseId(volumeNode, used)
        else:
            again.add(identifier)
        prepared.append((identifier, image, label))
    return prepared, again, known


class TrainingCurve:
    """A table node (epoch, loss, val_dice) and a plot chart of both curves.

    The columns are double arrays: ``vtkMRMLTableNode.AddColumn()`` without an array adds a
    string column, and Slicer's plot view draws no series from a string column
    (``Libs/MRML/Widgets/qMRMLPlotView.cxx``, Slicer 5.10 and 5.12: "unsupported data type")."""

    COLUMNS = ("epoch", "loss", "val_dice")

    def __init__(self, scene, name="SAMFineTune training"):
        self.scene = scene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", name)
        for column in self.COLUMNS:
            array = vtk.vtkDoubleArray()
            array.SetName(column)
            self.table.AddColumn(array)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", name + " chart")
        self.chart.SetTitle("Fine-tuning")
        self.chart.SetXAxisTitle("epoch")
        self.chart.SetYAxisTitle("loss / Dice")
        for column, colour in (("loss", (0.85, 0.3, 0.1)), ("val_dice", (0.1, 0.45, 0.85))):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", column)
            series.SetAndObserveTableNodeID(self.table.GetID())
            series.SetXColumnName("epoch")
            series.SetYColumnName(column)
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetColor(*colour)
            self.chart.AddAndObservePlotSeriesNodeID(series.GetID())
        self.epochs = []

    def add(self, epoch, loss, dice):
        """One row per epoch (a repeated epoch, e.g. from a progress and a log message, is skipped)."""
        if epoch in self.epochs:
            return False
        self.epochs.append(epoch)
        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        for column, value in zip(self.COLUMNS, (epoch, loss, dice)):
            table.SetValue(row, self.table.GetColumnIndex(column), value)
        table.Modified()
        self.table.Modified()
        return True

    def addFromMessage(self, text):
        metrics = parseEpochMetrics(text)
        return self.add(*metrics) if metrics else False

    def numericColumns(self):
        """True when every column can be plotted (a number array, not strings or bits)."""
        table = self.table.GetTable()
        return all(table.GetColumn(n).GetDataType() not in (vtk.VTK_STRING, vtk.VTK_BIT)
                   for n in range(table.GetNumberOfColumns()))

    def rows(self):
        table = self.table.GetTable()
        return [tuple(float(table.GetValue(r, c).ToDouble()) for c in range(len(self.COLUMNS)))
                for r in range(table.GetNumberOfRows())]
