"""The worker running the real engine (LiteMedSAM on the CPU, small phantom volumes).

One worker serves the whole module (model and embedding cache stay warm, as in Slicer); the
crash test runs last and leaves a fresh worker behind.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from SAMFineTuneLib.client import JobError, WorkerClient, WorkerCrashed  # noqa: E402
from SAMFineTuneLib.phantom import bounding_box, make_ct_phantom  # noqa: E402
from SAMFineTuneLib.segmenter import Segmenter  # noqa: E402

torch.set_num_threads(1)
ENV = {"OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def phantom():
    ct, label = make_ct_phantom((6, 64, 64))
    return ct, bounding_box(label.array, (2, 2, 0))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    c = WorkerClient(log_path=str(tmp_path_factory.mktemp("worker") / "worker.log"), env=ENV)
    yield c
    c.shutdown()


def segment_params(ct, box, **extra):
    return dict({"box": list(box), "spacing": list(ct.spacing), "device": "cpu"}, **extra)


@pytest.mark.slow
def test_segment_and_reprompt_through_worker_equal_in_process(client, phantom):
    ct, box = phantom
    seg = Segmenter("litemedsam", device="cpu")
    expected = seg.segment(ct.array, box=box, spacing=ct.spacing)
    smaller = (box[0] + 3, box[1] + 3, box[2], box[3] - 3, box[4] - 3, box[5])
    expected_again = seg.segment(ct.array, box=smaller, spacing=ct.spacing)

    steps = []
    result, arrays = client.run("segment", segment_params(ct, box), {"volume": ct.array},
                                progress=lambda done, total, message: steps.append((done, total, message)),
                                timeout=600)
    assert arrays["mask"].dtype == np.uint8 and arrays["mask"].shape == ct.array.shape
    assert arrays["mask"].any() and np.array_equal(arrays["mask"], expected.mask)
    assert result["slices"] == expected.slices and result["voxels"] == int(expected.mask.sum())
    assert steps and steps[-1][0] == steps[-1][1] and any("encoding" in m for _, _, m in steps)

    # A re-prompt sends no volume, and the worker's embedding cache is warm: it encodes only what the
    # same two boxes had a fresh in-process Segmenter encode for the second one (planes the new box
    # crosses elsewhere, slices the first box did not need).
    result, arrays = client.run("reprompt", {"box": list(smaller)}, timeout=600)
    assert np.array_equal(arrays["mask"], expected_again.mask)
    assert result["stats"]["encoded"] == expected_again.stats["encoded"] < expected.stats["encoded"]
    assert result["stats"]["cache_hits"] == expected_again.stats["cache_hits"] > 0
    assert client.info()["model"] == "litemedsam"


def test_bad_model_requests_are_clear_errors_and_worker_keeps_serving(client, phantom, tmp_path):
    ct, box = phantom
    client.start()
    pid = client.worker_pid
    with pytest.raises(JobError, match="checkpoint file not found: .*sam_vit_b.pth"):
        client.run("load_model", {"model": "sam_vit_b", "checkpoint": str(tmp_path / "sam_vit_b.pth")}, timeout=120)
    with pytest.raises(JobError, match="unknown model 'sam_vit_x'"):
        client.run("load_model", {"model": "sam_vit_x"}, timeout=120)
    with pytest.raises(JobError, match="box"):
        client.run("segment", segment_params(ct, (0, 0, 0, 500, 5, 5)), {"volume": ct.array}, timeout=120)
    with pytest.raises(JobError, match="needs an array named 'volume'"):
        client.run("segment", segment_params(ct, box), timeout=120)
    result, _ = client.run("load_model", {"device": "cpu"}, timeout=120)
    assert result["model"] == "litemedsam" and result["fingerprint"] and client.worker_pid == pid


def test_segment_input_is_checked_before_the_model_loads(client):
    params = {"box": [2, 2, 0, 20, 20, 3], "model": "no-such-model", "device": "cpu"}
    volume = np.random.default_rng(3).normal(size=(4, 32, 32)).astype(np.float32)
    volume[0, 0, :2] = np.nan
    job = client.submit("segment", params, {"volume": volume})
    with pytest.raises(JobError, match=r"the volume has 2 NaN voxels \(of 4096\)"):
        client.wait(job, timeout=120)
    assert job.traceback is None
    with pytest.raises(JobError, match=r"every voxel inside the box \[2, 2, 0, 20, 20, 3\].* is 0: there is nothing"):
        client.run("segment", params, {"volume": np.zeros((4, 32, 32), np.int16)}, timeout=120)
    almost = np.zeros((4, 32, 32), np.int16)
    almost[1, 5, 5] = 50
    job = client.submit("segment", params, {"volume": almost})
    with pytest.raises(JobError, match="unknown model"):  # checked and warned about first, then the model
        client.wait(job, timeout=120)
    assert any("of the voxels inside the box" in line for line in job.logs)


def test_refine_and_propagate_through_the_worker_equal_in_process(client, phantom):
    """A click names its volume by key (sent once), continues from the slice's previous result,
    and a propagation never writes a locked slice; errors say what to send."""
    from SAMFineTuneLib.refinement import refine_slice

    ct, box = phantom
    k = (box[2] + box[5]) // 2
    base = {"volume_key": "phantom:1", "axis": "axial", "index": k, "device": "cpu", "spacing": list(ct.spacing)}
    slice_box = [box[0], box[1], box[3], box[4]]
    with pytest.raises(JobError, match=r"^UnknownVolume: this worker holds no volume 'phantom:1'"):
        client.run("refine", dict(base, box=slice_box), timeout=120)
    first, arrays = client.run("refine", dict(base, box=slice_box), {"volume": ct.array}, timeout=600)
    assert arrays["mask"].dtype == np.uint8 and arrays["mask"].shape == ct.array.shape[1:] and arrays["mask"].any()
    ys, xs = np.nonzero(arrays["mask"])
    negative = [float(xs[0]), float(ys[0]), 0]
    second, again = client.run("refine", dict(base, box=slice_box, points=[negative]), timeout=600)
    again = again["mask"]
    assert second["volume_key"] == "phantom:1" and 0 < second["voxels"]

    segmenter = Segmenter("litemedsam", device="cpu")
    expected = refine_slice(segmenter, ct, "axial", k, [], slice_box)
    assert np.array_equal(arrays["mask"], expected.mask)
    expected = refine_slice(segmenter, ct, "axial", k, [negative], slice_box, previous=expected)
    assert np.array_equal(again, expected.mask)

    locked = k + 1
    result, carried = client.run("propagate", dict(base, locked=[locked]), {"mask": again}, timeout=600)
    carried = carried["mask"]
    assert k not in result["slices"] and locked not in result["slices"] and not carried[k:].any()
    assert np.array_equal(carried, segmenter.propagate(ct, "axial", k, again, locked=[locked]).mask)
    roi = list(box[:2]) + [k - 1] + list(box[3:5]) + [k]  # the ROI's rectangle, two slices
    result, inside = client.run("propagate", dict(base, box=roi), {"mask": again}, timeout=600)
    assert result["slices"] == [k - 1] and not inside["mask"][:k - 1].any() and not inside["mask"][k + 1:].any()
    assert np.array_equal(inside["mask"], segmenter.propagate(ct, "axial", k, again, box=roi).mask)
    below = k - 2  # a second correction: the slice between is filled from the box between theirs
    result, filled = client.run("propagate", dict(base, locked=[below]), {"mask": again, "locked_masks": again[None]},
                                timeout=600)
    assert k - 1 in result["slices"] and below not in result["slices"] and not filled["mask"][[below, k]].any()
    assert np.array_equal(filled["mask"], segmenter.propagate(ct, "axial", k, again, locked=[below],
                                                              corrections={below: again}).mask)
    with pytest.raises(JobError, match=r"'locked_masks' must hold one rows x columns mask per entry of 'locked' \(1\)"):
        client.run("propagate", dict(base, locked=[below]), {"mask": again, "locked_masks": again}, timeout=120)

    with pytest.raises(JobError, match="needs an array named 'mask'"):
        client.run("propagate", base, timeout=120)
    with pytest.raises(JobError, match=r"'index' must be a slice number from 0 to 5 along axial, got 9"):
        client.run("refine", dict(base, index=9, box=slice_box), timeout=120)
    with pytest.raises(JobError, match=r"point 1 \(99, 1\) lies outside"):
        client.run("refine", dict(base, points=[[99, 1, 1]]), timeout=120)
    with pytest.raises(JobError, match=r"^ValueError: 'window' must be text .*got \[400, 40\]$"):
        client.run("refine", dict(base, window=[400, 40], box=slice_box), timeout=120)
    with pytest.raises(JobError, match=r"^ValueError: roi: box is outside the volume along k"):
        client.run("refine", dict(base, box=slice_box, roi=[0, 0, 0, 5, 5, 99]), timeout=120)


def test_cancel_long_segmentation_is_prompt_and_worker_stays_usable(client):
    volume = np.random.default_rng(0).integers(-200, 300, size=(60, 64, 64)).astype(np.int16)
    job = client.submit("segment", {"box": [10, 10, 0, 50, 50, 59], "box_mode": "fixed", "device": "cpu"},
                        {"volume": volume})
    deadline = time.monotonic() + 300
    while not job.message.startswith("encoding"):  # the encoder is busy
        assert time.monotonic() < deadline and not job.done, job
        client.poll(timeout=0.05)
    time.sleep(1.0)  # let the encoder get into a slice (one slice is ~1 s or more here)
    client.poll()
    pid = client.worker_pid
    started = time.monotonic()
    client.cancel(job)
    while not job.done:
        client.poll(timeout=0.05)
    stopped_in = time.monotonic() - started
    assert job.state == "cancelled" and job.result is None
    assert stopped_in < 3.0, f"cancel took {stopped_in:.2f} s"
    assert client.ping()["busy"] is None and client.worker_pid == pid


@pytest.mark.slow
def test_kill_9_mid_segmentation_then_next_job_succeeds_on_a_new_worker(client, phantom):
    ct, box = phantom
    volume = np.random.default_rng(1).integers(-200, 300, size=(40, 64, 64)).astype(np.int16)
    job = client.submit("segment", {"box": [10, 10, 0, 50, 50, 39], "box_mode": "fixed", "device": "cpu"},
                        {"volume": volume})
    while job.state != "running":
        client.poll(timeout=0.05)
    old_pid = client.worker_pid
    os.kill(old_pid, signal.SIGKILL)
    with pytest.raises(WorkerCrashed, match="killed by SIGKILL"):
        client.wait(job, timeout=60)
    with pytest.raises(JobError, match="holds no volume"):  # the new worker starts empty
        client.run("reprompt", {"box": list(box)}, timeout=120)
    small = ct.array[box[2]:box[5] + 1]  # only the box's slices: cheap
    shifted = (box[0], box[1], 0, box[3], box[4], box[5] - box[2])
    result, arrays = client.run("segment", segment_params(ct, shifted), {"volume": small}, timeout=600)
    assert client.worker_pid != old_pid and arrays["mask"].any() and result["stats"]["encoded"] > 0


@pytest.mark.slow
def test_export_train_evaluate_jobs_map_to_the_library(client, tmp_path):
    cases, arrays = [], {}
    for n in range(3):
        ct, label = make_ct_phantom((3, 48, 48), seed=n)
        arrays[f"img{n}"], arrays[f"lab{n}"] = ct.array, label.array
        cases.append({"id": f"case{n}", "image": f"img{n}", "label": f"lab{n}", "spacing": list(ct.spacing),
                      "origin": list(ct.origin), "direction": list(ct.direction)})
    # case0 segmented first: the worker holds its slices encoded, and training does not encode them again
    ct0 = make_ct_phantom((3, 48, 48), seed=0)[0]
    client.run("segment", segment_params(ct0, (0, 0, 0, 47, 47, 2)), {"volume": ct0.array}, timeout=600)
    dataset = tmp_path / "dataset"
    result, _ = client.run("export", {"cases": cases, "output_dir": str(dataset), "val_fraction": 0.34,
                                      "label_names": {"1": "organ"}}, arrays, timeout=300)
    assert (dataset / "dataset.json").is_file() and result["summary"]
    with pytest.raises(JobError, match="case 'x'.*no array 'nope'"):
        client.run("export", {"cases": [{"id": "x", "image": "nope", "label": "nope"}], "output_dir": str(dataset)},
                   timeout=120)

    steps = []
    job = client.submit("train", {"dataset": str(dataset), "output": str(tmp_path / "adapter"), "epochs": 1,
                                  "batch_size": 2, "device": "cpu", "final_scores": False, "amp": False})
    job.on_event = lambda event: steps.append(event)
    with pytest.raises(JobError, match="bad train parameters.*epoks"):
        client.run("train", {"dataset": str(dataset), "output": str(tmp_path / "a2"), "epoks": 1}, timeout=600)
    card, _ = client.wait(job, timeout=600)
    assert card["card"] and (tmp_path / "adapter").is_dir()
    stats = card["card"]["stats"]  # case0's slices training takes were read, not encoded
    assert 1 <= stats["cache_hits"] <= 3 and stats["encoder_calls"] >= 1
    assert any(e["event"] == "progress" for e in steps)

    report, _ = client.run("evaluate", {"dataset": str(dataset), "adapter": str(tmp_path / "adapter"),
                                        "device": "cpu"}, timeout=600)
    assert "base" in report["report"]["mean"] and "adapted" in report["report"]["mean"]
    with pytest.raises(JobError, match="evaluate needs 'dataset'"):
        client.run("evaluate", {"split": "val"}, timeout=120)
    with pytest.raises(JobError, match="bad evaluate parameters.*splitt"):
        client.run("evaluate", {"dataset": str(dataset), "splitt": "val"}, timeout=120)
