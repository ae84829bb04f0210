"""One slice of a segment from a 2D result (the SAM effect's write), on real MRML nodes: which
slices a view shows, clicks to slice pixels, and writes that follow the Segment Editor's masking
settings and undo."""
import numpy as np
import pytest

from slicer_scene import GEOMETRIES, addVolume, scene, slicer  # noqa: F401
from SAMFineTuneMRML import geometry, segments, slices

SHAPE = (6, 20, 24)  # k, j, i


def slice_to_ras(volume, ijk_axis, tilt_degrees=0.0):
    """A view whose normal runs along one IJK axis of the volume (tilted by ``tilt_degrees``)."""
    axes = geometry.volumeIJKToRAS(volume)[:3, :3]
    axes = axes / np.linalg.norm(axes, axis=0)
    normal = axes[:, ijk_axis]
    inplane = axes[:, (ijk_axis + 1) % 3]
    if tilt_degrees:
        normal = np.cos(np.radians(tilt_degrees)) * normal + np.sin(np.radians(tilt_degrees)) * inplane
    matrix = np.eye(4)
    matrix[:3, 0] = inplane
    matrix[:3, 2] = normal
    matrix[:3, 1] = np.cross(normal, inplane)
    return matrix


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_a_view_along_an_ijk_axis_shows_that_engine_axis_and_an_oblique_one_is_refused(scene, name):
    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES[name])
    for ijk_axis, expected in ((2, "axial"), (1, "coronal"), (0, "sagittal")):
        assert slices.viewAxis(slice_to_ras(volume, ijk_axis), volume) == expected
    with pytest.raises(ValueError, match="not aligned"):
        slices.viewAxis(slice_to_ras(volume, 2, tilt_degrees=5.0), volume)
    node = scene.AddNewNodeByClass("vtkMRMLSliceNode")
    node.GetSliceToRAS().DeepCopy(geometry.arrayToMatrix(slice_to_ras(volume, 1)))
    assert slices.sliceNodeAxis(node, volume) == "coronal"


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_a_click_lands_on_the_slice_pixel_of_the_voxel_under_it(scene, name):
    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES[name])
    i, j, k = 17, 6, 4
    ras = (geometry.volumeIJKToRAS(volume) @ np.array([i + 0.2, j - 0.3, k + 0.1, 1.0]))[:3]
    expected = {"axial": (k, (i, j)), "coronal": (j, (i, k)), "sagittal": (i, (j, k))}
    for axis, (index, point) in expected.items():
        got_index, got_point = slices.rasToSlicePoint(ras, volume, axis)
        assert got_index == index and np.allclose(np.round(got_point), point), axis
        assert slices.sliceShape(volume, axis) == np.take(np.zeros(SHAPE), 0, axis=slices.arrayAxis(axis)).shape


def setup(scene, name="oblique"):
    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES[name], name="CT")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segments.prepareSegmentation(node, volume)
    target = segments.ensureSegment(node, segmentName="liver")
    neighbour = segments.ensureSegment(node, segmentName="kidney")
    before = np.zeros(SHAPE, np.uint8)
    before[1:5, 3:9, 3:9] = 1  # on slices 1-4
    kidney = np.zeros(SHAPE, np.uint8)
    kidney[2:4, 10:16, 12:20] = 1
    slicer.util.updateSegmentBinaryLabelmapFromArray(before, node, target, volume)
    slicer.util.updateSegmentBinaryLabelmapFromArray(kidney, node, neighbour, volume)
    return volume, node, target, neighbour, before, kidney


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
@pytest.mark.parametrize("grid", ["volume", "oversampled", "transformed"])
def test_one_slice_of_a_segment_read_alone_is_that_slice_of_the_whole(scene, name, grid):
    """A click reads its slice of the segment; resampling only that slice must give what the whole
    segment resampled gives there, on any geometry, a finer segmentation grid, under a transform,
    beside another segment of the same layer, and past the segment's extent."""
    from slicer_scene import addLinearTransform, rotation

    volume = addVolume(np.zeros(SHAPE, np.float32), GEOMETRIES[name], name="CT")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    if grid == "transformed":
        move = np.eye(4)
        move[:3, :3], move[:3, 3] = rotation(2, 20.0), (4.0, 2.0, -3.0)
        node.SetAndObserveTransformNodeID(addLinearTransform(scene, move).GetID())
    segments.prepareSegmentation(node, volume)
    if grid == "oversampled":
        oversampled(node)
    liver = np.zeros(SHAPE, np.uint8)
    liver[1:5, 3:9, 3:9] = 1
    kidney = np.zeros(SHAPE, np.uint8)
    kidney[2:4, 10:16, 12:20] = 1
    target = segments.ensureSegment(node, segmentName="liver")
    segments.writeMaskToSegment(liver, volume, node, target)
    segments.writeMaskToSegment(kidney, volume, node, segments.ensureSegment(node, segmentName="kidney"))
    node.GetSegmentation().CollapseBinaryLabelmaps(False)  # as the Segment Editor keeps them
    assert node.GetSegmentation().GetNumberOfLayers() == 1  # the two share a layer, by label value
    whole = np.asarray(slicer.util.arrayFromSegmentBinaryLabelmap(node, target, volume)) > 0  # Slicer's own reading
    assert np.array_equal(whole, liver > 0) and np.array_equal(segments.segmentToArray(node, target, volume), whole)
    for axis in ("axial", "coronal", "sagittal"):
        for index in range(whole.shape[slices.arrayAxis(axis)]):  # slices 0 and 5 lie past the liver
            alone = slices.segmentSlice(node, target, volume, axis, index)
            assert np.array_equal(alone, whole.take(index, axis=slices.arrayAxis(axis))), (axis, index)


def result_on(axis, index, mask2d):
    out = np.zeros(SHAPE, np.uint8)
    np.moveaxis(out, slices.arrayAxis(axis), 0)[index] = mask2d
    return out


@pytest.mark.parametrize("axis,index", [("axial", 2), ("coronal", 12), ("sagittal", 14)])
@pytest.mark.parametrize("overwrite", ["none", "all"])
def test_a_slice_result_replaces_that_slice_only_and_follows_overwrite_other_segments(scene, axis, index, overwrite):
    volume, node, target, neighbour, before, kidney = setup(scene)
    modify = slices.EditorModifier(scene, node, volume, target)
    editor = modify.editorNode
    editor.SetOverwriteMode(editor.OverwriteNone if overwrite == "none" else editor.OverwriteAllSegments)
    mask = np.zeros(slices.sliceShape(volume, axis), np.uint8)
    mask[1:14, 4:18] = 1  # crosses the kidney on its slices
    assert modify.saveStateForUndo()
    slices.writeSlice(modify, mask, volume, node, axis, index)
    written = result_on(axis, index, mask)
    on_slice = result_on(axis, index, np.ones_like(mask)) > 0
    expected = np.where(on_slice, written, before)
    assert np.array_equal(segments.segmentToArray(node, target, volume), expected > 0)
    kidney_after = segments.segmentToArray(node, neighbour, volume)
    if overwrite == "none":
        assert np.array_equal(kidney_after, kidney > 0)
    else:
        assert np.array_equal(kidney_after, (kidney > 0) & ~(written > 0))
        assert ((kidney > 0) & (written > 0)).any()  # the case does test an overlap
    modify.undo()
    assert np.array_equal(segments.segmentToArray(node, target, volume), before > 0)
    assert np.array_equal(segments.segmentToArray(node, neighbour, volume), kidney > 0)


def test_a_slice_result_stays_inside_the_editable_area(scene):
    volume, node, target, neighbour, before, kidney = setup(scene, "identity")
    modify = slices.EditorModifier(scene, node, volume, target)
    modify.editorNode.SetMaskMode(slicer.vtkMRMLSegmentationNode.EditAllowedInsideSingleSegment)
    modify.editorNode.SetMaskSegmentID(neighbour)
    modify.editorNode.SetOverwriteMode(modify.editorNode.OverwriteNone)
    mask = np.ones(slices.sliceShape(volume, "axial"), np.uint8)
    slices.writeSlice(modify, mask, volume, node, "axial", 3)
    after = segments.segmentToArray(node, target, volume)
    assert np.array_equal(after[3], (kidney[3] > 0) | (before[3] > 0))  # changed inside the kidney only
    assert np.array_equal(np.delete(after, 3, axis=0), np.delete(before, 3, axis=0) > 0)


def oversampled(node):
    """Give the segmentation a grid twice as fine as its volume's (Segment Editor, "Specify geometry")."""
    converter = slicer.vtkSegmentationConverter
    segmentation = node.GetSegmentation()
    image = slicer.vtkOrientedImageData()
    converter.DeserializeImageGeometry(segmentation.GetConversionParameter(
        converter.GetReferenceImageGeometryParameterName()), image, False)
    spacing, extent = image.GetSpacing(), image.GetExtent()
    image.SetSpacing(*(value / 2 for value in spacing))
    image.SetExtent(0, 2 * extent[1] + 1, 0, 2 * extent[3] + 1, 0, 2 * extent[5] + 1)
    segmentation.SetConversionParameter(converter.GetReferenceImageGeometryParameterName(),
                                        converter.SerializeImageGeometry(image))


def test_a_slice_result_lands_on_an_oversampled_segmentation_within_the_intensity_range(scene):
    intensities = np.zeros(SHAPE, np.float32)
    intensities[:, :, 12:] = 100
    volume = addVolume(intensities, GEOMETRIES["identity"], name="CT")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "seg")
    segments.prepareSegmentation(node, volume)
    oversampled(node)
    target = segments.ensureSegment(node, segmentName="liver")
    modify = slices.EditorModifier(scene, node, volume, target)
    modify.editorNode.SetSourceVolumeIntensityMask(True)
    modify.editorNode.SetSourceVolumeIntensityMaskRange(50, 150)
    mask = np.ones(slices.sliceShape(volume, "axial"), np.uint8)
    slices.writeSlice(modify, mask, volume, node, "axial", 2, reference=modify.defaultModifierLabelmap())
    written = segments.segmentToArray(node, target, volume)
    assert np.array_equal(written[2], intensities[2] > 50) and not np.delete(written, 2, axis=0).any()


def test_a_result_of_the_wrong_size_is_refused_before_anything_is_written(scene):
    volume, node, target, neighbour, before, kidney = setup(scene)
    modify = slices.EditorModifier(scene, node, volume, target)
    with pytest.raises(ValueError, match="axial slice of 'CT' is \\(20, 24\\) pixels"):
        slices.writeSlice(modify, np.ones((5, 5)), volume, node, "axial", 2)
    assert np.array_equal(segments.segmentToArray(node, target, volume), before > 0)


def test_several_slices_written_at_once_leave_the_others_and_undo_together(scene):
    volume, node, target, neighbour, before, kidney = setup(scene)
    modify = slices.EditorModifier(scene, node, volume, target)
    modify.saveStateForUndo()
    planes = {index: np.zeros(slices.sliceShape(volume, "axial"), np.uint8) for index in (1, 3, 4)}  # 2 is locked
    for index, plane in planes.items():
        plane[index:index + 5, 2:12] = 1
    slices.writeSlices(modify, planes, volume, node, "axial")
    after = segments.segmentToArray(node, target, volume)
    for index in range(SHAPE[0]):
        expected = planes[index] > 0 if index in planes else before[index] > 0
        assert np.array_equal(after[index], expected), index
    modify.undo()
    assert np.array_equal(segments.segmentToArray(node, target, volume), before > 0)
    with pytest.raises(ValueError, match="Slice 9 is outside"):
        slices.writeSlices(modify, {9: planes[1]}, volume, node, "axial")
