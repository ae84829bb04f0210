"""Mask -> segment on real MRML nodes (slicer-core): geometry, what survives, undo."""
import numpy as np
import vtk
import pytest

from slicer_scene import GEOMETRIES, addLinearTransform, addVolume, rotation, scene, slicer  # noqa: F401
from SAMFineTuneMRML import geometry, segments

SHAPE = (6, 20, 24)
BOX = (3, 4, 1, 12, 13, 4)


def block(shape=SHAPE, k=slice(None), j=slice(None), i=slice(None)):
    out = np.zeros(shape, np.uint8)
    out[k, j, i] = 1
    return out


def setup_scene(scene, matrix):
    volume = addVolume(np.zeros(SHAPE, np.float32), matrix, name="CT")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segments.prepareSegmentation(node, volume)
    target = segments.ensureSegment(node, segmentName="liver")
    other = segments.ensureSegment(node, segmentName="spleen")
    before = block(k=slice(0, 6), j=slice(0, 3), i=slice(0, 4))  # outside the box
    before[2, 6, 5] = 1  # inside the box: replaced
    slicer.util.updateSegmentBinaryLabelmapFromArray(before, node, target, volume)
    spleen = block(k=slice(1, 4), j=slice(8, 15), i=slice(9, 16))  # overlaps the box
    slicer.util.updateSegmentBinaryLabelmapFromArray(spleen, node, other, volume)
    return volume, node, target, other, before, spleen


def expected_after(before, mask, box=BOX):
    out = before.copy()
    region = geometry.RoiBox(box, box).slices()
    out[region] = mask[region]
    return out


def test_a_result_is_written_through_images_of_its_box_only(scene, monkeypatch):
    """A whole CT's worth of labelmap per write (150 MB at 512 x 512 x 600) would cost memory and
    time for voxels the result does not change: the ROI's box, or a click's slices, are built alone."""
    from SAMFineTuneMRML import slices

    volume, node, target, other, before, spleen = setup_scene(scene, GEOMETRIES["oblique"])
    built = []
    original = segments.orientedImageFromMask

    def recorded(mask, *args, **kwargs):
        image = original(mask, *args, **kwargs)
        built.append(tuple(image.GetExtent()))
        return image

    monkeypatch.setattr(segments, "orientedImageFromMask", recorded)
    monkeypatch.setattr(slices, "orientedImageFromMask", recorded)
    mask = block(k=slice(1, 5), j=slice(5, 12), i=slice(4, 11))
    segments.writeMaskToSegment(mask, volume, node, target, BOX)
    assert built == [(3, 12, 4, 13, 1, 4)]
    assert np.array_equal(segments.segmentToArray(node, target, volume), expected_after(before, mask))
    modify = slices.EditorModifier(scene, node, volume, target)
    plane = np.ones(slices.sliceShape(volume, "coronal"), np.uint8)
    built.clear()  # reading the segment back builds its own (whole) grid
    slices.writeSlices(modify, {7: plane, 9: plane}, volume, node, "coronal")
    assert built == [(0, 23, 7, 9, 0, 5)] * 2  # slices 7..9 along j, whole in-plane
    written = segments.segmentToArray(node, target, volume)
    assert written[:, [7, 9], :].all() and np.array_equal(written[:, 8, :], expected_after(before, mask)[:, 8, :] > 0)
    # onto the Segment Editor's own grid (the whole volume's), only the part the slice covers
    seen = []

    def recording(labelmap, mode, extent):
        seen.append((tuple(labelmap.GetExtent()), tuple(extent)))
        modify(labelmap, mode, extent)

    slices.writeSlices(recording, {12: 1 - plane}, volume, node, "coronal", reference=modify.defaultModifierLabelmap())
    assert seen == [((0, 23, 11, 13, 0, 5), (0, 23, 11, 13, 0, 5))] * 2  # slice 12 and one more each side
    assert not segments.segmentToArray(node, target, volume)[:, 12, :].any()


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_mask_lands_in_box_with_the_volume_geometry_and_the_rest_survives(scene, name):
    volume, node, target, other, before, spleen = setup_scene(scene, GEOMETRIES[name])
    mask = block(k=slice(1, 5), j=slice(5, 12), i=slice(4, 11))
    mask[0, 0, 23] = 1  # outside the box: must not be written
    segments.writeMaskToSegment(mask, volume, node, target, BOX)
    assert np.array_equal(segments.segmentToArray(node, target, volume), expected_after(before, mask))
    assert np.array_equal(segments.segmentToArray(node, other, volume), spleen)
    # the segment's labelmap is on the volume's lattice (no resampling, no half-voxel shift)
    labelmap = slicer.vtkOrientedImageData()
    node.GetBinaryLabelmapRepresentation(target, labelmap)
    matrix = vtk.vtkMatrix4x4()
    labelmap.GetImageToWorldMatrix(matrix)
    assert np.allclose(geometry.matrixToArray(matrix), GEOMETRIES[name])


def test_whole_volume_write_and_a_new_segmentation_gets_the_volume_geometry(scene):
    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES["oblique"])
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segments.prepareSegmentation(node, volume)
    assert node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()) is volume
    target = segments.ensureSegment(node, segmentName="new")
    mask = block(k=slice(2, 4), j=slice(0, 20), i=slice(7, 9))
    segments.writeMaskToSegment(mask, volume, node, target)
    assert np.array_equal(segments.segmentToArray(node, target, volume), mask)
    assert segments.ensureSegment(node, segmentName="new") == target  # found by name, not duplicated
    with pytest.raises(ValueError, match="no segment with ID"):
        segments.ensureSegment(node, segmentId="nope")
    with pytest.raises(ValueError, match="does not match volume"):
        segments.writeMaskToSegment(mask[:, :, :-1], volume, node, target)


def test_segmentation_under_a_different_transform_than_the_volume(scene):
    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES["anisotropic"])
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    move = np.eye(4)
    move[:3, :3] = rotation(2, 20.0)
    move[:3, 3] = (4.0, 2.0, -3.0)
    node.SetAndObserveTransformNodeID(addLinearTransform(scene, move).GetID())
    segments.prepareSegmentation(node, volume)
    target = segments.ensureSegment(node, segmentName="moved")
    mask = block(k=slice(1, 5), j=slice(5, 12), i=slice(4, 11))
    segments.writeMaskToSegment(mask, volume, node, target, BOX)
    # read back on the volume's grid through both transforms: the same voxels
    assert np.array_equal(segments.segmentToArray(node, target, volume), mask)


def test_the_undo_history_of_a_deleted_segmentation_is_let_go(scene):
    from SAMFineTuneMRML.scene import removeNodes

    volume, node, target, other, before, spleen = setup_scene(scene, GEOMETRIES["flipped"])
    history = segments.UndoHistory()
    segments.writeMaskToSegment(before, volume, node, target, BOX, history=history.forNode(node))
    segmentation = node.GetSegmentation()
    removeNodes(node)
    del node
    held = segmentation.GetReferenceCount()
    history.forNode(scene.AddNewNodeByClass("vtkMRMLSegmentationNode"))
    assert segmentation.GetReferenceCount() < held


def test_one_undo_restores_the_segment_and_leaves_the_others(scene):
    volume, node, target, other, before, spleen = setup_scene(scene, GEOMETRIES["flipped"])
    history = segments.UndoHistory()
    undo = history.forNode(node)
    assert not history.undo(node)  # nothing to undo yet
    mask = block(k=slice(1, 5), j=slice(5, 12), i=slice(4, 11))
    states = undo.GetNumberOfStates()
    segments.writeMaskToSegment(mask, volume, node, target, BOX, history=undo)
    assert undo.GetNumberOfStates() == states + 1  # one step
    assert not np.array_equal(segments.segmentToArray(node, target, volume), before)
    assert history.undo(node)
    assert np.array_equal(segments.segmentToArray(node, target, volume), before)
    assert np.array_equal(segments.segmentToArray(node, other, volume), spleen)
    assert history.redo(node)
    assert np.array_equal(segments.segmentToArray(node, target, volume), expected_after(before, mask))



def test_new_segments_written_one_after_another_keep_their_own_voxels(scene):
    """Empty new segments share a labelmap layer: each result must land in its own segment only,
    overlapping results included (the later one does not take voxels from the earlier)."""
    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES["oblique"], name="CT")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segments.prepareSegmentation(node, volume)
    boxes = {"kidney": (8, 8, 2, 12, 12, 5), "liver": (4, 5, 1, 15, 14, 4), "spleen": (1, 1, 0, 6, 6, 2),
             "tumour": (10, 10, 3, 13, 13, 4)}  # inside the liver's box
    ids = {name: segments.ensureSegment(node, segmentName=name) for name in boxes}
    masks = {name: block(k=slice(b[2], b[5] + 1), j=slice(b[1], b[4] + 1), i=slice(b[0], b[3] + 1))
             for name, b in boxes.items()}
    for name, box in boxes.items():
        segments.writeMaskToSegment(masks[name], volume, node, ids[name], box)
    for name in boxes:
        assert np.array_equal(segments.segmentToArray(node, ids[name], volume), masks[name] > 0), name


def test_a_segment_held_as_a_closed_surface_is_read_through_slicers_conversion(scene):
    """No labelmap to resample (a segmentation loaded from a surface model): Slicer converts it."""
    from SAMFineTuneMRML import slices

    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES["identity"], name="CT")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    node.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    node.SetSourceRepresentationToClosedSurface()
    sphere = vtk.vtkSphereSource()
    sphere.SetCenter(12.0, 10.0, 2.5)
    sphere.SetRadius(3.0)
    sphere.SetThetaResolution(30)
    sphere.SetPhiResolution(30)
    sphere.Update()
    ball = node.AddSegmentFromClosedSurfaceRepresentation(sphere.GetOutput(), "ball")
    assert node.GetBinaryLabelmapInternalRepresentation(ball) is None
    whole = segments.segmentToArray(node, ball, volume)
    assert whole.sum() > 50 and np.array_equal(whole, np.asarray(
        slicer.util.arrayFromSegmentBinaryLabelmap(node, ball, volume)) > 0)
    assert np.array_equal(slices.segmentSlice(node, ball, volume, "axial", 2), whole[2])
