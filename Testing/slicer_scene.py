"""Real MRML test scenes from the PyPI wheel ``slicer-core`` (no Slicer application).

Import the ``scene`` fixture into a test module (``from slicer_scene import scene``); it gives
a cleared scene published as ``slicer.mrmlScene`` with the volumes/segmentations/markups
logics that ``slicer.util`` needs (``SAMFineTuneMRML.scene.ensure_scene``).
"""
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(REPO, "SAMFineTune")
for _path in (REPO, MODULE_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is needed for MRML tests")

from SAMFineTuneMRML import geometry  # noqa: E402
from SAMFineTuneMRML.scene import reset_scene  # noqa: E402


@pytest.fixture
def scene():
    return reset_scene()


def rotation(axis, degrees):
    """3x3 rotation about x (0), y (1) or z (2)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    a, b = [i for i in range(3) if i != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


def ijkToRAS(spacing=(1.0, 1.0, 1.0), direction=None, origin=(0.0, 0.0, 0.0)):
    m = np.eye(4)
    m[:3, :3] = (np.eye(3) if direction is None else np.asarray(direction, float)) * np.asarray(spacing, float)
    m[:3, 3] = origin
    return m


#: Geometries every round-trip test runs on: identity, flipped axes (LPS-stored data as DICOM
#: gives it), anisotropic thick slices, an oblique (double-rotated) volume, and a sagittal
#: acquisition whose k axis runs along R.
GEOMETRIES = {
    "identity": ijkToRAS(),
    "flipped": ijkToRAS((0.8, 0.8, 2.5), np.diag([-1.0, -1.0, 1.0]), (120.0, 95.0, -40.0)),
    "anisotropic": ijkToRAS((0.6, 0.9, 5.0), None, (-10.0, 3.0, 7.0)),
    "oblique": ijkToRAS((1.1, 0.7, 3.0), rotation(2, 25.0) @ rotation(0, -15.0), (4.0, -8.0, 12.0)),
    "sagittal": ijkToRAS((1.0, 1.2, 2.0), np.array([[0, 0, -1.0], [1.0, 0, 0], [0, -1.0, 0]]), (30.0, -20.0, 50.0)),
}


def addVolume(array, matrix=None, name="volume"):
    return slicer.util.addVolumeFromArray(np.asarray(array), matrix if matrix is not None else np.eye(4), name=name)


def addROI(scene, volumeNode=None, box=None, name="ROI", center=None, size=None):
    """An ROI around the inclusive IJK ``box`` of ``volumeNode``, or at ``center``/``size`` in RAS."""
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    if box is not None:
        geometry.placeRoiAroundBox(roi, volumeNode, box)
    else:
        roi.SetCenter(*center)
        roi.SetSize(*size)
    return roi


def addLinearTransform(scene, matrix, name="transform"):
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
    node.SetMatrixTransformToParent(geometry.arrayToMatrix(matrix))
    return node


def voxelsInROI(roiNode, volumeNode):
    """Brute force: (i, j, k) of every voxel whose centre is in the ROI (world coordinates)."""
    ijkToWorld = geometry.volumeIJKToRAS(volumeNode, world=True)
    dims = volumeNode.GetImageData().GetDimensions()
    k, j, i = np.indices((dims[2], dims[1], dims[0])).reshape(3, -1)
    points = (ijkToWorld @ np.stack([i, j, k, np.ones_like(i)]))[:3].T
    inside = np.array([roiNode.IsPointInROIWorld(p) for p in points], dtype=bool)
    return np.stack([i, j, k], axis=1)[inside]


def dice(a, b):
    a, b = np.asarray(a) > 0, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 2.0 * np.logical_and(a, b).sum() / total if total else 1.0
