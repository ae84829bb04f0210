"""Prompt options (zoom, tri-planar) and tracking's tuning: one definition in the catalogue, the
crop geometry zoom encodes, and each option reaching the engine from the command line and the worker."""
import argparse
import dataclasses
import inspect

import numpy as np
import pytest

from SAMFineTuneLib import catalogue, zoom
from SAMFineTuneLib.segmenter import Segmenter
from SAMFineTuneLib.tracking import TrackingOptions

from oracle_model import OracleModel
from test_segmenter import WINDOW, dice, oblique_phantom


def test_every_default_comes_from_the_catalogue():
    assert dataclasses.asdict(TrackingOptions()) == {k: v for k, v in catalogue.TRACKING_DEFAULTS.items()}
    parameters = inspect.signature(Segmenter.segment).parameters
    for name in ("axis", "window", "box_mode", "keep_largest", "fill_holes", *catalogue.PROMPT_OPTIONS):
        assert parameters[name].default == catalogue.SEGMENT_DEFAULTS[name], name
    from SAMFineTuneLib.worker.jobs import SEGMENT_PARAMS

    assert all(SEGMENT_PARAMS[name] == catalogue.SEGMENT_DEFAULTS[name] for name in catalogue.PROMPT_OPTIONS)


@pytest.mark.parametrize("roi, spacing", [((240, 250, 259, 269), (0.8, 0.8)), ((10, 480, 29, 499), (0.8, 0.8)),
                                          ((100, 200, 139, 219), (0.7, 1.4))])
def test_a_small_roi_is_encoded_from_a_square_crop_around_it(roi, spacing):
    """A 20-40 pixel ROI on a 512-pixel slice: the crop holds the ROI, lies inside the slice, is square
    in millimetres, at least ZOOM_CONTEXT times the ROI and within one size step of it."""
    r0, r1, c0, c1 = zoom.crop_region((512, 512), spacing, roi, 256)
    x0, y0, x1, y1 = roi
    assert 0 <= r0 <= y0 and y1 < r1 <= 512 and 0 <= c0 <= x0 and x1 < c1 <= 512
    height_mm, width_mm = (r1 - r0) * spacing[0], (c1 - c0) * spacing[1]
    assert height_mm == pytest.approx(width_mm, abs=max(spacing))
    longest_mm = max((y1 - y0 + 1) * spacing[0], (x1 - x0 + 1) * spacing[1])
    need_mm = max(zoom.ZOOM_CONTEXT * longest_mm, 256 / zoom.MAX_UPSAMPLING * min(spacing))
    assert need_mm <= height_mm + max(spacing) < need_mm * 2 ** (1 / 4) + 2 * max(spacing)


def test_a_roi_near_the_slices_size_encodes_the_whole_slice():
    assert zoom.crop_region((128, 128), (1.0, 1.0), (10, 10, 100, 100), 256) is None


def test_rois_a_few_voxels_apart_share_one_crop_and_its_embeddings():
    first = zoom.crop_region((512, 512), (0.8, 0.8), (240, 250, 269, 279), 256)
    assert zoom.crop_region((512, 512), (0.8, 0.8), (241, 251, 270, 280), 256) == first


def test_zoom_encodes_the_crop_and_finds_the_same_organ():
    """A 24-pixel box on a 160-pixel slice. The oracle model thresholds what it is given inside the
    box, so a crop that maps back to the slice wrongly moves the mask."""
    from SAMFineTuneLib.phantom import make_ct_phantom

    ct, label = make_ct_phantom(shape_kji=(8, 160, 160), spacing_xyz=(0.8, 0.8, 3.0), noise_hu=3.0, organ_hu=240.0)
    k, j, i = (int(np.median(a)) for a in np.nonzero(label.array))
    box = (i - 12, j - 12, 1, i + 11, j + 11, 6)
    whole = Segmenter(OracleModel()).segment(ct, box, window=WINDOW, box_mode="fixed")
    model = OracleModel()
    zoomed = Segmenter(model).segment(ct, box, window=WINDOW, box_mode="fixed", zoom=True)
    r0, r1, c0, c1 = zoom.crop_region((160, 160), (0.8, 0.8), box[:2] + box[3:5], 256)
    assert r1 - r0 < 160 and c1 - c0 < 160
    assert model.encode_calls == 6 and whole.mask.sum() > 1000 and dice(zoomed.mask, whole.mask) > 0.97


def test_triplanar_encodes_all_three_axes_and_votes():
    ct, label = oblique_phantom()
    box = (14, 8, 2, 38, 32, 11)
    model = OracleModel()
    result = Segmenter(model).segment(ct, box, window=WINDOW, box_mode="fixed", triplanar=True)
    sizes = [box[5] - box[2] + 1, box[4] - box[1] + 1, box[3] - box[0] + 1]
    assert model.encode_calls == sum(sizes)
    inside = np.zeros_like(label.array)
    inside[box[2]:box[5] + 1, box[1]:box[4] + 1, box[0]:box[3] + 1] = 1
    assert dice(result.mask, label.array * inside) > 0.95


def test_triplanar_with_an_adapter_is_refused_before_any_encoding():
    """An adapter learned one axis's slices: along the other two its answers would outvote its own."""
    ct, _ = oblique_phantom()
    model = OracleModel()
    segmenter = Segmenter(model)
    segmenter.adapters.path = "hippocampus_adapter"  # what set_adapter records
    with pytest.raises(ValueError, match="tri-planar voting is for the base model: the adapter hippocampus_adapter"):
        segmenter.segment(ct, (14, 8, 2, 38, 32, 11), window=WINDOW, triplanar=True)
    assert model.encode_calls == 0
    segmenter.adapters.path = None
    assert segmenter.segment(ct, (14, 8, 2, 38, 32, 11), window=WINDOW, triplanar=True).mask.any()


def test_the_command_line_refuses_triplanar_with_an_adapter_before_reading_or_loading(monkeypatch, tmp_path):
    from SAMFineTuneLib import segment_cli, segmenter, volume_io

    def never(*args, **kwargs):
        raise AssertionError("slow work started")

    monkeypatch.setattr(segmenter, "Segmenter", never)
    monkeypatch.setattr(volume_io, "read_volume", never)
    parser = argparse.ArgumentParser()
    segment_cli.add_segment_arguments(parser)
    args = parser.parse_args(["--volume", str(tmp_path / "ct.nii.gz"), "--box", *["1"] * 3, *["5"] * 3, "--output",
                              str(tmp_path / "m.nii.gz"), "--adapter", str(tmp_path / "adapter"), "--triplanar"])
    with pytest.raises(ValueError, match="tri-planar voting is for the base model: the adapter .*adapter learned"):
        segment_cli.segment_main(args)
    assert not (tmp_path / "m.nii.gz").exists()


def test_prompt_options_reach_the_engine_from_the_command_line(monkeypatch, tmp_path):
    from SAMFineTuneLib import segment_cli, segmenter
    from SAMFineTuneLib.volume_io import write_volume

    seen = {}

    class Recording:
        def __init__(self, *args, **kwargs):
            pass

        def segment(self, volume, box, **options):
            seen.update(options)
            return segmenter.SegmentationResult(np.zeros(volume.array.shape, np.uint8), [], {})

    monkeypatch.setattr(segmenter, "Segmenter", Recording)
    ct, _ = oblique_phantom()
    write_volume(ct, str(tmp_path / "ct.nii.gz"))
    parser = argparse.ArgumentParser()
    segment_cli.add_segment_arguments(parser)
    base = ["--volume", str(tmp_path / "ct.nii.gz"), "--box", "1", "1", "1", "5", "5", "5", "--quiet"]
    segment_cli.segment_main(parser.parse_args(base + ["--output", str(tmp_path / "a.nii.gz")]))
    assert {k: seen[k] for k in catalogue.PROMPT_OPTIONS} == {k: False for k in catalogue.PROMPT_OPTIONS}
    segment_cli.segment_main(parser.parse_args(base + ["--output", str(tmp_path / "b.nii.gz"), "--zoom",
                                                       "--triplanar"]))
    assert seen["zoom"] is True and seen["triplanar"] is True


class RecordingCore:
    """A worker core whose segmenter records the options it is given."""

    def __init__(self):
        self.seen = {}

    def get_segmenter(self, **keys):
        return self

    def segment(self, volume, box, progress, cancel, **options):
        self.seen.update(options)
        return type("Result", (), {"mask": np.zeros(volume.array.shape, np.uint8), "slices": [], "stats": {}})


def segment_job(**params):
    """A worker's segment job on a small random volume, with these parameters besides its box."""

    class Job:
        id, command = "j1", "segment"
        volumes = type("Volumes", (), {"remember": lambda self, *a: None})()

        def take_params(self, defaults, **stored):
            return {**defaults, **stored, "box": [1, 1, 1, 5, 5, 5], **params}

        def arrays(self):
            return {"volume": np.random.default_rng(0).random((8, 8, 8), dtype=np.float32)}

        progress = cancelled = log = staticmethod(lambda *a, **k: None)

    return Job()


def test_prompt_options_reach_the_engine_from_the_worker():
    from SAMFineTuneLib.worker import jobs

    core = RecordingCore()
    jobs.segment(core, segment_job(zoom=True))
    assert core.seen["zoom"] is True and core.seen["triplanar"] is False


def test_the_worker_refuses_triplanar_with_an_adapter_before_loading_a_model():
    from SAMFineTuneLib.worker import jobs

    core = RecordingCore()
    core.get_segmenter = lambda **keys: pytest.fail("a model was loaded")
    with pytest.raises(ValueError, match="tri-planar voting is for the base model: the adapter spleen learned"):
        jobs.segment(core, segment_job(triplanar=True, adapter="spleen"))
