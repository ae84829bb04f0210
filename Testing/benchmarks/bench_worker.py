"""What going through the background worker costs, against calling the engine in-process.

    python Testing/benchmarks/bench_worker.py [--slices 100] [--size 96] [--threads 1] [--repeats 5]

Cold job: a fresh Segmenter (model load + encoding every slice) in this process, against a
fresh WorkerClient doing the same job (process start, imports, model load, arrays through
files). Warm re-prompt: a new box on the same volume, embeddings cached (in-process: the same
Segmenter; worker: ``reprompt``, no volume sent). Targets (issue 3): < 10 % on the cold job,
< 20 ms on a warm re-prompt.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=96, help="rows = columns of each slice")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, here and in the worker")
    parser.add_argument("--repeats", type=int, default=5, help="warm re-prompts timed (median)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)

    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    from SAMFineTuneLib.client import WorkerClient
    from SAMFineTuneLib.phantom import make_ct_phantom
    from SAMFineTuneLib.segmenter import Segmenter

    ct, _ = make_ct_phantom((args.slices, args.size, args.size), spacing_xyz=(1.5, 1.5, 1.5))
    n, s = args.slices, args.size
    box = [s // 8, s // 8, 0, s - 1 - s // 8, s - 1 - s // 8, n - 1]  # every slice
    params = {"box": box, "box_mode": "fixed", "spacing": list(ct.spacing), "device": args.device}
    mid = n // 2
    reprompt_box = [s // 4, s // 4, max(0, mid - 10), s - 1 - s // 4, s - 1 - s // 4, min(n - 1, mid + 9)]

    print(f"volume {ct.array.shape} int16, box over {n} slices (fixed), {args.threads} thread(s), {args.device}",
          flush=True)
    # Cold, in-process (torch already imported: the in-process side's best case).
    t_load, seg = timed(lambda: Segmenter("litemedsam", device=args.device))
    t_seg, expected = timed(lambda: seg.segment(ct.array, box=box, spacing=ct.spacing, box_mode="fixed"))
    local_cold = t_load + t_seg
    print(f"in-process cold: {local_cold:.2f} s (load {t_load:.2f} + segment {t_seg:.2f})", flush=True)

    # Cold, through a fresh worker: process start, imports, model load, volume and mask through files.
    log_path = os.path.join(tempfile.mkdtemp(prefix="bench-worker-"), "worker.log")
    client = WorkerClient(log_path=log_path, env={"OMP_NUM_THREADS": str(args.threads)})
    try:
        t_worker_cold, (result, arrays) = timed(lambda: client.run("segment", params, {"volume": ct.array}))
        assert np.array_equal(arrays["mask"], expected.mask), "worker mask differs from the in-process mask"
        worker_engine_cold = result["stats"]["seconds"]  # the segment() call itself, inside the worker
        print(f"worker cold: {t_worker_cold:.2f} s (job inside the worker, incl. imports and model load: "
              f"{result['seconds']:.2f} s; segment() {worker_engine_cold:.2f} s)", flush=True)
        ping = statistics.median(timed(client.ping)[0] for _ in range(20))
        # Warm re-prompts, interleaved so that other load on the machine hits both sides alike.
        local_times, worker_times, outside = [], [], []
        for _ in range(args.repeats):
            local_times.append(timed(lambda: seg.segment(ct.array, box=reprompt_box, spacing=ct.spacing,
                                                         box_mode="fixed"))[0])
            elapsed, (result, arrays) = timed(lambda: client.run("reprompt", {"box": reprompt_box}))
            worker_times.append(elapsed)
            outside.append(elapsed - result["stats"]["seconds"])
        expected_again = seg.segment(ct.array, box=reprompt_box, spacing=ct.spacing, box_mode="fixed").mask
        assert np.array_equal(arrays["mask"], expected_again), "worker re-prompt differs from in-process"
        local_warm, worker_warm = statistics.median(local_times), statistics.median(worker_times)
    finally:
        client.shutdown()

    # Raw times move with whatever else runs on the machine; "worker-only" is the time spent outside
    # the engine's segment() call (process start, imports, model load, protocol, files), and the
    # "same-compute" ratio puts that on top of the in-process time, which noise does not touch.
    local_other_cold = t_load  # in-process: model load
    worker_other_cold = t_worker_cold - worker_engine_cold
    worker_other_warm = statistics.median(outside)
    rows = [
        (f"cold {n}-slice job", local_cold, t_worker_cold, local_other_cold, worker_other_cold),
        (f"warm re-prompt ({reprompt_box[5] - reprompt_box[2] + 1} slices)", local_warm, worker_warm, 0.0,
         worker_other_warm),
    ]
    print()
    print("| case                       | in-process ms | worker ms | raw ratio | in-process extra ms "
          "| worker extra ms | overhead ms | same-compute ratio |")
    print("|----------------------------|---------------|-----------|-----------|---------------------"
          "|-----------------|-------------|--------------------|")
    for name, local, remote, local_extra, remote_extra in rows:
        overhead = remote_extra - local_extra
        print(f"| {name:<26} | {local * 1e3:13.1f} | {remote * 1e3:9.1f} | {remote / local:9.3f} "
              f"| {local_extra * 1e3:19.1f} | {remote_extra * 1e3:15.1f} | {overhead * 1e3:11.1f} "
              f"| {(local + overhead) / local:18.3f} |")
    print("\nextra = time outside the engine's segment() call (in-process: model load; worker: process start,"
          "\nimports, model load, protocol, array files). overhead = worker extra - in-process extra.")
    print(f"ping round trip: {ping * 1e3:.2f} ms (median of 20); worker log: {log_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
