"""Geometry between MRML nodes and the engine's voxel arrays.

Conventions (the engine's):
- arrays are KJI (``array[k, j, i]``), as ``slicer.util.arrayFromVolume`` returns them;
- a box is ``(i0, j0, k0, i1, j1, k1)``, inclusive voxel indices;
- a voxel belongs to an ROI when its centre lies inside the ROI. Voxel centres sit at
  integer IJK, so the box along each axis is ``ceil(min) .. floor(max)`` of the ROI's
  extent in continuous IJK (with a small tolerance). Rounding the ROI corners to the
  nearest index instead puts a box edge half a voxel out and, on thick slices, one slice
  off: this is the rounding that users of other SAM extensions complain about.

Only ``slicer`` (MRML core), ``vtk`` and ``numpy`` are used, so this runs under the PyPI
``slicer-core`` wheel as well as inside Slicer.
"""

import logging

import numpy as np
import slicer
import vtk

from .options import AXES

#: Tolerance in voxels when deciding whether a voxel centre lies on the ROI boundary.
BOUNDARY_TOLERANCE = 1e-3

#: Points sampled along each ROI edge; more than the two corners so that a non-linear parent
#: transform (which bends the edges) is followed too.
_EDGE_SAMPLES = 9

# The engine's slicing axis that steps along each axis of a KJI array.
ENGINE_AXIS_OF_ARRAY_AXIS = {index: name for name, index in AXES.items()}
# The RAS direction that each anatomical slicing axis is perpendicular to.
_RAS_NORMAL = {"axial": 2, "coronal": 1, "sagittal": 0}


def boxExtent(box):
    """An inclusive IJK box (i0, j0, k0, i1, j1, k1) in VTK's extent order (i0, i1, j0, j1, k0, k1)."""
    i0, j0, k0, i1, j1, k1 = (int(v) for v in box)
    return (i0, i1, j0, j1, k0, k1)


def volumeExtent(volumeNode):
    """The VTK extent of a volume's whole grid."""
    dims = volumeNode.GetImageData().GetDimensions()
    return (0, dims[0] - 1, 0, dims[1] - 1, 0, dims[2] - 1)


def extentShape(extent):
    """The KJI array shape of a VTK extent."""
    return tuple(int(extent[2 * n + 1]) - int(extent[2 * n]) + 1 for n in (2, 1, 0))


def extentSlices(extent):
    """numpy index tuple selecting a VTK extent in a KJI array."""
    i0, i1, j0, j1, k0, k1 = (int(v) for v in extent)
    return (slice(k0, k1 + 1), slice(j0, j1 + 1), slice(i0, i1 + 1))


class RoiBox:
    """An ROI expressed as an inclusive IJK box in one volume.

    ``box`` is clipped to the volume; ``unclippedBox`` is what the ROI covers; ``warning``
    is a sentence for the user when clipping happened, else None.
    """

    def __init__(self, box, unclippedBox, warning=None):
        self.box = tuple(int(v) for v in box)
        self.unclippedBox = tuple(int(v) for v in unclippedBox)
        self.warning = warning

    @property
    def clipped(self):
        return self.box != self.unclippedBox

    def extent(self):
        """VTK extent order (i0, i1, j0, j1, k0, k1)."""
        return boxExtent(self.box)

    def slices(self):
        """numpy index tuple selecting the box in a KJI array."""
        return extentSlices(self.extent())

    def __repr__(self):
        return "RoiBox(box=%r, clipped=%r)" % (self.box, self.clipped)


def matrixToArray(vtkMatrix):
    return np.array([[vtkMatrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def arrayToMatrix(array):
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(array[r][c]))
    return matrix


def nodeName(node):
    return node.GetName() if node is not None else "(none)"


def linearTransformBetween(sourceNode, targetNode, what):
    """4x4 array mapping the local coordinates of ``sourceNode`` into those of ``targetNode``
    (through their parent transforms). ValueError when the path is not linear."""
    matrix = vtk.vtkMatrix4x4()
    sourceParent = sourceNode.GetParentTransformNode() if sourceNode is not None else None
    targetParent = targetNode.GetParentTransformNode() if targetNode is not None else None
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(sourceParent, targetParent, matrix):
        raise ValueError("%s: the transform between '%s' and '%s' is not linear; harden it first "
                         "(Data module, right-click the transform, Harden transform)."
                         % (what, nodeName(sourceNode), nodeName(targetNode)))
    return matrixToArray(matrix)


def volumeIJKToRAS(volumeNode, world=True):
    """4x4 IJK-to-RAS array of a volume; with ``world`` the volume's parent transforms are
    included (they must be linear)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    ijkToRAS = matrixToArray(matrix)
    if world and volumeNode.GetParentTransformNode() is not None:
        ijkToRAS = linearTransformBetween(volumeNode, None, "Volume") @ ijkToRAS
    return ijkToRAS


def requireNode(node, className, whenMissing, kind):
    if node is None:
        raise ValueError(whenMissing)
    if not node.IsA(className):
        raise ValueError("'%s' is not a %s." % (nodeName(node), kind))


def checkVolumeNode(volumeNode):
    requireNode(volumeNode, "vtkMRMLScalarVolumeNode", "No input volume selected.", "scalar volume")
    imageData = volumeNode.GetImageData()
    if imageData is None or imageData.GetNumberOfPoints() == 0:
        raise ValueError("Volume '%s' has no voxels (not loaded?)." % nodeName(volumeNode))
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError("Volume '%s' has %d components per voxel; only single-component (grey) "
                         "volumes can be segmented." % (nodeName(volumeNode), imageData.GetNumberOfScalarComponents()))


def volumeToArray(volumeNode, world=True, copy=True):
    """(KJI numpy array, 4x4 IJK-to-RAS array) of a scalar volume node: a copy, or with ``copy``
    False a view of the node's voxels, for a reader done with them before the node can change
    (a request to the worker is written before the call returns)."""
    checkVolumeNode(volumeNode)
    array = slicer.util.arrayFromVolume(volumeNode)
    if copy:
        array = array.copy()
    return array, volumeIJKToRAS(volumeNode, world=world)


def volumeKey(volumeNode):
    """The name the worker keeps a volume's voxels under: it changes whenever the voxels change
    (VTK's modification times only grow), so a stale copy is never used."""
    return "%s:%d" % (volumeNode.GetID(), volumeNode.GetImageData().GetMTime())


def volumeSpacing(volumeNode):
    """(x, y, z) voxel spacing in mm, i.e. along i, j, k."""
    return tuple(float(s) for s in volumeNode.GetSpacing())


def volumeGeometryLPS(volumeNode):
    """(spacing, origin, direction) in the LPS convention of ITK/SimpleITK files (the engine's
    ``volume_io.Volume``); direction is the row-major 3x3 matrix whose columns are the i, j, k
    axis directions. The volume's parent transforms are included."""
    ijkToRAS = volumeIJKToRAS(volumeNode, world=True)
    rasToLps = np.diag([-1.0, -1.0, 1.0])
    axes = rasToLps @ ijkToRAS[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    direction = axes / spacing
    origin = rasToLps @ ijkToRAS[:3, 3]
    return (tuple(float(s) for s in spacing), tuple(float(o) for o in origin),
            tuple(float(d) for d in direction.reshape(-1)))


def engineAxis(volumeNode, anatomicalAxis):
    """Engine axis name (the array axis to step along) for an anatomical slicing axis.

    The engine slices along array axes: "axial" steps along k, "coronal" along j,
    "sagittal" along i. For a volume acquired in another orientation (a sagittal MRI
    stores R-L along k) the IJK axis closest to the anatomical normal is used, so that
    "axial" always means slices perpendicular to the patient's S axis.
    """
    if anatomicalAxis not in _RAS_NORMAL:
        raise ValueError("Unknown slicing axis '%s'; expected one of %s."
                         % (anatomicalAxis, ", ".join(sorted(_RAS_NORMAL))))
    ijkToRAS = volumeIJKToRAS(volumeNode, world=True)[:3, :3]
    directions = ijkToRAS / np.linalg.norm(ijkToRAS, axis=0)
    ijkAxis = int(np.argmax(np.abs(directions[_RAS_NORMAL[anatomicalAxis], :])))   # 0=i, 1=j, 2=k
    return ENGINE_AXIS_OF_ARRAY_AXIS[2 - ijkAxis]


def _roiEdgePoints(roiNode):
    """Points along the 12 edges of the ROI box, in the ROI node's local coordinates."""
    size = np.array(roiNode.GetSize(), dtype=float)
    objectToNode = matrixToArray(roiNode.GetObjectToNodeMatrix())
    t = np.linspace(-0.5, 0.5, _EDGE_SAMPLES)
    points = []
    for axis in range(3):
        others = [a for a in range(3) if a != axis]
        for s0 in (-0.5, 0.5):
            for s1 in (-0.5, 0.5):
                p = np.zeros((len(t), 3))
                p[:, axis] = t
                p[:, others[0]] = s0
                p[:, others[1]] = s1
                points.append(p * size)
    points = np.concatenate(points)
    homogeneous = np.c_[points, np.ones(len(points))]
    return (objectToNode @ homogeneous.T).T[:, :3]


def roiCornersIJK(roiNode, volumeNode):
    """Points on the ROI's edges in the volume's continuous IJK coordinates (N x 3, i j k)."""
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        roiNode.GetParentTransformNode(), volumeNode.GetParentTransformNode(), transform)
    rasToIJK = vtk.vtkMatrix4x4()
    volumeNode.GetRASToIJKMatrix(rasToIJK)
    rasToIJK = matrixToArray(rasToIJK)
    points = np.array([transform.TransformPoint(*p) for p in _roiEdgePoints(roiNode)])
    return (rasToIJK @ np.c_[points, np.ones(len(points))].T).T[:, :3]


def checkRoiNode(roiNode):
    requireNode(roiNode, "vtkMRMLMarkupsROINode", "No ROI selected: place a box (Markups ROI) around the structure.",
                "Markups ROI")
    size = roiNode.GetSize()
    if roiNode.GetNumberOfControlPoints() == 0 or min(size) < 0 or max(size) <= 0:
        raise ValueError("ROI '%s' is not placed yet (it has no size)." % nodeName(roiNode))


def roiToIJKBox(roiNode, volumeNode):
    """The inclusive IJK box of the voxels whose centres lie in the ROI.

    Works for any ROI orientation and any parent transforms on the ROI and the volume (an
    oblique ROI gives its bounding box in IJK). An ROI partly outside the volume is clipped
    and a warning is logged and returned in ``RoiBox.warning``; an ROI wholly outside is a
    ValueError that says where each lies.
    """
    checkVolumeNode(volumeNode)
    checkRoiNode(roiNode)
    points = roiCornersIJK(roiNode, volumeNode)
    low, high = points.min(axis=0), points.max(axis=0)
    first = np.ceil(low - BOUNDARY_TOLERANCE).astype(int)
    last = np.floor(high + BOUNDARY_TOLERANCE).astype(int)
    # An ROI thinner than the voxel spacing between two centres still means "this slice".
    thin = first > last
    centre = np.floor((low + high) / 2.0 + 0.5).astype(int)
    first[thin] = centre[thin]
    last[thin] = centre[thin]
    dims = np.array(volumeNode.GetImageData().GetDimensions())
    unclipped = tuple(first) + tuple(last)
    if np.any(last < 0) or np.any(first > dims - 1):
        raise ValueError(
            "ROI '%s' lies entirely outside volume '%s': in the volume's voxel coordinates it spans "
            "i %d..%d, j %d..%d, k %d..%d but the volume has i 0..%d, j 0..%d, k 0..%d. Move the ROI "
            "onto the volume (or check their transforms)."
            % (nodeName(roiNode), nodeName(volumeNode), first[0], last[0], first[1], last[1],
               first[2], last[2], dims[0] - 1, dims[1] - 1, dims[2] - 1))
    clippedFirst = np.maximum(first, 0)
    clippedLast = np.minimum(last, dims - 1)
    box = tuple(clippedFirst) + tuple(clippedLast)
    warning = None
    if box != unclipped:
        warning = ("ROI '%s' extends outside volume '%s'; only the part inside (i %d..%d, j %d..%d, "
                   "k %d..%d) is segmented."
                   % (nodeName(roiNode), nodeName(volumeNode), box[0], box[3], box[1], box[4], box[2], box[5]))
        logging.warning(warning)
    return RoiBox(box, unclipped, warning)


def viewRegionBox(volumeNode, rasCorners, halfDepthMm=20.0):
    """Inclusive IJK box of the part of ``volumeNode`` that a slice view shows.

    ``rasCorners``: the view's corners in world RAS (from the slice node's XY-to-RAS). The box
    covers the visible in-plane region and a slab of +/- ``halfDepthMm`` around the slice, and
    is clipped to the volume. ValueError when the view does not show the volume.
    """
    checkVolumeNode(volumeNode)
    ijkToWorld = volumeIJKToRAS(volumeNode, world=True)
    points = np.asarray(rasCorners, dtype=float)
    ijk = (np.linalg.inv(ijkToWorld) @ np.c_[points, np.ones(len(points))].T)[:3].T
    normalAxis = int(np.argmin(np.ptp(ijk, axis=0)))  # the corners lie in one slice: least spread
    spacing = np.linalg.norm(ijkToWorld[:3, :3], axis=0)
    centre = ijk[:, normalAxis].mean()
    half = halfDepthMm / spacing[normalAxis]
    low, high = ijk.min(axis=0), ijk.max(axis=0)
    low[normalAxis], high[normalAxis] = centre - half, centre + half
    dims = np.array(volumeNode.GetImageData().GetDimensions())
    first = np.maximum(np.ceil(low - BOUNDARY_TOLERANCE), 0).astype(int)
    last = np.minimum(np.floor(high + BOUNDARY_TOLERANCE), dims - 1).astype(int)
    if np.any(first > last):
        raise ValueError("The slice view does not show volume '%s': show it in the red view and try again."
                         % nodeName(volumeNode))
    return tuple(first) + tuple(last)


def placeRoiAroundBox(roiNode, volumeNode, box):
    """Set an ROI (in the volume's frame; the ROI gets the volume's parent transform) so that it
    covers exactly the voxels of the inclusive IJK ``box`` - the inverse of :func:`roiToIJKBox`.
    Used by the panel's "ROI around the view" button and by the self-test."""
    i0, j0, k0, i1, j1, k1 = box
    ijkToRAS = volumeIJKToRAS(volumeNode, world=False)
    axes = ijkToRAS[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    centreIJK = np.array([(i0 + i1) / 2.0, (j0 + j1) / 2.0, (k0 + k1) / 2.0, 1.0])
    objectToNode = np.eye(4)
    objectToNode[:3, :3] = axes / spacing
    objectToNode[:3, 3] = (ijkToRAS @ centreIJK)[:3]
    roiNode.SetAndObserveTransformNodeID(volumeNode.GetTransformNodeID())
    roiNode.SetCenter(*objectToNode[:3, 3])
    roiNode.GetObjectToNodeMatrix().DeepCopy(arrayToMatrix(objectToNode))
    size = (np.array([i1 - i0, j1 - j0, k1 - k0], dtype=float) + 1.0) * spacing
    roiNode.SetSize(*size)
    return roiNode

