"""Writing engine masks into segments, as one undoable step, and reading segments back.

A result replaces the target segment only inside the ROI's box: the segment's content
outside the box and every other segment survive. Before the write the segmentation's state
is saved in a ``vtkSegmentationHistory`` (the class the Segment Editor uses for its
undo/redo), so one undo returns the segment exactly as it was.
"""

import numpy as np
import slicer
import vtk
from vtk.util import numpy_support

from .geometry import (boxExtent, extentShape, extentSlices, linearTransformBetween, nodeName, volumeExtent,
                       volumeIJKToRAS)

#: Node reference from a segmentation to the volume it was made on (training cases use it).
SOURCE_VOLUME_ROLE = "SAMFineTuneSourceVolume"
#: Segment tag holding the ID of the ROI node the segment was last segmented from: the SAM effect
#: propagates a corrected slice inside it.
SOURCE_ROI_TAG = "SAMFineTune.SourceROI"


def orientedImageFromMask(mask, volumeNode, segmentationNode, extent=None):
    """vtkOrientedImageData (uint8) holding ``mask`` with the volume's geometry, expressed in the
    segmentation node's coordinate frame. ``mask`` is KJI, shaped like the volume or, with
    ``extent`` (i0, i1, j0, j1, k0, k1, inclusive, within the volume), like that block of it: a
    result is written through an image of its box only, since a whole CT's worth of labelmap
    (150 MB at 512 x 512 x 600) per write would cost memory and time for voxels it does not change."""
    whole = volumeExtent(volumeNode)
    extent = tuple(int(v) for v in (extent or whole))
    if any(extent[2 * n] < whole[2 * n] or extent[2 * n + 1] > whole[2 * n + 1] for n in range(3)):
        raise ValueError("Extent %s lies outside volume '%s' (%s)." % (extent, nodeName(volumeNode), whole))
    expected = extentShape(extent)
    if tuple(mask.shape) != expected:
        raise ValueError("Mask shape %s does not match volume '%s' (%s, KJI)."
                         % (tuple(mask.shape), nodeName(volumeNode), expected))
    image = slicer.vtkOrientedImageData()
    image.SetExtent(*extent)
    flat = np.ascontiguousarray(mask, dtype=np.uint8).reshape(-1)
    scalars = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
    image.GetPointData().SetScalars(scalars)
    # volume IJK -> volume local RAS -> segmentation local RAS
    volumeToSegmentation = linearTransformBetween(volumeNode, segmentationNode, "Segmentation")
    ijkToSegmentation = volumeToSegmentation @ volumeIJKToRAS(volumeNode, world=False)
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijkToSegmentation[r, c]))
    image.SetImageToWorldMatrix(matrix)
    return image


def ensureSegment(segmentationNode, segmentId=None, segmentName=None, color=None):
    """ID of the target segment: ``segmentId`` if it exists, else the segment named
    ``segmentName`` if there is one, else a new empty segment (named ``segmentName``)."""
    segmentation = segmentationNode.GetSegmentation()
    if segmentId:
        if segmentation.GetSegment(segmentId) is None:
            raise ValueError("Segmentation '%s' has no segment with ID '%s'."
                             % (nodeName(segmentationNode), segmentId))
        return segmentId
    if segmentName:
        existing = segmentation.GetSegmentIdBySegmentName(segmentName)
        if existing:
            return existing
    newId = segmentation.AddEmptySegment("", segmentName or "", color or [0.9, 0.6, 0.2])
    return newId


def prepareSegmentation(segmentationNode, volumeNode):
    """Give a segmentation without a geometry the volume's one, and a display node."""
    segmentation = segmentationNode.GetSegmentation()
    geometryRole = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    if segmentationNode.GetNodeReference(geometryRole) is None and segmentation.GetNumberOfSegments() == 0:
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
    if segmentationNode.GetDisplayNode() is None:
        segmentationNode.CreateDefaultDisplayNodes()


def checkLabelmapSource(segmentationNode):
    """Results are written as labelmaps: a ValueError naming a segmentation whose segments are kept
    as another representation (a closed surface imported from a model), which would refuse them."""
    source = segmentationNode.GetSegmentation().GetSourceRepresentationName()
    labelmap = slicer.vtkSegmentationConverter.GetSegmentationBinaryLabelmapRepresentationName()
    if source != labelmap:
        raise ValueError("'%s' keeps its segments as '%s': make '%s' its source representation (Segmentations "
                         "module, Representations) or choose another segmentation."
                         % (nodeName(segmentationNode), source, labelmap))


def writeMaskToSegment(mask, volumeNode, segmentationNode, segmentId, box=None, history=None):
    """Replace ``segmentId``'s content inside ``box`` (inclusive IJK ``(i0, j0, k0, i1, j1, k1)``
    of ``volumeNode``; None = the whole volume) by ``mask`` (KJI array shaped like the volume).

    ``history`` (a vtkSegmentationHistory or anything with ``SaveState()``) gets the state
    before the write, which makes the write one undoable step.
    """
    prepareSegmentation(segmentationNode, volumeNode)
    mask = np.asarray(mask)
    whole = volumeExtent(volumeNode)
    if tuple(mask.shape) != extentShape(whole):
        raise ValueError("Mask shape %s does not match volume '%s' (%s, KJI)."
                         % (tuple(mask.shape), nodeName(volumeNode), extentShape(whole)))
    extent = whole if box is None else boxExtent(box)
    image = orientedImageFromMask(mask[extentSlices(extent)] > 0, volumeNode, segmentationNode, extent)
    # The segment is cleared inside the box (minimum with zeros), then the result is masked in
    # with the segment's own label, as the Segment Editor's "add" does (vtkSlicerSegmentEditorLogic,
    # Slicer 5.10): MODE_REPLACE would clear the whole segment when it shares a layer with others,
    # and MODE_MERGE_MAX writes the layer's label values, which empty new segments share.
    empty = slicer.vtkOrientedImageData()
    empty.DeepCopy(image)
    empty.GetPointData().GetScalars().Fill(0)
    if history is not None:
        history.SaveState()
    Logic = slicer.vtkSlicerSegmentationsModuleLogic
    ok = (Logic.SetBinaryLabelmapToSegment(empty, segmentationNode, segmentId, Logic.MODE_MERGE_MIN, extent)
          and Logic.SetBinaryLabelmapToSegment(image, segmentationNode, segmentId, Logic.MODE_MERGE_MASK, extent))
    if not ok:
        raise RuntimeError("Could not write the result into segment '%s' of '%s'."
                           % (segmentId, nodeName(segmentationNode)))
    return segmentId


def segmentToArray(segmentationNode, segmentId, volumeNode):
    """Binary KJI array (bool) of a segment on ``volumeNode``'s grid: ``segmentBlock`` over the whole
    volume, which adds no temporary node to the scene as ``slicer.util.arrayFromSegmentBinaryLabelmap``
    does (and on a 600-slice CT takes half its time and three quarters of its memory)."""
    return segmentBlock(segmentationNode, segmentId, volumeNode, volumeExtent(volumeNode))


def segmentBlock(segmentationNode, segmentId, volumeNode, extent):
    """Binary KJI array (bool) of a segment on ``extent`` (i0, i1, j0, j1, k0, k1) of ``volumeNode``'s
    grid: only that block is resampled from the segment's labelmap (a click reads one slice, and the
    whole segment of a 600-slice CT takes a second), by its label value in a layer it shares."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    labelmap = segmentationNode.GetBinaryLabelmapInternalRepresentation(segmentId) if segment is not None else None
    shape = extentShape(extent)
    if labelmap is None or not linearBetween(volumeNode, segmentationNode):
        # a closed surface, or a warped segmentation: Slicer converts the whole segment
        whole = np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(segmentationNode, segmentId, volumeNode)) > 0
        return whole[extentSlices(extent)]
    reference = orientedImageFromMask(np.zeros(shape, np.uint8), volumeNode, segmentationNode, extent)
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(labelmap, reference, resampled)
    return numpy_support.vtk_to_numpy(resampled.GetPointData().GetScalars()).reshape(shape) == segment.GetLabelValue()


def linearBetween(volumeNode, segmentationNode):
    """Whether the transforms between the two nodes are linear (``geometry.linearTransformBetween``)."""
    try:
        linearTransformBetween(volumeNode, segmentationNode, "Segmentation")
    except ValueError:
        return False
    return True


class UndoHistory:
    """One vtkSegmentationHistory per segmentation node, for ``logic.undo(segmentationNode)``
    from the console and the panel's Undo button. (The panel also saves the state in the
    Segment Editor's own history, so Ctrl+Z there works too.)"""

    def __init__(self, maximumStates=10):
        self.maximumStates = maximumStates
        self._histories = {}

    def forNode(self, segmentationNode):
        self._forgetRemoved(segmentationNode.GetScene())
        key = segmentationNode.GetID()
        entry = self._histories.get(key)
        if entry is None or entry[0] is not segmentationNode.GetSegmentation():
            history = slicer.vtkSegmentationHistory()
            history.SetMaximumNumberOfStates(self.maximumStates)
            history.SetSegmentation(segmentationNode.GetSegmentation())
            entry = (segmentationNode.GetSegmentation(), history)
            self._histories[key] = entry
        return entry[1]

    def _forgetRemoved(self, scene):
        """Drop the histories of segmentations no longer in the scene: their saved states hold
        labelmaps."""
        if scene is None:
            return
        for key, (segmentation, _) in list(self._histories.items()):
            node = scene.GetNodeByID(key)
            if node is None or node.GetSegmentation() is not segmentation:
                del self._histories[key]

    def undo(self, segmentationNode):
        """Restore the state before the last write; False when there is nothing to undo."""
        history = self.forNode(segmentationNode)
        if not history.IsRestorePreviousStateAvailable():
            return False
        wasModifying = segmentationNode.StartModify()
        try:
            return bool(history.RestorePreviousState())
        finally:
            segmentationNode.EndModify(wasModifying)

    def redo(self, segmentationNode):
        history = self.forNode(segmentationNode)
        if not history.IsRestoreNextStateAvailable():
            return False
        return bool(history.RestoreNextState())


def rememberSourceRoi(segmentationNode, segmentId, roiNode):
    """Tag the segment with the ROI it was segmented from (``SOURCE_ROI_TAG``)."""
    segment = segmentationNode.GetSegmentation().GetSegment(segmentId)
    if segment is not None and roiNode is not None:
        segment.SetTag(SOURCE_ROI_TAG, roiNode.GetID())


def sourceRoi(segment, scene):
    """The ROI node a segment was segmented from; None when it has none or the node is gone."""
    text = vtk.reference("")  # vtkSegment::GetTag(tag, std::string& value)
    if segment is None or not segment.GetTag(SOURCE_ROI_TAG, text):
        return None
    node = scene.GetNodeByID(str(text))
    return node if node is not None and node.IsA("vtkMRMLMarkupsROINode") else None
