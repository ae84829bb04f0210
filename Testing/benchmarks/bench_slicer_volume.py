"""What a large volume costs on the Slicer side: the panel's Segment and the SAM effect's clicks on a
512 x 512 x N CT, on real MRML nodes (slicer-core, Python 3.12) with the real background worker.

    SAMFINETUNE_WORKER_PYTHON=.venv/bin/python OMP_NUM_THREADS=2 \\
        .venv-slicer/bin/python Testing/benchmarks/bench_slicer_volume.py [--slices 600]

Per step: the wall time from the call to the result written into the segment, the engine's own
seconds in the worker, what the Slicer side and the transfer add to them (wall / engine; for the
panel's Export of the segmented case, wall / the seconds its two files alone take to write), how long
the call itself held the caller (Slicer's GUI thread), and how much this process's peak memory grew
against the volume's size. The CT is synthetic (a body, a liver-sized ellipsoid and a lymph-node-sized
one in Hounsfield units, noise); memory is read from /proc (Linux).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "SAMFineTune"), os.path.join(ROOT, "Testing")]


def synthetic_ct(slices: int) -> np.ndarray:
    """int16 HU: air, a body of soft tissue with a fat rim, a 'liver' and a 'node' at the middle slice."""
    rng = np.random.default_rng(0)
    rows, cols = np.mgrid[0:512, 0:512].astype(np.float32)
    body = ((cols - 256) / 230) ** 2 + ((rows - 256) / 200) ** 2
    base = np.where(body <= 1, np.where(body > 0.85, -100, 40), -1000).astype(np.float32)
    volume = np.empty((slices, 512, 512), np.int16)
    for k in range(slices):
        plane = base.copy()
        for (ci, cj, ri, rj, rk, hu) in ((300, 230, 95, 85, 60, 110), (180, 300, 12, 12, 8, 130)):
            dz = (k - slices // 2) / rk
            if abs(dz) < 1:
                shrink = np.sqrt(1 - dz * dz)
                plane[((cols - ci) / (ri * shrink)) ** 2 + ((rows - cj) / (rj * shrink)) ** 2 <= 1] = hu
        plane += rng.normal(0, 15, plane.shape).astype(np.float32)
        volume[k] = np.clip(plane, -1024, 3000).astype(np.int16)
    return volume


def memory_mib(field: str) -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak() -> float:
    """Start a new peak (VmHWM) at the present size; returns that size in MiB."""
    with open("/proc/self/clear_refs", "w", encoding="ascii") as refs:
        refs.write("5")
    return memory_mib("VmRSS")


def measured(start, wait):
    """(wall s, seconds the call held the caller, peak growth MiB, task) of ``start()`` then ``wait(task)``."""
    before = reset_peak()
    started = time.perf_counter()
    task = start()
    held = time.perf_counter() - started
    wait(task)
    return time.perf_counter() - started, held, memory_mib("VmHWM") - before, task


def finish(task):
    while task.poll():
        time.sleep(0.01)
    if task.state != "done":
        raise RuntimeError(f"{task.state}: {task.error}")


def segment_rows(logic, volume, liver, node):
    """The panel's Segment three times; returns (rows, the liver's task)."""
    def segment(roi, segmentation=None, segmentId=None):
        return measured(lambda: logic.segmentROIs(volume, [roi], segmentation, segmentIds=segmentId and [segmentId],
                                                  waitForCompletion=False, device="cpu")[0], finish)

    def label(what, task):  # the default box mode encodes planes across the ROI too
        return f"Segment, {what} ({task.stats['encoded']} slices encoded, {task.stats['cache_hits']} cached)"

    wall, held, grown, first = segment(liver)
    rows = [(label("a liver ROI of 30 slices", first), wall, first.stats["seconds"], held, grown)]
    for what, roi, segmentId in (("the same ROI again", liver, first.segmentId),
                                 ("a small ROI of 20 slices", node, None)):
        wall, held, grown, task = segment(roi, first.segmentationNode, segmentId)
        rows.append((label(what, task), wall, task.stats["seconds"], held, grown))
    return rows, first


def click_rows(logic, scene, volume, task, index):
    """Three clicks of the SAM effect on slice ``index`` of ``task``'s segment, each written as the effect does."""
    from SAMFineTuneMRML import interactive, slices

    session = interactive.InteractiveSession(logic, volume)
    modify = slices.EditorModifier(scene, task.segmentationNode, volume, task.segmentId)
    rows, points = [], []
    for n, point in enumerate(((300, 230, True), (250, 200, False), (330, 260, True))):
        points.append(point)
        answered = []

        def written(click):
            finish(click)
            slices.writeSlice(modify, answered[0], volume, task.segmentationNode, "axial", index,
                              reference=modify.defaultModifierLabelmap())  # the effect's own grid

        def click():  # a first click on a slice starts from the segment there, as the effect does
            start = None
            if n == 0:
                start = slices.segmentSlice(task.segmentationNode, task.segmentId, volume, "axial", index)
            return session.refine("axial", index, list(points), startMask=start, reset=n == 0,
                                  options={"device": "cpu"}, onMask=lambda mask, result: answered.append(mask))

        wall, held, grown, click = measured(click, written)
        rows.append((f"SAM effect, click {n + 1} (refine, write the slice)", wall, click.job.result["seconds"], held,
                     grown))
    return rows


def export_row(logic, task, folder):
    """The panel's Export of the segmented case, against writing its image and label files alone
    (what no export can skip: SimpleITK's compressed NIfTI writes, timed in the same run)."""
    from SAMFineTuneLib.volume_io import write_volume
    from SAMFineTuneMRML import training

    _, image, label = training.caseFromNodes(task.volumeNode, task.segmentationNode, task.segmentId, "floor")
    started = time.perf_counter()
    for volume, name in ((image, "image.nii.gz"), (label, "label.nii.gz")):
        write_volume(volume, os.path.join(folder, name))
    floor = time.perf_counter() - started
    del image, label
    wall, held, grown, _ = measured(
        lambda: logic.exportTrainingSet([(task.volumeNode, task.segmentationNode, task.segmentId)],
                                        os.path.join(folder, "set"), "liver"), lambda summary: None)
    return ("Export the case (against writing its two files)", wall, floor, held, grown)


def run(slices: int):
    from slicer_scene import addROI, addVolume, ijkToRAS
    from SAMFineTuneMRML.logic import SAMFineTuneCoreLogic
    from SAMFineTuneMRML.scene import reset_scene

    scene = reset_scene()
    volume = addVolume(synthetic_ct(slices), ijkToRAS((0.8, 0.8, 2.5)), "CT")
    middle = slices // 2
    liver = addROI(scene, volume, (200, 140, middle - 15, 399, 319, middle + 14), name="liver")
    node = addROI(scene, volume, (165, 285, middle - 10, 194, 314, middle + 9), name="node")
    logic = SAMFineTuneCoreLogic()
    try:
        logic.worker.client.run("load_model", {"model": "litemedsam", "device": "cpu"})
        rows, first = segment_rows(logic, volume, liver, node)
        rows += click_rows(logic, scene, volume, first, middle)
        with tempfile.TemporaryDirectory() as folder:
            rows.append(export_row(logic, first, folder))
        return rows
    finally:
        logic.shutdown()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=600, help="slices of the 512 x 512 CT")
    args = parser.parse_args(argv)
    rows = run(args.slices)
    volume_mib = args.slices * 512 * 512 * 2 / 2 ** 20
    print(f"\n512 x 512 x {args.slices} int16 CT ({volume_mib:.0f} MiB), LiteMedSAM on the CPU, the real worker\n")
    print("| step | wall / the work's own seconds (engine; files) | call held the caller, of the wall | "
          "peak memory growth, of the volume |")
    print("|---|---:|---:|---:|")
    for label, wall, engine, held, grown in rows:
        print(f"| {label} | {wall / engine:.2f}x | {held / wall:.1%} | {grown / volume_mib:.1%} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
