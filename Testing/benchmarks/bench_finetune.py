r"""Fine-tuning benchmarks on real labelled images (takes minutes; prints tables).

  speed: time per epoch with cached embeddings and the engine's default decoding (windowed on
         a CPU) vs the seeds' loop (re-encode every step, decode the whole slice), plus cached
         embeddings with whole-slice decoding to split the gain between caching and windowing;
         same data, same seed, with the validation Dice each reaches.
  curve: base vs adapted Dice after N = 1, 3, 5, 10 training cases (split by patient), a
         learning curve written as a table and a PNG.

  python Testing/benchmarks/bench_finetune.py speed --dataset ../shared/data/busi_breast_ultrasound
  python Testing/benchmarks/bench_finetune.py curve --dataset ../shared/data/busi_breast_ultrasound \
      --png Resources/Images/learning_curve_busi.png
  python Testing/benchmarks/bench_finetune.py curve --dataset ../shared/data/prostate_mri_slices_2d \
      --patient-pattern '^(.*)_[0-9]+$' --png Resources/Images/learning_curve_prostate.png

``--dataset`` is a folder with images/, masks/ and cases.csv (the shared-data layout) or a
dataset written by ``python -m SAMFineTuneLib export``. Shared-data folders are exported to a
scratch folder (``--work``, default under the temp dir), never into the repository.
"""
import argparse
import csv
import os
import random
import re
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

from SAMFineTuneLib.dataset import DATASET_JSON, export_dataset, read_dataset, read_image_any  # noqa: E402
from SAMFineTuneLib.evaluate import evaluate  # noqa: E402
from SAMFineTuneLib.training import TrainConfig, Trainer, prepare  # noqa: E402


def as_dataset(source, work, patient_pattern):
    """(dataset folder, case ids in order, case -> patient) for a shared-data folder or a dataset."""
    pattern = re.compile(patient_pattern) if patient_pattern else None

    def patient(case):
        match = pattern.match(case) if pattern else None
        return match.group(1) if match else case

    if os.path.isfile(os.path.join(source, DATASET_JSON)):
        cases = [c.case for c in read_dataset(source).cases]
        return source, cases, {c: patient(c) for c in cases}
    with open(os.path.join(source, "cases.csv")) as handle:
        rows = list(csv.DictReader(handle))
    target = os.path.join(work or os.path.join(tempfile.gettempdir(), "samfinetune_bench"),
                          os.path.basename(os.path.normpath(source)))
    cases = [r["case"] for r in rows]
    if not os.path.isfile(os.path.join(target, DATASET_JSON)):
        print(f"exporting {len(rows)} cases of {source} to {target}", file=sys.stderr)
        items = [(r["case"], read_image_any(os.path.join(source, r["image"])),
                  read_image_any(os.path.join(source, r["mask"]))) for r in rows]
        export_dataset(items, target, val_fraction=0.0, groups={c: patient(c) for c in cases}, modality="image")
    return target, cases, {c: patient(c) for c in cases}


def pick_patients(groups, seed):
    patients = sorted(set(groups.values()))
    random.Random(seed).shuffle(patients)
    return patients


def cases_of(patients, groups, cases):
    chosen = set(patients)
    return [c for c in cases if groups[c] in chosen]


class ReEncoding:
    """Embeddings of prepared slices computed again for every batch: the frozen encoder runs at
    every training step, as in a loop without an embedding cache. Indexed like
    ``Prepared.embeddings``; counts its encoder calls in the slices' stats."""

    def __init__(self, model, inputs, stats):
        self.model, self.inputs, self.stats = model, inputs, stats

    def __getitem__(self, index):
        import torch

        self.stats["encoder_calls"] = self.stats.get("encoder_calls", 0) + len(index)
        with torch.no_grad():
            return self.model.encode(self.inputs[index])


def run(config, label, model, re_encode=False):
    """Train with the engine's Trainer; ``re_encode`` swaps the training slices' cached embeddings
    for the encoder run at every step."""
    start = time.monotonic()
    trainer = Trainer(config, model=model, log=lambda text: print(f"  [{label}] {text}", file=sys.stderr))
    if re_encode:
        slices = trainer.train_set
        slices.embeddings = ReEncoding(model, prepare(model, slices.samples, None, encode=False).inputs, slices.stats)
    card = trainer.fit()
    card["wall_seconds"] = time.monotonic() - start
    return card


def decoding(margin):
    return "whole slice" if margin is None else f"window, {margin} tokens"


def speed(args, model, seeds_model):
    # a fresh scratch folder unless told otherwise, so the one-off encode is really measured
    root, cases, groups = as_dataset(args.dataset, args.work or tempfile.mkdtemp(prefix="samfinetune_speed_"),
                                     args.patient_pattern)
    patients = pick_patients(groups, args.seed)
    train_ids = cases_of(patients[:args.train], groups, cases)
    val_ids = cases_of(patients[args.train:args.train + args.val], groups, cases)
    common = dict(dataset=root, train_cases=train_ids, val_cases=val_ids, epochs=args.epochs, patience=0,
                  select_best=False, seed=args.seed, batch_size=args.batch_size, device=args.device)
    out = tempfile.mkdtemp(prefix="samfinetune_bench_speed_")
    arms = [("cached embeddings", "cached", model, {})]  # the engine's default decoding ("auto")
    if not args.skip_whole_slice_cached:
        arms.append(("cached embeddings, whole slice", "cached-full", model, dict(window_margin=None)))
    arms.append(("re-encode every step, whole slice (the seeds' loop)", "re-encode", seeds_model,
                 dict(window_margin=None)))
    rows = []
    for name, tag, arm_model, options in arms:  # the first run encodes every slice once; later runs read the cache
        config = TrainConfig(output=os.path.join(out, tag), **common, **options)
        card = run(config, tag, arm_model, re_encode=tag == "re-encode")
        # every adapter also decoded the way the seeds decode, so the Dice compare like for like
        full = evaluate(root, model=arm_model, adapter=config.output, cases=val_ids, window_margin=None)
        seconds = [h["train_seconds"] for h in card["history"]]
        later = seconds[1:] or seconds  # epoch 1 also holds each run's one-off start-up costs
        rows.append((name, card["hyperparameters"]["window_margin"], card["stats"]["seconds_prepare"], seconds[0],
                     sum(later) / len(later), sum(seconds) / len(seconds), card["history"][-1]["val_dice"],
                     full["mean"]["adapted"]["dice"], card))
    seeds, seeds_all = rows[-1][4], rows[-1][5]
    print(f"\nspeed: {os.path.basename(os.path.normpath(args.dataset))}, model {model.spec.name} on {model.device}, "
          f"{len(train_ids)} training slices, {len(val_ids)} validation cases, {args.epochs} epochs, "
          f"batch {args.batch_size}, seed {args.seed}; the seeds' loop encodes with the model as segment-anything "
          f"builds it (float32, no acceleration)")
    print("| loop | decoding (train and val) | prepare (s) | training time, epoch 1 (s) | training time per "
          "epoch, epochs 2+ (s) | val Dice after last epoch | same adapter, whole-slice val Dice | speed-up vs the "
          "seeds' loop, epochs 2+ | speed-up, all epochs |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, margin, prep, first, per_epoch, all_epochs, dice, full_dice, _ in rows:
        print(f"| {name} | {decoding(margin)} | {prep:.1f} | {first:.2f} | {per_epoch:.2f} | {dice:.4f} | "
              f"{full_dice:.4f} | {seeds / per_epoch:.1f}x | {seeds_all / all_epochs:.1f}x |")
    print(f"base model val Dice {rows[0][8]['base_val_dice']:.4f} ({decoding(rows[0][1])}), "
          f"{rows[-1][8]['base_val_dice']:.4f} (whole slice); Dice difference cached vs the seeds' loop "
          f"{abs(rows[0][6] - rows[-1][6]):.4f} (cached embeddings are stored as float16). 'prepare' of the first "
          f"row includes encoding every slice once; later rows read that cache.")


def curve(args, model):
    root, cases, groups = as_dataset(args.dataset, args.work, args.patient_pattern)
    patients = pick_patients(groups, args.seed)
    pool = min(max(args.n), len(patients) - args.min_test)
    ns = sorted({min(n, pool) for n in args.n})
    test_ids = cases_of(patients[pool:], groups, cases)[:args.max_test]
    name = os.path.basename(os.path.normpath(args.dataset))
    results = []
    for n in ns:
        train_ids = cases_of(patients[:n], groups, cases)
        config = TrainConfig(dataset=root, output=os.path.join(tempfile.gettempdir(), f"samfinetune_curve_{name}_{n}"),
                             train_cases=train_ids, val_cases=test_ids, epochs=args.epochs, patience=0,
                             select_best=False, seed=args.seed, batch_size=args.batch_size, device=args.device,
                             lr=args.lr)
        card = run(config, f"N={n}", model)
        loose = evaluate(root, model=model, adapter=config.output, cases=test_ids, box_margin=args.box_margin)["mean"]
        results.append({"n": n, "train_cases": len(train_ids), "test_cases": len(test_ids),
                        "base": card["scores"]["base"], "adapted": card["scores"]["adapted"],
                        "base_loose": loose["base"], "adapted_loose": loose["adapted"],
                        "minutes": card["wall_seconds"] / 60})
    print(f"\nlearning curve: {name}, model {model.spec.name}, {len(test_ids)} test cases "
          f"(patients never seen in training), {args.epochs} epochs, last epoch kept (no selection on test)")
    loose = f"+{args.box_margin:.0%} box"
    lines = [f"| N training patients (cases) | base Dice | adapted Dice | gain | base Dice, {loose} | "
             f"adapted Dice, {loose} | gain, {loose} | base NSD | adapted NSD | minutes |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['n']} ({r['train_cases']}) | {r['base']['dice']:.4f} | {r['adapted']['dice']:.4f} | "
                     f"{r['adapted']['dice'] - r['base']['dice']:+.4f} | {r['base_loose']['dice']:.4f} | "
                     f"{r['adapted_loose']['dice']:.4f} | {r['adapted_loose']['dice'] - r['base_loose']['dice']:+.4f} | "
                     f"{r['base']['nsd']:.4f} | {r['adapted']['nsd']:.4f} | {r['minutes']:.1f} |")
    print("\n".join(lines))
    if args.png:
        plot(results, name, args.png, loose)
        with open(os.path.splitext(args.png)[0] + ".md", "w") as handle:
            handle.write(f"Learning curve on {name}: {len(test_ids)} test cases, model {model.spec.name}, "
                         f"{args.epochs} epochs, seed {args.seed}.\n\n" + "\n".join(lines) + "\n")
        print(f"wrote {args.png}")


def plot(results, name, path, loose):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ns = [r["n"] for r in results]
    for key, style, color, text in (("base", "o--", "grey", "LiteMedSAM, tight box"),
                                    ("adapted", "o-", "tab:blue", "+ LoRA, tight box"),
                                    ("base_loose", "s--", "tab:orange", f"LiteMedSAM, {loose}"),
                                    ("adapted_loose", "s-", "tab:green", f"+ LoRA, {loose}")):
        ax.plot(ns, [r[key]["dice"] for r in results], style, color=color, label=text)
    ax.set_xticks(ns)
    ax.set_xlabel("training patients")
    ax.set_ylabel(f"mean Dice, {results[0]['test_cases']} test cases")
    ax.set_title(name)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "curve"))
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--work", help="scratch folder for the exported dataset and its embedding cache")
    parser.add_argument("--patient-pattern", help="regex whose group 1 is the patient id of a case id")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--random-weights", action="store_true",
                        help="speed only: time a model whose checkpoint is not at hand (Dice is then meaningless)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=None,
                        help="default: 3 (speed: epoch 1 and the mean of the later ones), 12 (curve)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train", type=int, default=10, help="speed: training patients")
    parser.add_argument("--val", type=int, default=10, help="speed: validation patients")
    parser.add_argument("--skip-whole-slice-cached", action="store_true",
                        help="speed: leave out the cached + whole-slice run (the row that splits caching from "
                             "windowed decoding)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 3, 5, 10], help="curve: training set sizes")
    parser.add_argument("--min-test", type=int, default=4, help="curve: patients always kept for testing")
    parser.add_argument("--max-test", type=int, default=40, help="curve: at most this many test cases")
    parser.add_argument("--box-margin", type=float, default=0.1,
                        help="curve: also score with boxes grown by this fraction of their side (a user's box)")
    parser.add_argument("--png", help="curve: write the plot here (and a .md table beside it)")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (3 if args.what == "speed" else 12)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from SAMFineTuneLib.models import build_model, load_model

    model = load_model(args.model, checkpoint=args.checkpoint, device=args.device, pretrained=not args.random_weights)
    if args.what == "speed":
        # the re-encoding loop encodes with the model as segment-anything builds it
        seeds_model = build_model(args.model, checkpoint=args.checkpoint, device=args.device,
                                  pretrained=not args.random_weights)
        speed(args, model, seeds_model)
    else:
        curve(args, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
