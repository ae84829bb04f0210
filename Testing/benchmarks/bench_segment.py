r"""Segmentation speed and accuracy: cold vs warm segmentation against a per-slice loop, and fixed ROI
vs tracked boxes on labelled volumes (prints markdown tables).

  python Testing/benchmarks/bench_segment.py [--dataset DIR] [--device cpu|cuda] [--backend ...] [--skip-speed] ...

``--dataset`` is a folder with images/ and masks/ (3D NIfTI, integer labels) and labels.json, as in
../shared/data; without it the built-in CT phantom is used. The speed table times the engine
(batched encoding, embedding cache, windowed decoding) against encoding and decoding each slice
alone on the model as segment-anything builds it (``models.build_model``), all in one run: the
asked-for mode first (the default: --backend auto), then, when its encoder is not PyTorch's,
PyTorch's in the same precision. Model loads are timed in new processes, with an empty and with
a warm conversion cache; the run keeps its conversions in a scratch folder, never in the user's
cache. The accuracy table uses the first mode.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from SAMFineTuneLib import imaging, model_input, windows  # noqa: E402
from SAMFineTuneLib.catalogue import ENGINE_DEFAULTS  # noqa: E402
from SAMFineTuneLib.cli_args import (add_axis_argument, add_engine_arguments, add_model_arguments,  # noqa: E402
                                     add_window_argument)
from SAMFineTuneLib.metrics import dice_score as dice  # noqa: E402
from SAMFineTuneLib.models import build_model, load_model  # noqa: E402
from SAMFineTuneLib.phantom import bounding_box, make_ct_phantom  # noqa: E402
from SAMFineTuneLib.segmenter import Segmenter  # noqa: E402
from SAMFineTuneLib.volume_io import read_volume  # noqa: E402


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dataset", help="folder with images/ and masks/ (3D NIfTI, integer labels) and "
                                          "labels.json, as in ../shared/data; default: the built-in CT phantom")
    parser.add_argument("--labels", nargs="*", type=int, help="label values to score (default: the largest ones)")
    parser.add_argument("--max-structures", type=int, default=6, help="at most this many structures per case")
    parser.add_argument("--min-slices", type=int, default=4, help="skip structures spanning fewer slices")
    parser.add_argument("--margin", type=int, default=3, help="ROI margin around the reference box, in voxels "
                                                               "(in-plane; 1 slice along the axis)")
    parser.add_argument("--speed-slices", type=int, default=20, help="slices in the speed test")
    add_model_arguments(parser)
    add_engine_arguments(parser)
    parser.add_argument("--pretrained", choices=["yes", "no"], default="yes",
                        help="'no' times random weights (for GPU timing of checkpoints you do not have)")
    add_axis_argument(parser)
    add_window_argument(parser)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")


def _cases(dataset: Optional[str]):
    """(case id, volume, label volume, label names) for each 3D case."""
    if not dataset:
        image, label = make_ct_phantom(shape_kji=(40, 128, 128))
        yield "phantom", image, label, {1: "organ"}
        return
    names: Dict[int, str] = {}
    labels_path = os.path.join(dataset, "labels.json")
    if os.path.isfile(labels_path):
        with open(labels_path) as handle:
            raw = json.load(handle)
        for value in raw.values():  # {case description: {value: name}} or {value: name}
            table = value if isinstance(value, dict) else raw
            names.update({int(k): v for k, v in table.items() if str(k).isdigit()})
    for name in sorted(os.listdir(os.path.join(dataset, "images"))):
        if not name.endswith((".nii.gz", ".nii", ".nrrd", ".mha")):
            continue
        yield (name.split(".")[0], read_volume(os.path.join(dataset, "images", name)),
               read_volume(os.path.join(dataset, "masks", name)), names)


def _structures(label: np.ndarray, wanted: Optional[Sequence[int]], limit: int, min_slices: int, axis: str):
    values, counts = np.unique(label[label > 0], return_counts=True)
    order = [int(v) for _, v in sorted(zip(counts, values), reverse=True)]
    chosen = [v for v in order if wanted is None or v in wanted]
    kept = []
    for value in chosen:
        if imaging.slices_holding(label == value, axis).size >= min_slices:
            kept.append(value)
        if len(kept) >= limit:
            break
    return kept


def _roi_box(mask: np.ndarray, margin: int, axis: str) -> Tuple[int, ...]:
    along = {"axial": 2, "coronal": 1, "sagittal": 0}[axis]
    grow = [margin, margin, margin]
    grow[along] = 1
    return bounding_box(mask, grow)


def _per_slice_loop(model, volume, box, axis, window, warm_up: bool = False) -> float:
    """The per-slice loop: encode each slice alone, no batching, no cache, then decode. Returns seconds.

    Like ``SamPredictor.set_image`` + ``predict``, it runs the encoder in float32 on every device
    (the engine's bf16 autocast on CUDA is one of the things being compared).
    """
    lo, hi = windows.window_range(volume.array, window)
    slices, box2d = imaging.box_to_slices(box, axis)
    rows_cols = [s for n, s in enumerate(volume.array.shape) if n != imaging.axis_index(axis)]
    geometry = model_input.SliceGeometry(tuple(rows_cols), imaging.slice_pixel_spacing(volume.spacing, axis),
                                         model.spec.input_size)
    started = time.perf_counter()
    with torch.inference_mode():
        for index in slices[:1] if warm_up else slices:
            plane = windows.apply_window(imaging.extract_slice(volume.array, axis, index), lo, hi)
            image = model_input.to_model_input(plane, geometry, model.spec)[None].to(model.device)
            embedding = model.image_encoder(image)
            low_res, _ = model.decode(embedding, torch.tensor([geometry.box_to_model(box2d)]))
            geometry.logits_to_slice(model.upscale_logits(low_res)[0, 0])
    return time.perf_counter() - started


def _decoding(margin) -> str:
    return "whole slice" if margin is None else f"window of {margin} tokens around the box"


def _mode(model) -> str:
    return f"{model.backend} {model.precision}{', compiled' if model.compiled_batch else ''}"


# Times load_model in a new process, as a user's worker or panel pays it: imports (torch,
# SAMFineTuneLib) first and untimed, openvino's import inside load_model and timed. The CPU time
# beside it (all threads) moves less than the wall time when other work shares the machine.
_LOAD_SCRIPT = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from SAMFineTuneLib.models import load_model
options = json.loads(sys.argv[2])
started, cpu = time.perf_counter(), time.process_time()
model = load_model(**options)
print(json.dumps({"seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu,
                  "backend": model.backend, "from_cache": getattr(model.openvino_encoder, "from_cache", None)}))
"""


def _load_seconds(args, backend: str, cache_dir: str) -> dict:
    """load_model's seconds in a new process whose conversion cache is ``cache_dir``."""
    options = dict(name=args.model, checkpoint=args.checkpoint, device=args.device,
                   pretrained=args.pretrained == "yes", precision=args.precision, backend=backend)
    env = dict(os.environ, SAMFINETUNE_CACHE=cache_dir)
    done = subprocess.run([sys.executable, "-c", _LOAD_SCRIPT, ROOT, json.dumps(options)], env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _speed_box(args, volume, label) -> Tuple[List[int], Tuple[int, int, int]]:
    """The ROI's box cut to ``--speed-slices`` slices around its middle, and where its slice range sits."""
    box = list(bounding_box(label.array, (args.margin, args.margin, 0)))
    along = {"axial": (2, 5, volume.array.shape[0]), "coronal": (1, 4, volume.array.shape[1]),
             "sagittal": (0, 3, volume.array.shape[2])}[args.axis]
    middle = (box[along[0]] + box[along[1]]) // 2
    box[along[0]] = max(0, middle - args.speed_slices // 2)
    box[along[1]] = min(along[2] - 1, box[along[0]] + args.speed_slices - 1)
    return box, along


def _engine_times(args, segmenter, volume, box, along) -> Dict[str, float]:
    """Seconds of one mode: warm-up, cold segmentation, warm re-prompts (medians of three)."""
    # One throwaway batch first: the first forward of each batch shape sets up kernels (and
    # compiles, when asked), which would otherwise be charged to whichever side runs first.
    warm_up = list(box)
    warm_up[along[1]] = min(box[along[1]], warm_up[along[0]] + segmenter.batch_size - 1)
    times = {"warm_up": segmenter.segment(volume, warm_up, axis=args.axis, window=args.window,
                                          box_mode="fixed").stats["seconds"]}
    segmenter.cache.clear()
    times["cold"] = segmenter.segment(volume, box, axis=args.axis, window=args.window,
                                      box_mode="fixed").stats["seconds"]

    def warm_seconds(mode: str) -> float:
        """Median of three warm runs: one run of well under a second moves with whatever else the CPU does."""
        return float(np.median([segmenter.segment(volume, box, axis=args.axis, window=args.window,
                                                  box_mode=mode).stats["seconds"] for _ in range(3)]))

    times["warm"], times["tracked"] = warm_seconds("fixed"), warm_seconds("tracked")
    margin, segmenter.window_margin = segmenter.window_margin, None
    times["full"], times["full_tracked"] = warm_seconds("fixed"), warm_seconds("tracked")
    segmenter.window_margin = margin
    return times


def _preparation_seconds(args, model, volume, label, box, along) -> Tuple[float, int]:
    """Training's preparation (``training.prepare``: encode, box, target; no disk cache) of the
    labelled slices in the speed box, and how many it prepared."""
    from SAMFineTuneLib.dataset.samples import case_samples
    from SAMFineTuneLib.training import prepare

    inside = range(box[along[0]], box[along[1]] + 1)
    samples = [s for s in case_samples("speed", volume, label.array, args.axis, args.window) if s.index in inside]
    started = time.perf_counter()
    prepare(model, samples, None)
    return time.perf_counter() - started, len(samples)


def _speed_rows(titles, columns, loads, loop: float, n: int) -> List[str]:
    """The speed table: one column per mode, the default first."""
    def row(name: str, cell) -> str:
        return f"| {name} | " + " | ".join(cell(times) for times in columns) + " |"

    def per_slice(seconds: float, count: int = n) -> str:
        return f"{count / seconds:.2f} slices/s ({seconds / count * 1000:.0f} ms/slice)"

    rows = ["| measure | " + " | ".join(titles) + " |", "|---" * (len(titles) + 1) + "|"]
    for name, key in (("model load, new process, empty conversion cache", "cold"),
                      ("model load, new process, warm conversion cache", "warm")):
        rows.append(f"| {name} | " + " | ".join(
            f"{load[key]['seconds']:.2f} s (CPU {load[key]['cpu']:.2f} s)"
            + (", read back" if load[key]["from_cache"] else "")
            for load in loads) + " |")
    rows += [
        row("one-off warm-up (first batch)", lambda t: f"{t['warm_up']:.1f} s"),
        row("cold segmentation (fixed box)", lambda t: per_slice(t["cold"])),
        row("training's preparation (encode, box, target per slice; no disk cache)",
            lambda t: per_slice(t["prepare"], t["prepared"])),
        row("warm re-prompt, cached (fixed / tracked box; median of 3)",
            lambda t: f"{t['warm'] / n * 1000:.1f} / {t['tracked'] / n * 1000:.1f} ms/slice"),
        row("warm re-prompt, whole-slice decode (fixed / tracked box)",
            lambda t: f"{t['full'] / n * 1000:.1f} / {t['full_tracked'] / n * 1000:.1f} ms/slice"),
        row("warm / cold (fixed / tracked box)",
            lambda t: f"1/{t['cold'] / t['warm']:.0f} / 1/{t['cold'] / t['tracked']:.0f}"),
        "| per-slice loop (float32 PyTorch as built, encode+decode each slice, no batch, no cache) | "
        + " | ".join(per_slice(loop) for _ in columns) + " |",
        row("**cold engine vs per-slice loop**", lambda t: f"**{loop / t['cold']:.2f}x**"),
        row("warm engine vs per-slice loop", lambda t: f"{loop / t['warm']:.1f}x"),
    ]
    return rows


def _speed_table(args, segmenters, baseline, volume, label, loads) -> List[str]:
    """Every mode's times and the per-slice loop, measured one after another in this process."""
    box, along = _speed_box(args, volume, label)
    n = box[along[1]] - box[along[0]] + 1
    columns = []
    for segmenter in segmenters:
        times = _engine_times(args, segmenter, volume, box, along)
        times["prepare"], times["prepared"] = _preparation_seconds(args, segmenter.model, volume, label, box, along)
        columns.append(times)
    _per_slice_loop(baseline, volume, box, args.axis, args.window, warm_up=True)
    loop = _per_slice_loop(baseline, volume, box, args.axis, args.window)
    first = segmenters[0]
    titles = [f"{_mode(s.model)}{' (default)' if i == 0 and _is_default(args) else ''}"
              for i, s in enumerate(segmenters)]
    head = (f"speed: {n} slices, model {first.model.spec.name}, device {first.model.device}, encoder batch "
            f"{first.batch_size}, decoding {_decoding(first.window_margin)}; each column one mode, all in this run")
    return [head] + _speed_rows(titles, columns, loads, loop, n)


def _accuracy_table(args, segmenter, cases) -> None:
    """Dice per structure, fixed ROI vs tracked boxes (and whole-slice decoding when windowed)."""
    # Windowed decoding is compared with whole-slice decoding on the same cached embeddings.
    columns = [("fixed ROI", "fixed", segmenter.window_margin), ("tracked", "tracked", segmenter.window_margin)]
    if segmenter.window_margin is not None:
        columns.append(("tracked, whole-slice decode", "tracked", None))
    print(f"\naccuracy ({_mode(segmenter.model)}): 3D Dice, one ROI per structure = reference box + {args.margin} "
          f"voxels in-plane "
          f"and 1 slice along the {args.axis} axis; decoding {_decoding(segmenter.window_margin)}")
    print("| case | structure | slices | " + " | ".join(title for title, _, _ in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns), flush=True)
    scores = {title: [] for title, _, _ in columns}
    margin = segmenter.window_margin
    for case, volume, label, names in cases:
        for value in _structures(label.array, args.labels, args.max_structures, args.min_slices, args.axis):
            reference = (label.array == value).astype(np.uint8)
            box = _roi_box(reference, args.margin, args.axis)
            row = []
            for title, mode, window_margin in columns:
                segmenter.window_margin = window_margin
                result = segmenter.segment(volume, box, axis=args.axis, window=args.window, box_mode=mode)
                scores[title].append(dice(result.mask, reference))
                row.append(f"{scores[title][-1]:.3f}")
            segmenter.window_margin = margin
            span = int(imaging.slices_holding(reference, args.axis).size)
            print(f"| {case} | {names.get(value, value)} | {span} | " + " | ".join(row) + " |", flush=True)
    count = len(scores[columns[0][0]])
    if count:
        print(f"| **mean** | {count} structures | | "
              + " | ".join(f"{np.mean(scores[title]):.3f}" for title, _, _ in columns) + " |")


def _is_default(args) -> bool:
    return (args.backend, args.precision, args.compile) == (ENGINE_DEFAULTS["backend"], ENGINE_DEFAULTS["precision"],
                                                            ENGINE_DEFAULTS["compile"])


def _load_models(args, cache_dir: str):
    """The asked-for model and, for the speed table, PyTorch's beside it when the asked-for encoder is
    not PyTorch's, with load_model's time for each in a new process with an empty and then a warm
    conversion cache."""
    pretrained = args.pretrained == "yes"
    model = load_model(args.model, args.checkpoint, args.device, pretrained=pretrained, precision=args.precision,
                       backend=args.backend)
    models = [(model, args.compile)]
    if args.skip_speed:
        return models, []
    if model.backend != "torch":
        models.append((load_model(args.model, args.checkpoint, args.device, pretrained=pretrained,
                                  precision=args.precision, backend="torch"), False))
    loads = []
    for loaded, _ in models:
        with tempfile.TemporaryDirectory(prefix="bench-cold-") as cold:
            loads.append({"cold": _load_seconds(args, loaded.backend, cold),
                          "warm": _load_seconds(args, loaded.backend, cache_dir)})
    return models, loads


def run(args: argparse.Namespace) -> int:
    # The conversion cache of this run: a scratch folder, so the user's cache is left as it was.
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        os.environ["SAMFINETUNE_CACHE"] = cache_dir
        models, loads = _load_models(args, cache_dir)
        segmenters = [Segmenter(model, window_margin=args.decode_window, compile=compiled)
                      for model, compiled in models]
        # The per-slice loop runs on the model as segment-anything builds it: float32, no fused
        # attention, no channels-last, not compiled.
        baseline = build_model(args.model, args.checkpoint, args.device, pretrained=args.pretrained == "yes")
        print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, device {baseline.device}", flush=True)
        cases = list(_cases(args.dataset))
        if not args.skip_speed:
            _, volume, label, _ = cases[0]
            biggest = _structures(label.array, args.labels, 1, 1, "axial")
            target = label.with_array((label.array == biggest[0]).astype(np.uint8))
            print("\n".join(_speed_table(args, segmenters, baseline, volume, target, loads)), flush=True)
        if not args.skip_accuracy:
            _accuracy_table(args, segmenters[0], cases)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
