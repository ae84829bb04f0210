"""Volume/ROI geometry on real MRML nodes (slicer-core): arrays, IJK-to-RAS, ROI -> IJK box."""
import logging

import numpy as np
import pytest

from slicer_scene import (GEOMETRIES, addLinearTransform, addROI, addVolume, ijkToRAS, rotation, scene,  # noqa: F401
                          slicer, voxelsInROI)
from SAMFineTuneMRML import geometry

SHAPE = (7, 18, 22)  # k, j, i


def ramp(shape=SHAPE):
    return np.arange(np.prod(shape), dtype=np.int16).reshape(shape)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_volume_to_array_keeps_voxels_and_geometry(scene, name):
    array = ramp()
    volume = addVolume(array, GEOMETRIES[name])
    out, matrix = geometry.volumeToArray(volume)
    assert out.shape == SHAPE and np.array_equal(out, array)
    assert np.allclose(matrix, GEOMETRIES[name])
    out[0, 0, 0] = 999  # a copy: the node's voxels do not change
    assert slicer.util.arrayFromVolume(volume)[0, 0, 0] == array[0, 0, 0]


def test_volume_parent_transform_is_in_world_matrix_and_lps_geometry(scene):
    volume = addVolume(ramp(), GEOMETRIES["anisotropic"])
    move = np.eye(4)
    move[:3, :3] = rotation(2, 30.0)
    move[:3, 3] = (5.0, -7.0, 11.0)
    volume.SetAndObserveTransformNodeID(addLinearTransform(scene, move).GetID())
    assert np.allclose(geometry.volumeIJKToRAS(volume, world=True), move @ GEOMETRIES["anisotropic"])
    assert np.allclose(geometry.volumeIJKToRAS(volume, world=False), GEOMETRIES["anisotropic"])
    spacing, origin, direction = geometry.volumeGeometryLPS(volume)
    world = move @ GEOMETRIES["anisotropic"]
    assert np.allclose(spacing, (0.6, 0.9, 5.0))
    assert np.allclose(origin, world[:3, 3] * (-1, -1, 1))
    assert np.allclose(np.reshape(direction, (3, 3)), np.diag([-1, -1, 1]) @ world[:3, :3] / spacing)


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_roi_aligned_with_volume_gives_exactly_its_voxels(scene, name):
    volume = addVolume(ramp(), GEOMETRIES[name])
    box = (3, 4, 1, 15, 12, 5)
    roi = addROI(scene, volume, box)
    result = geometry.roiToIJKBox(roi, volume)
    assert result.box == box and not result.clipped and result.warning is None
    inside = voxelsInROI(roi, volume)
    assert tuple(inside.min(axis=0)) + tuple(inside.max(axis=0)) == box
    assert len(inside) == 13 * 9 * 5


@pytest.mark.parametrize("name", ["identity", "oblique", "sagittal"])
def test_roi_in_any_orientation_covers_every_voxel_inside_it(scene, name):
    volume = addVolume(ramp((12, 30, 30)), GEOMETRIES[name])
    centre = geometry.volumeIJKToRAS(volume) @ [15, 15, 6, 1]
    roi = addROI(scene, center=centre[:3], size=(14.0, 9.0, 11.0))
    tilt = np.eye(4)
    tilt[:3, :3] = rotation(0, 35.0) @ rotation(1, 20.0)
    tilt[:3, 3] = centre[:3]
    roi.GetObjectToNodeMatrix().DeepCopy(geometry.arrayToMatrix(tilt))
    result = geometry.roiToIJKBox(roi, volume)
    inside = voxelsInROI(roi, volume)
    assert len(inside) > 20
    lo, hi = np.array(result.box[:3]), np.array(result.box[3:])
    assert np.all(inside >= lo) and np.all(inside <= hi)
    # tight: the box is the IJK bounding box of the ROI's 8 corners (computed here independently
    # from the ROI's object-to-world matrix), shrunk to voxel centres
    corners = np.array([[sx, sy, sz, 1.0] for sx in (-7.0, 7.0) for sy in (-4.5, 4.5) for sz in (-5.5, 5.5)])
    world = geometry.matrixToArray(roi.GetObjectToWorldMatrix()) @ corners.T
    ijk = (np.linalg.inv(geometry.volumeIJKToRAS(volume)) @ world)[:3]
    last = np.array([29, 29, 11])
    assert tuple(lo) == tuple(np.clip(np.ceil(ijk.min(axis=1)), 0, last).astype(int))
    assert tuple(hi) == tuple(np.clip(np.floor(ijk.max(axis=1)), 0, last).astype(int))


def test_thick_slices_are_not_off_by_one(scene):
    # 5 mm slices with centres at z = 0, 5, 10, ...; an ROI from z=6.5 to z=13.9 contains only
    # the centre z=10 (k=2). Rounding the corners to the nearest slice would give k=1..3.
    volume = addVolume(ramp((8, 10, 10)), ijkToRAS((1.0, 1.0, 5.0)))
    roi = addROI(scene, center=(4.5, 4.5, (6.5 + 13.9) / 2), size=(9.0, 9.0, 13.9 - 6.5))
    assert geometry.roiToIJKBox(roi, volume).box == (0, 0, 2, 9, 9, 2)
    # boundaries exactly on voxel centres include them
    roi.SetCenter(4.5, 4.5, 10.0)
    roi.SetSize(9.0, 9.0, 10.0)
    assert geometry.roiToIJKBox(roi, volume).box[2::3] == (1, 3)
    # an ROI thinner than a slice, between two centres, means the nearest slice
    roi.SetCenter(4.5, 4.5, 16.2)
    roi.SetSize(9.0, 9.0, 1.0)
    assert geometry.roiToIJKBox(roi, volume).box[2::3] == (3, 3)


def test_flipped_volume_box_is_ordered_and_exact(scene):
    volume = addVolume(ramp(), GEOMETRIES["flipped"])
    box = (2, 5, 0, 9, 16, 3)
    corners = [geometry.volumeIJKToRAS(volume) @ [i, j, k, 1] for i, j, k in ((2, 5, 0), (9, 16, 3))]
    lo, hi = np.minimum(*corners)[:3], np.maximum(*corners)[:3]
    spacing = np.array([0.8, 0.8, 2.5])
    roi = addROI(scene, center=(lo + hi) / 2, size=hi - lo + spacing)  # half a voxel beyond each centre
    assert geometry.roiToIJKBox(roi, volume).box == box


def test_parent_transform_on_roi_and_on_volume(scene):
    volume = addVolume(ramp((10, 24, 24)), GEOMETRIES["anisotropic"])
    roi = addROI(scene, volume, (4, 5, 2, 14, 16, 6))
    expected = voxelsInROI(roi, volume)
    move = np.eye(4)
    move[:3, :3] = rotation(2, 12.0)
    move[:3, 3] = (2.5, -1.5, 4.0)
    transform = addLinearTransform(scene, move)
    roi.SetAndObserveTransformNodeID(transform.GetID())
    moved = voxelsInROI(roi, volume)  # brute force sees the transformed ROI
    assert not np.array_equal(moved.min(axis=0), expected.min(axis=0))
    result = geometry.roiToIJKBox(roi, volume)
    assert np.all(moved >= result.box[:3]) and np.all(moved <= result.box[3:])
    assert np.all(np.array(result.box[:3]) >= moved.min(axis=0) - 1)
    assert np.all(np.array(result.box[3:]) <= moved.max(axis=0) + 1)
    # the same transform on the volume too: back to the original box
    volume.SetAndObserveTransformNodeID(transform.GetID())
    assert geometry.roiToIJKBox(roi, volume).box == (4, 5, 2, 14, 16, 6)


def test_roi_partly_outside_is_clipped_with_a_warning(scene, caplog):
    volume = addVolume(ramp(), ijkToRAS((1.0, 1.0, 2.0)))
    roi = addROI(scene, center=(18.0, 8.0, 6.0), size=(10.0, 30.0, 4.0), name="liver box")
    with caplog.at_level(logging.WARNING):
        result = geometry.roiToIJKBox(roi, volume)
    assert result.clipped
    assert result.box == (13, 0, 2, 21, 17, 4)
    assert result.unclippedBox[4] > 17 and result.unclippedBox[1] < 0 and result.unclippedBox[3] > 21
    assert "liver box" in result.warning and "outside" in result.warning
    assert any("liver box" in r.getMessage() for r in caplog.records)


def test_roi_wholly_outside_is_a_clear_error(scene):
    volume = addVolume(ramp(), ijkToRAS((1.0, 1.0, 2.0)), name="CT")
    roi = addROI(scene, center=(200.0, 8.0, 6.0), size=(10.0, 10.0, 4.0), name="far away")
    with pytest.raises(ValueError, match="far away.*entirely outside volume 'CT'.*i 195..205"):
        geometry.roiToIJKBox(roi, volume)


def test_missing_or_unplaced_inputs_are_clear_errors(scene):
    volume = addVolume(ramp())
    with pytest.raises(ValueError, match="not placed"):
        geometry.roiToIJKBox(scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "empty"), volume)
    with pytest.raises(ValueError, match="No ROI"):
        geometry.roiToIJKBox(None, volume)
    with pytest.raises(ValueError, match="No input volume"):
        geometry.roiToIJKBox(addROI(scene, volume, (0, 0, 0, 3, 3, 3)), None)
    with pytest.raises(ValueError, match="no voxels"):
        geometry.volumeToArray(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "unloaded"))


@pytest.mark.parametrize("name,expected", [("identity", ("axial", "coronal", "sagittal")),
                                           ("flipped", ("axial", "coronal", "sagittal")),
                                           ("sagittal", ("coronal", "sagittal", "axial"))])
def test_anatomical_axis_maps_to_the_array_axis_of_the_acquisition(scene, name, expected):
    volume = addVolume(ramp(), GEOMETRIES[name])
    assert tuple(geometry.engineAxis(volume, axis) for axis in ("axial", "coronal", "sagittal")) == expected
    with pytest.raises(ValueError, match="Unknown slicing axis"):
        geometry.engineAxis(volume, "oblique")


def test_view_region_box_covers_what_the_view_shows_around_the_slice(scene):
    volume = addVolume(ramp((20, 40, 50)), ijkToRAS((1.0, 1.0, 2.5)))
    # an axial view showing x 10..30, y 5..60 (beyond the volume) at z = 25 (k = 10)
    corners = [(x, y, 25.0) for x in (10.0, 30.0) for y in (5.0, 60.0)]
    box = geometry.viewRegionBox(volume, corners, halfDepthMm=5.0)
    assert box == (10, 5, 8, 30, 39, 12)
    roi = addROI(scene, volume, box)
    assert geometry.roiToIJKBox(roi, volume).box == box
    with pytest.raises(ValueError, match="does not show volume"):
        geometry.viewRegionBox(volume, [(x, y, 500.0) for x in (0.0, 9.0) for y in (0.0, 9.0)])
