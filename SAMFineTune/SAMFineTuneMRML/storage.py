"""Reading and writing nodes with MRML storage nodes.

``slicer.util.loadVolume`` / ``saveNode`` need the Slicer application; storage nodes do not,
so the batch script and the tests use these and run the same way in Slicer and under plain
Python with slicer-core.
"""

import os

from .geometry import nodeName
from .library import ensureLibraryImportable
from .scene import removeNodes


def _scene():
    from .scene import ensure_scene

    return ensure_scene()


def _read(node, storageClass, path, what):
    if not os.path.isfile(path):
        raise FileNotFoundError("%s file not found: %s" % (what, path))
    storage = node.GetScene().AddNewNodeByClass(storageClass)
    storage.SetFileName(path)
    node.SetAndObserveStorageNodeID(storage.GetID())
    if not storage.ReadData(node):
        raise ValueError("Could not read %s from %s (unsupported or damaged file)." % (what, path))
    return node


def _write(node, storageClass, path):
    """Written beside ``path`` and renamed onto it (``SAMFineTuneLib.files.atomic_write``): a
    failed or cut-short write leaves the file that was there. Single-file formats only."""
    ensureLibraryImportable()
    from SAMFineTuneLib.files import WriteError, atomic_write

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise FileNotFoundError("Output folder does not exist: %s" % folder)
    storage = node.GetStorageNode()
    if storage is None or not storage.IsA(storageClass):
        storage = node.GetScene().AddNewNodeByClass(storageClass)
        node.SetAndObserveStorageNodeID(storage.GetID())

    def write(temp):
        storage.SetFileName(temp)
        if not storage.WriteData(node):
            raise OSError("Could not write '%s' to %s." % (nodeName(node), path))

    def verify(temp):  # a node with nothing in it is written as nothing, and reported written
        if not os.path.isfile(temp) or os.path.getsize(temp) == 0:
            raise WriteError("'%s' holds nothing to write; %s was left as it was." % (nodeName(node), path))

    try:
        atomic_write(path, write, verify)
    finally:
        storage.SetFileName(path)
    return path


def fileStem(path):
    name = os.path.basename(path)
    for suffix in (".seg.nrrd", ".mrk.json", ".nii.gz", ".nrrd", ".nii", ".mha", ".mhd", ".json"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return os.path.splitext(name)[0]


def loadVolume(path, name=None):
    """A scalar volume node from .nrrd/.nii(.gz)/.mha/... (ITK readers)."""
    node = _scene().AddNewNodeByClass("vtkMRMLScalarVolumeNode", name or fileStem(path))
    try:
        _read(node, "vtkMRMLVolumeArchetypeStorageNode", os.path.abspath(path), "volume")
    except Exception:
        removeNodes(node)
        raise
    node.CreateDefaultDisplayNodes()
    return node


def loadROI(path):
    """A Markups ROI node from a .mrk.json file (as Slicer saves ROIs)."""
    node = _scene().AddNewNodeByClass("vtkMRMLMarkupsROINode", fileStem(path))
    try:
        _read(node, "vtkMRMLMarkupsROIJsonStorageNode", os.path.abspath(path), "ROI")
    except Exception:
        removeNodes(node)
        raise
    if node.GetNumberOfControlPoints() == 0 or max(node.GetSize()) <= 0:
        removeNodes(node)
        raise ValueError("%s holds no ROI (is it a Markups ROI saved by Slicer 5?)." % path)
    return node


def saveVolume(node, path):
    return _write(node, "vtkMRMLVolumeArchetypeStorageNode", path)


def saveROI(node, path):
    return _write(node, "vtkMRMLMarkupsROIJsonStorageNode", path)


def saveSegmentation(node, path):
    """.seg.nrrd (Slicer's segmentation file, segment names and colours kept)."""
    return _write(node, "vtkMRMLSegmentationStorageNode", path)


def loadSegmentation(path):
    node = _scene().AddNewNodeByClass("vtkMRMLSegmentationNode", fileStem(path))
    return _read(node, "vtkMRMLSegmentationStorageNode", os.path.abspath(path), "segmentation")
