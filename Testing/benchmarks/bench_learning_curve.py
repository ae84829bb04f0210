r"""Learning curves of fine-tuning on real data, scored as a user works (takes hours; prints tables).

For each training-set size N and each of several random draws, train an adapter on N cases
(patients) of the pool, then score base and adapted models on fixed test cases never drawn:

- "box": every slice holding the structure prompted with its reference box;
- "ROI": each structure segmented from one 3D ROI, its reference box grown by ``--roi-margin``
  voxels on every side, through the Segmenter's default box mode (``evaluate.score_from_roi``):
  crossed boxes for the base model, an adapter's own box mode (its card), as a user gets them.

Validation (early stopping, the card's scores) uses ``--val`` fixed pool cases that no draw
trains on; the test cases are never seen in training or selection. Every slice is encoded once
into the dataset's embedding cache (``curve_data``), which all draws, all N and the Segmenter
read; base-model scores are computed once per test set and kept in ``--work``.

  curve: the learning curve (table, JSON, PNG).
  arms:  one N, a few draws, several settings side by side (``--arm name key=value ...``), to
         choose the defaults.
  modes: adapters already trained (``--adapter DIR``, repeated) scored from one ROI in each box
         mode (``--box-modes``) on the validation and the test cases, per case.

  python Testing/benchmarks/bench_learning_curve.py curve --dataset ../shared/data/msd_hippocampus_mri_dev \
      --merge-labels --work /tmp/ft18 --png docs/images/learning_curve_hippocampus.png
  python Testing/benchmarks/bench_learning_curve.py arms --dataset ../shared/data/msd_hippocampus_mri_dev \
      --merge-labels --n 10 --draws 1 --test 15 --arm default --arm rank16 lora_rank=16
  python Testing/benchmarks/bench_learning_curve.py modes --dataset ../shared/data/msd_hippocampus_mri_dev \
      --merge-labels --work /tmp/ft18 --test-subset 10 --adapter /tmp/ft18/adapters/A --box-modes tracked fixed
"""
import argparse
import json
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from curve_data import DiskEncoder, as_dataset, prefill  # noqa: E402

from SAMFineTuneLib.adapters import read_model_card  # noqa: E402
from SAMFineTuneLib.catalogue import (BACKENDS, BOX_MODES, CROSSING_DEFAULTS, ENGINE_DEFAULTS,  # noqa: E402
                                      SEGMENT_DEFAULTS, VALIDATION_ROI_MARGIN)
from SAMFineTuneLib.dataset import read_dataset  # noqa: E402
from SAMFineTuneLib.evaluate import score_from_boxes, score_from_roi  # noqa: E402
from SAMFineTuneLib.training import TrainConfig, Trainer, cache_dir_for  # noqa: E402


def split_patients(groups, seed, n_test, n_val):
    """(test patients, validation patients, pool) from one seeded shuffle: fixed for every draw."""
    patients = sorted(set(groups.values()))
    random.Random(seed).shuffle(patients)
    return patients[:n_test], patients[n_test:n_test + n_val], patients[n_test + n_val:]


def cases_of(patients, groups, cases):
    chosen = set(patients)
    return [c for c in cases if groups[c] in chosen]


def parse_value(text):
    try:
        return json.loads(text)
    except ValueError:
        return text


def overrides_of(items):
    """``key=value`` strings -> TrainConfig overrides (values read as JSON where they parse)."""
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key] = parse_value(value)
    if "targets" in out:
        out["targets"] = tuple(out["targets"])
    return out


class Bench:
    """One dataset, its fixed test and validation cases, the model and its Segmenter."""

    def __init__(self, args, model):
        from SAMFineTuneLib.segmenter import Segmenter

        self.args, self.model = args, model
        self.root, self.cases, self.groups = as_dataset(args.dataset, args.work, args.patient_pattern,
                                                        args.merge_labels)
        self.info = read_dataset(self.root)
        self.name = os.path.basename(self.root)
        test, val, self.pool = split_patients(self.groups, args.split_seed, args.test, args.val)
        self.test_ids = cases_of(test[:args.test_subset or len(test)], self.groups, self.cases)
        self.val_ids = cases_of(val, self.groups, self.cases)
        DiskEncoder.install(model, cache_dir_for(self.root))
        self.segmenter = Segmenter(model)
        self.scoring = dict(cases=self.test_ids, axis="axial", window="auto", labels=None, tolerance_mm=2.0,
                            window_margin=self.segmenter.window_margin)

    def use_dev(self, train_ids, count):
        """Score on ``count`` pool cases that ``train_ids`` leaves out instead of the test cases:
        settings are chosen on these, so the test cases stay unseen until the curve."""
        self.test_ids = [c for c in cases_of(self.pool, self.groups, self.cases) if c not in set(train_ids)][:count]
        self.scoring["cases"] = self.test_ids

    def draw(self, n, draw):
        """The training cases of draw ``draw`` at size ``n`` (seeded by both)."""
        patients = random.Random(1000 * n + draw).sample(self.pool, min(n, len(self.pool)))
        return cases_of(patients, self.groups, self.cases)

    def base_scores(self):
        """Base-model box and ROI scores on the test cases (computed once, kept in --work)."""
        import hashlib

        # keyed by the box mode's defaults too: the base model's ROI score moves with them
        settings = " ".join(self.test_ids) + json.dumps([vars(self.segmenter.tracking), SEGMENT_DEFAULTS["box_mode"],
                                                         CROSSING_DEFAULTS], sort_keys=True)
        digest = hashlib.sha256(settings.encode()).hexdigest()[:12]
        path = os.path.join(self.root, f"bench_base_{digest}_{self.args.roi_margin}.json")
        if os.path.isfile(path):
            with open(path) as handle:
                return json.load(handle)
        box = score_from_boxes(self.model, self.info, adapters={"base": None}, **self.scoring)["base"]
        roi = score_from_roi(self.model, self.info, adapters={"base": None}, roi_margin=self.args.roi_margin,
                             segmenter=self.segmenter, **self.scoring)["base"]
        scores = {"box": box, "roi": roi}
        with open(path, "w") as handle:
            json.dump(scores, handle)
        return scores

    def train_and_score(self, train_ids, overrides, tag):
        """Train one adapter (into --work), then its box and ROI scores on the test cases.

        ``full_decoder=true`` in ``overrides`` trains every weight of the mask decoder (the
        reference LoRA is measured against): the adapter folder then holds only the LoRA part, so
        that decoder is scored in this process."""
        overrides = dict(overrides)
        full = bool(overrides.pop("full_decoder", False))
        output = os.path.join(self.args.work, "adapters", f"{self.name}_{tag}")
        # an adapter of an earlier bench run there, not reused, is trained again in its place
        config = TrainConfig(dataset=self.root, output=output, train_cases=train_ids, val_cases=self.val_ids,
                             seed=self.args.seed, device=self.args.device, overwrite=True, **overrides)
        started = time.monotonic()
        card = self.trained_card(config) if self.args.reuse and not full else None
        wall = None  # a reused adapter's training time is in its first run's JSON, not here
        if card is None:
            # an arm that sets the encoder's precision prepares with a model of its own (scored with the bench's)
            own = self.model if "precision" not in overrides else None
            trainer = Trainer(config, model=own, log=lambda text: print(f"  [{tag}] {text}", file=sys.stderr))
            if full:
                unfreeze_decoder(trainer)
            card = trainer.fit()
            wall = time.monotonic() - started
        if full:
            box, roi = self.score_decoder(trainer.peft_decoder.merge_and_unload())
        else:
            box = score_from_boxes(self.model, self.info, adapters={"adapted": output}, **self.scoring)["adapted"]
            roi = score_from_roi(self.model, self.info, adapters={"adapted": output}, roi_margin=self.args.roi_margin,
                                 segmenter=self.segmenter, **self.scoring)["adapted"]
        return {"tag": tag, "train_cases": train_ids, "box": box["mean"], "roi": roi["mean"],
                "box_cases": box["cases"], "roi_cases": roi["cases"], "wall_seconds": wall,
                "seconds_prepare": card["stats"]["seconds_prepare"], "seconds_train": card["stats"]["seconds_train"],
                "best_epoch": card["best_epoch"], "epochs_run": len(card["history"]),
                "epoch_choice": card.get("epoch_choice"),
                "val_dice": card["base_val_dice"] if card["best_val_dice"] is None else card["best_val_dice"],
                "overrides": {k: list(v) if isinstance(v, tuple) else v
                              for k, v in dict(overrides, full_decoder=full).items()}}

    def trained_card(self, config):
        """The card of an adapter already in ``config.output``, trained with these same settings
        (cases, seed, every hyper-parameter) (``--reuse``: an interrupted curve goes on where it
        stopped); None when it must be trained."""
        try:
            card = read_model_card(config.output)
        except (OSError, ValueError):
            return None
        settings = json.loads(json.dumps(config.to_dict()))
        # "auto" settings are written into the card as the trainer resolved them on its machine
        if any(card["hyperparameters"].get(key) != value for key, value in settings.items() if value != "auto"):
            return None
        print(f"  reusing {config.output} (trained before, epoch {card['best_epoch']} kept)", file=sys.stderr)
        return card

    def score_decoder(self, decoder):
        """Box and ROI scores of the model with ``decoder`` in place of its own (restored after)."""
        from SAMFineTuneLib.segmenter import Segmenter

        own = self.model.mask_decoder
        self.model.mask_decoder = decoder
        try:
            box = score_from_boxes(self.model, self.info, adapters={"adapted": None}, **self.scoring)["adapted"]
            roi = score_from_roi(self.model, self.info, adapters={"adapted": None}, roi_margin=self.args.roi_margin,
                                 segmenter=Segmenter(self.model), **self.scoring)["adapted"]
        finally:
            self.model.mask_decoder = own
        return box, roi


def unfreeze_decoder(trainer):
    """Every weight of the trainer's decoder copy trains (its LoRA branches too), with a new optimiser."""
    from SAMFineTuneLib import adapters

    adapters.inner_decoder(trainer.peft_decoder).requires_grad_(True)
    trainer.trainable = [p for p in trainer.step_module.parameters() if p.requires_grad]
    trainer._build_optimiser()


def mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else float("nan")


def spread(values):
    values = list(values)
    return f"{mean(values):.3f} ({min(values):.3f}-{max(values):.3f})" if len(values) > 1 else f"{mean(values):.3f}"


def curve(bench, args):
    base = bench.base_scores()
    results = []
    for n in args.n:
        for draw in range(args.draws):
            train_ids = bench.draw(n, draw)
            result = bench.train_and_score(train_ids, overrides_of(args.set), f"n{n}_d{draw}")
            result.update(n=n, draw=draw)
            results.append(result)
            print(f"N={n} draw {draw}: box {result['box']['dice']:.4f} ROI {result['roi']['dice']:.4f} "
                  f"({mean([result['wall_seconds']]):.0f} s)", file=sys.stderr, flush=True)
            save_json(args, bench, base, results)
    lines = curve_table(bench, base, results, args)
    print("\n".join(lines))
    if args.png:
        plot(bench, base, results, args)
        print(f"wrote {args.png}")


def curve_table(bench, base, results, args):
    lines = [f"learning curve: {bench.name}, {len(bench.test_ids)} test cases, {len(bench.val_ids)} validation cases, "
             f"{args.draws} draws per N, ROI = reference box + {args.roi_margin} voxels, default box mode; settings "
             f"{' '.join(args.set) or 'defaults'}",
             "| N training cases | base, box | adapted, box (draws: mean, min-max) | base, one ROI "
             "| adapted, one ROI | training time (prepare + train, s) | whole run (s) |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n in args.n:
        rows = [r for r in results if r["n"] == n]
        lines.append(f"| {n} | {base['box']['mean']['dice']:.3f} | {spread(r['box']['dice'] for r in rows)} | "
                     f"{base['roi']['mean']['dice']:.3f} | {spread(r['roi']['dice'] for r in rows)} | "
                     f"{mean(r['seconds_prepare'] for r in rows):.0f} + {mean(r['seconds_train'] for r in rows):.0f} | "
                     f"{mean(r['wall_seconds'] for r in rows):.0f} |")
    return lines


def save_json(args, bench, base, results):
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"dataset": bench.name, "test_cases": bench.test_ids, "val_cases": bench.val_ids,
                       "base": {k: v["mean"] for k, v in base.items()}, "results": results,
                       "args": {k: v for k, v in vars(args).items() if k != "func"}}, handle, indent=1)


def plot(bench, base, results, args):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 3.9))
    for key, color, text in (("box", "tab:blue", "reference box per slice"),
                             ("roi", "tab:green", f"one ROI (+{args.roi_margin} voxels)")):
        ax.axhline(base[key]["mean"]["dice"], color=color, linestyle="--", linewidth=1, label=f"zero-shot, {text}")
        ns = sorted({r["n"] for r in results})
        ax.plot(ns, [mean(r[key]["dice"] for r in results if r["n"] == n) for n in ns], "o-", color=color,
                label=f"adapted, {text}")
        ax.scatter([r["n"] for r in results], [r[key]["dice"] for r in results], s=10, color=color, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xticks(args.n)
    ax.set_xticklabels([str(n) for n in args.n])
    ax.set_xlabel("training cases")
    ax.set_ylabel(f"mean Dice, {len(bench.test_ids)} test cases")
    ax.set_title(bench.name)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7)
    fig.tight_layout()
    fig.savefig(args.png, dpi=120)
    plt.close(fig)


def arms(bench, args):
    if args.dev:
        bench.use_dev(bench.draw(args.n[0], 0), args.dev)
    base = bench.base_scores()
    named = [(arm[0], overrides_of(arm[1:])) for arm in args.arm] or [("defaults", {})]
    rows = []
    for name, overrides in named:
        for draw in range(args.first_draw, args.first_draw + args.draws):
            result = bench.train_and_score(bench.draw(args.n[0], draw), dict(overrides_of(args.set), **overrides),
                                           f"{name}_n{args.n[0]}_d{draw}")
            rows.append((name, result))
            print(f"{name} draw {draw}: box {result['box']['dice']:.4f} ROI {result['roi']['dice']:.4f} val "
                  f"{result['val_dice']:.4f} epochs {result['epochs_run']} (best {result['best_epoch']}) "
                  f"{result['seconds_train']:.0f} s", file=sys.stderr, flush=True)
            save_json(args, bench, base, [dict(r, arm=a) for a, r in rows])
    print(f"\narms: {bench.name}, N={args.n[0]}, {args.draws} draws, {len(bench.test_ids)} "
          f"{'development' if args.dev else 'test'} cases; base box "
          f"{base['box']['mean']['dice']:.4f}, base ROI {base['roi']['mean']['dice']:.4f}")
    print("| arm | settings | box Dice | one-ROI Dice | val Dice | epochs (best) | train s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name, overrides in named:
        mine = [r for a, r in rows if a == name]
        print(f"| {name} | {' '.join(f'{k}={v}' for k, v in overrides.items()) or '-'} | "
              f"{spread(r['box']['dice'] for r in mine)} | {spread(r['roi']['dice'] for r in mine)} | "
              f"{mean(r['val_dice'] for r in mine):.3f} | {mean(r['epochs_run'] for r in mine):.1f} "
              f"({mean(r['best_epoch'] for r in mine):.1f}) | {mean(r['seconds_train'] for r in mine):.0f} |")


def modes(bench, args):
    """Each adapter (with its card's tracking choice) and each box mode, from one ROI: mean 3D
    Dice on the validation cases (what a choice made at training could see) and on the test cases."""
    print(f"\none ROI (+{args.roi_margin} voxels), {len(bench.val_ids)} validation and {len(bench.test_ids)} test "
          "cases")
    print("| adapter | box mode | validation Dice | test Dice | test cases |")
    print("|---|---|---:|---:|---|")
    for adapter in args.adapter:
        for mode in args.box_modes:
            val, test = (score_from_roi(bench.model, bench.info,
                                        adapters={"adapted": None if adapter == "base" else adapter},
                                        roi_margin=args.roi_margin, segmenter=bench.segmenter, box_mode=mode,
                                        **dict(bench.scoring, cases=ids))["adapted"]
                         for ids in (bench.val_ids, bench.test_ids))
            per_case = " ".join(f"{row['dice']:.2f}" for row in test["cases"])
            print(f"| {os.path.basename(adapter)} | {mode} | {val['mean']['dice']:.3f} | {test['mean']['dice']:.3f} | "
                  f"{per_case} |", flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("curve", "arms", "modes", "prefill"))
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--work", default=os.path.join("/tmp", "samfinetune_curve"),
                        help="scratch folder: the exported dataset, its embedding cache, the adapters")
    parser.add_argument("--merge-labels", action="store_true", help="all labels as one structure")
    parser.add_argument("--patient-pattern", help="regex whose group 1 is the patient id of a case id")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--backend", default=ENGINE_DEFAULTS["backend"], choices=list(BACKENDS),
                        help="the image encoder's, for encoding the cache (default: the engine's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0, help="training seed")
    parser.add_argument("--test", type=int, default=30, help="fixed test patients")
    parser.add_argument("--test-subset", type=int, help="score on the first K test patients only (quick arms)")
    parser.add_argument("--dev", type=int, help="arms: score on this many pool cases outside draw 0 (not the test)")
    parser.add_argument("--val", type=int, default=5, help="fixed validation patients (never trained on)")
    parser.add_argument("--n", type=int, nargs="+", default=[1, 3, 5, 10, 20], help="training set sizes")
    parser.add_argument("--draws", type=int, default=3)
    parser.add_argument("--first-draw", type=int, default=0, help="arms: start at this draw (add draws to an arm)")
    parser.add_argument("--roi-margin", type=int, default=VALIDATION_ROI_MARGIN,
                        help="voxels between the structure and its ROI")
    parser.add_argument("--set", nargs="*", default=[], help="TrainConfig overrides key=value for every run")
    parser.add_argument("--arm", nargs="+", action="append", default=[], help="arms: NAME [key=value ...]")
    parser.add_argument("--adapter", action="append", default=[],
                        help="modes: an adapter folder, or 'base' for none (repeat)")
    parser.add_argument("--box-modes", nargs="+", default=["tracked", "fixed"], choices=list(BOX_MODES),
                        help="modes: the box modes to score")
    parser.add_argument("--reuse", action="store_true",
                        help="score an adapter already in --work, trained with the same cases, seed and settings, "
                             "instead of training it again")
    parser.add_argument("--json", help="write every result here")
    parser.add_argument("--png", help="curve: write the plot here")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from SAMFineTuneLib.models import load_model

    model = load_model(args.model, device=args.device, backend=args.backend)
    if args.what == "prefill":
        root, cases, _ = as_dataset(args.dataset, args.work, args.patient_pattern, args.merge_labels)
        prefill(model, root, cases, margin=args.roi_margin,
                progress=lambda done, total, text: print(f"{done}/{total} {text}", file=sys.stderr, flush=True))
        return 0
    bench = Bench(args, model)
    print(f"{bench.name}: {len(bench.test_ids)} test, {len(bench.val_ids)} validation cases, pool of "
          f"{len(bench.pool)} patients", file=sys.stderr)
    {"curve": curve, "arms": arms, "modes": modes}[args.what](bench, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
