"""One slice of a segment at a time: where a slice view cuts a volume, and writing a 2D result
into that slice as the Segment Editor writes its own edits.

The engine works on the slices of a KJI array: "axial" steps along k, "coronal" along j,
"sagittal" along i (``geometry.engineAxis``), and a point on a slice is (x, y) = (column, row)
of that 2D array. A slice view matches one of those slices when its normal lies along one of
the volume's IJK axes.

Writing goes through a ``modify(labelmap, mode, extent)`` callable: inside Slicer the effect's
``modifySelectedSegmentByLabelmap``, elsewhere ``EditorModifier`` around Slicer's
``vtkSlicerSegmentEditorLogic`` (the code that effect calls, Slicer 5.10 and 5.12), each with its
``defaultModifierLabelmap`` as the grid the result is resampled onto. Both honour the Segment
Editor's masking settings: the editable area, the intensity range and whether other segments may
be overwritten.
"""

import numpy as np
import slicer
import vtk

from .geometry import ENGINE_AXIS_OF_ARRAY_AXIS, matrixToArray, nodeName, volumeExtent, volumeIJKToRAS
from .options import AXES
from .segments import orientedImageFromMask, segmentBlock

#: A view counts as showing a volume's slices when its normal is this close to an IJK axis.
ALIGNMENT_DEGREES = 1.0
#: Engine axis -> the (row, column) axes of its slices in the KJI array.
_ROWS_COLUMNS = {"axial": (1, 2), "coronal": (0, 2), "sagittal": (0, 1)}

# Slicer's own modification modes (vtkSlicerSegmentEditorLogic::ModificationMode).
REMOVE = slicer.vtkSlicerSegmentEditorLogic.ModificationModeRemove
ADD = slicer.vtkSlicerSegmentEditorLogic.ModificationModeAdd


def viewAxis(sliceToRAS, volumeNode):
    """The engine axis whose slices a view shows (``sliceToRAS``: the slice node's 4x4), or a
    ValueError that says how to align the view."""
    normal = np.asarray(sliceToRAS, dtype=float)[:3, 2]
    normal = normal / np.linalg.norm(normal)
    axes = volumeIJKToRAS(volumeNode, world=True)[:3, :3]
    cosines = np.abs(normal @ (axes / np.linalg.norm(axes, axis=0)))
    ijkAxis = int(np.argmax(cosines))
    if cosines[ijkAxis] < np.cos(np.radians(ALIGNMENT_DEGREES)):
        raise ValueError("This view is not aligned with the slices of '%s' (it is oblique to them): use a view "
                         "that shows the volume's own slices, e.g. reset the view's orientation to the volume."
                         % nodeName(volumeNode))
    return ENGINE_AXIS_OF_ARRAY_AXIS[2 - ijkAxis]


def sliceNodeAxis(sliceNode, volumeNode):
    return viewAxis(matrixToArray(sliceNode.GetSliceToRAS()), volumeNode)


def rasToSlicePoint(ras, volumeNode, axis):
    """(slice index, (x, y)) of a world RAS point on the volume's slices along ``axis``; the point
    may lie outside the volume (the caller decides)."""
    ijk = np.linalg.inv(volumeIJKToRAS(volumeNode, world=True)) @ np.r_[np.asarray(ras, dtype=float)[:3], 1.0]
    kji = ijk[2::-1]
    rows, columns = _ROWS_COLUMNS[axis]
    return int(np.floor(kji[AXES[axis]] + 0.5)), (float(kji[columns]), float(kji[rows]))


def arrayAxis(axis):
    """The KJI array axis the engine axis steps along."""
    return AXES[axis]


def segmentSlice(segmentationNode, segmentId, volumeNode, axis, index):
    """One slice of a segment on the volume's grid (2D bool), read alone (``segments.segmentBlock``)."""
    block = segmentBlock(segmentationNode, segmentId, volumeNode, slicesExtent(volumeNode, axis, index, index))
    return block.take(0, axis=arrayAxis(axis))


def sliceShape(volumeNode, axis):
    dims = volumeNode.GetImageData().GetDimensions()
    kji = (dims[2], dims[1], dims[0])
    rows, columns = _ROWS_COLUMNS[axis]
    return kji[rows], kji[columns]


def slicesExtent(volumeNode, axis, first, last):
    """VTK extent (i0, i1, j0, j1, k0, k1) of the volume's slices ``first``..``last`` along ``axis``."""
    extent = list(volumeExtent(volumeNode))
    ijkAxis = 2 - AXES[axis]
    extent[2 * ijkAxis], extent[2 * ijkAxis + 1] = int(first), int(last)
    return extent


def sliceModifier(masks, volumeNode, segmentationNode, reference=None, extent=None):
    """(labelmap, its extent): ``masks`` (KJI: the volume's shape, or that of ``extent``) in the
    volume's geometry or, with ``reference`` (the editor's modifier labelmap), resampled onto that
    grid over the part of it the masks cover. The editor's grid spans the whole volume: resampling a
    click's slice onto all of it would take a second and a gigabyte on a 600-slice CT."""
    image = orientedImageFromMask(masks, volumeNode, segmentationNode, extent)
    if reference is None:
        return image, list(image.GetExtent())
    covered = slicer.vtkOrientedImageData()
    toWorld = vtk.vtkMatrix4x4()
    reference.GetImageToWorldMatrix(toWorld)
    covered.SetImageToWorldMatrix(toWorld)
    covered.SetExtent(*coveringExtent(image, reference))
    resampled = slicer.vtkOrientedImageData()
    slicer.vtkOrientedImageDataResample.ResampleOrientedImageToReferenceOrientedImage(image, covered, resampled)
    return resampled, list(resampled.GetExtent())


def coveringExtent(image, reference):
    """The extent of ``reference``'s grid that holds every voxel of ``image`` (its corners mapped,
    one voxel more on each side), within the reference's own extent."""
    imageToWorld, referenceToWorld = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(imageToWorld)
    reference.GetImageToWorldMatrix(referenceToWorld)
    imageToReference = np.linalg.inv(matrixToArray(referenceToWorld)) @ matrixToArray(imageToWorld)
    e = image.GetExtent()
    corners = np.array([[i, j, k, 1.0] for i in e[0:2] for j in e[2:4] for k in e[4:6]]).T
    ijk = np.round((imageToReference @ corners)[:3], 6)  # 11.9999999 is voxel 12 of the same grid
    low, high = np.floor(ijk.min(axis=1)) - 1, np.ceil(ijk.max(axis=1)) + 1
    bounds = reference.GetExtent()
    return [int(max(low[n // 2], bounds[n])) if n % 2 == 0 else int(min(high[n // 2], bounds[n])) for n in range(6)]


def slicesBlock(volumeNode, axis, planes):
    """(block, extent): a KJI uint8 block of the volume from the first to the last slice of
    ``planes`` ({slice index: 2D mask}) holding those planes and nothing elsewhere, and its VTK
    extent; a ValueError names a plane of the wrong size or place before anything is written."""
    shape = sliceShape(volumeNode, axis)
    dims = volumeNode.GetImageData().GetDimensions()
    count = (dims[2], dims[1], dims[0])[AXES[axis]]
    for index, plane in planes.items():
        if np.shape(plane) != shape:
            raise ValueError("A %s slice of '%s' is %s pixels, the result is %s." % (axis, nodeName(volumeNode), shape,
                                                                                    np.shape(plane)))
        if not 0 <= int(index) < count:
            raise ValueError("Slice %d is outside '%s' (0..%d along %s)." % (index, nodeName(volumeNode),
                                                                            count - 1, axis))
    first, last = min(int(i) for i in planes), max(int(i) for i in planes)
    along = np.zeros((last - first + 1,) + shape, np.uint8)
    for index, plane in planes.items():
        along[int(index) - first] = np.asarray(plane) > 0
    return np.moveaxis(along, 0, AXES[axis]), slicesExtent(volumeNode, axis, first, last)


def writeSlices(modify, planes, volumeNode, segmentationNode, axis, reference=None):
    """Make the given slices of the selected segment ``planes`` ({slice index: 2D mask}): those
    slices are cleared, then the masks added, each through ``modify`` (which applies the editor's
    masking); other slices are not touched. Only the block from the first to the last of those
    slices is built, never a volume's worth of labelmap per click."""
    if not planes:
        return
    result, extent = slicesBlock(volumeNode, axis, planes)  # checked before any change
    ones = np.ones(sliceShape(volumeNode, axis), bool)
    whole, _ = slicesBlock(volumeNode, axis, dict.fromkeys(planes, ones))
    for masks, mode in ((whole, REMOVE), (result, ADD)):
        labelmap, where = sliceModifier(masks, volumeNode, segmentationNode, reference, extent)
        modify(labelmap, mode, where)


def writeSlice(modify, mask2d, volumeNode, segmentationNode, axis, index, reference=None):
    """One slice: ``writeSlices`` with a single plane."""
    writeSlices(modify, {int(index): mask2d}, volumeNode, segmentationNode, axis, reference)


class EditorModifier:
    """The Segment Editor's own way of modifying a segment, without the application: Slicer's
    ``vtkSlicerSegmentEditorLogic`` with a segment editor node holding the masking settings."""

    def __init__(self, scene, segmentationNode, volumeNode, segmentId, editorNode=None):
        self.editorNode = editorNode or scene.AddNewNodeByClass("vtkMRMLSegmentEditorNode")
        self.logic = slicer.vtkSlicerSegmentEditorLogic()
        self.logic.SetMRMLScene(scene)
        self.logic.SetSegmentEditorNode(self.editorNode)
        self.logic.SetSegmentationNode(segmentationNode)
        self.logic.SetSourceVolumeNode(volumeNode)
        self.segmentationNode = segmentationNode
        self.segmentId = segmentId

    def __call__(self, labelmap, mode, extent=None):
        if extent is None:
            self.logic.ModifySegmentByLabelmap(self.segmentationNode, self.segmentId, labelmap, mode, True, False)
        else:
            self.logic.ModifySegmentByLabelmap(self.segmentationNode, self.segmentId, labelmap, mode, extent, True,
                                               False)

    def defaultModifierLabelmap(self):
        """The editor's empty modifier labelmap in the segmentation's geometry, as the effect's
        ``defaultModifierLabelmap`` gives it: pass it to ``writeSlices`` as ``reference``. A result
        on the volume's own grid is dropped without a word where the two grids differ (an
        oversampled segmentation) and the intensity range is on."""
        if not self.logic.ResetModifierLabelmapToDefault():
            raise ValueError("The Segment Editor could not make a labelmap for '%s'." % nodeName(self.segmentationNode))
        return self.logic.GetModifierLabelmap()

    def saveStateForUndo(self):
        return self.logic.SaveStateForUndo()

    def undo(self):
        self.logic.Undo()
