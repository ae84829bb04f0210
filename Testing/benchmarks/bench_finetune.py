r"""Fine-tuning speed on real labelled images (takes minutes; prints a table).

  speed: time per epoch with cached embeddings and the engine's default decoding (windowed on
         a CPU) vs the seeds' loop (re-encode every step, decode the whole slice), plus cached
         embeddings with whole-slice decoding to split the gain between caching and windowing;
         same data, same seed, with the validation Dice each reaches.

  python Testing/benchmarks/bench_finetune.py speed --dataset ../shared/data/busi_breast_ultrasound

  cold:  a user's first training (``--train`` + ``--val`` cases never encoded, default settings):
         preparing (encoding) and training time, wall and CPU. ``--segmented-first``: each case
         segmented first from one ROI in the same process, as a user does before correcting it
         (that time is reported apart), so training finds those slices encoded.
  stage: what adapting the image encoder's last stage would cost per training slice, against
         the decoder-only step the engine trains (same batch, side by side, random inputs).

Learning curves are ``bench_learning_curve.py``.

``--dataset`` is a folder with images/, masks/ and cases.csv (the shared-data layout) or a
dataset written by ``python -m SAMFineTuneLib export``. Shared-data folders are exported to a
scratch folder (``--work``, default under the temp dir), never into the repository.
"""
import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from curve_data import as_dataset  # noqa: E402

from SAMFineTuneLib.evaluate import evaluate  # noqa: E402
from SAMFineTuneLib.training import TrainConfig, Trainer, prepare  # noqa: E402


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
                                     args.patient_pattern, args.merge_labels)
    patients = pick_patients(groups, args.seed)
    train_ids = cases_of(patients[:args.train], groups, cases)
    val_ids = cases_of(patients[args.train:args.train + args.val], groups, cases)
    # One pass over the training slices per epoch (min_epoch_steps=0): the loops are compared per pass, and
    # training's 36-step floor would make the re-encoding loop encode each slice many times per epoch.
    common = dict(dataset=root, train_cases=train_ids, val_cases=val_ids, epochs=args.epochs, patience=0,
                  select_best=False, seed=args.seed, batch_size=args.batch_size, device=args.device,
                  min_epoch_steps=0)
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


def cold(args, model):
    """A user's first training: ``--train`` + ``--val`` cases never encoded before, default settings
    (the model's default encoder backend), from the first slice encoded to the adapter written. The
    fresh dataset, its embeddings in the user's cache and the adapter are removed afterwards."""
    import shutil

    from SAMFineTuneLib.paths import dataset_cache_dir

    work = tempfile.mkdtemp(prefix="samfinetune_cold_")
    try:
        root, cases, groups = as_dataset(args.dataset, work, args.patient_pattern, args.merge_labels)
        try:
            cold_run(args, model, root, cases, groups, os.path.join(work, "adapter"))
        finally:
            shutil.rmtree(dataset_cache_dir(root), ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def cold_run(args, model, root, cases, groups, output):
    patients = pick_patients(groups, args.seed)
    train_ids = cases_of(patients[:args.train], groups, cases)
    val_ids = cases_of(patients[args.train:args.train + args.val], groups, cases)
    config = TrainConfig(dataset=root, output=output,
                         train_cases=train_ids, val_cases=val_ids, seed=args.seed, device=args.device)
    if args.segmented_first:
        segmented_first(model, config)
    cpu, wall = time.process_time(), time.monotonic()
    card = run(config, "cold", model)
    cpu, wall = time.process_time() - cpu, time.monotonic() - wall
    stats, history = card["stats"], card["history"]
    print(f"\ncold training: {os.path.basename(root)}, {len(train_ids)} training + {len(val_ids)} validation cases "
          f"({card['dataset']['train_slices']} + {card['dataset']['train_end_slices']} end + "
          f"{card['dataset']['val_slices']} validation slices), model {model.spec.name} ({model.backend} encoder) on "
          f"{model.device}, {os.environ.get('OMP_NUM_THREADS', '?')} threads, default settings")
    print("| prepare (encode), s | train, s | total wall, s | process CPU time, s | epochs run (best) | s per epoch | "
          "validation Dice base -> adapted |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| {stats['seconds_prepare']:.0f} ({stats['encoder_calls']} slices) | {stats['seconds_train']:.0f} | "
          f"{wall:.0f} | {cpu:.0f} | {len(history)} ({card['best_epoch']}) | "
          f"{sum(h['seconds'] for h in history) / len(history):.1f} | {card['scores']['base']['dice']:.3f} -> "
          f"{card['scores']['adapted']['dice']:.3f} |")


def segmented_first(model, config):
    """Segment every case of ``config`` from one ROI (the validation margin, tracked), then hand
    the slices encoded to the dataset's cache as the worker does before training."""
    from SAMFineTuneLib.catalogue import VALIDATION_ROI_MARGIN
    from SAMFineTuneLib.dataset import load_case, read_dataset
    from SAMFineTuneLib.evaluate import roi_box
    from SAMFineTuneLib.segmenter import Segmenter
    from SAMFineTuneLib.training.shared_embeddings import keep_for_training

    segmenter, start = Segmenter(model), time.monotonic()
    wanted = set(config.train_cases) | set(config.val_cases)
    for entry in read_dataset(config.dataset).cases:
        if entry.case in wanted:
            image, label = load_case(entry)
            segmenter.segment(image.array, box=roi_box(label.array > 0, VALIDATION_ROI_MARGIN),
                              spacing=image.spacing)
    seconds, start = time.monotonic() - start, time.monotonic()
    kept = keep_for_training(segmenter, config)
    print(f"segmented first: {len(wanted)} cases from one ROI in {seconds:.0f} s; {kept} slices handed to "
          f"training's cache in {time.monotonic() - start:.1f} s", file=sys.stderr)


def stage(args, model, steps=5):
    """Seconds per training slice: LoRA decoder step (the engine's: cached embeddings, windowed)
    vs forward + backward through TinyViT's last stage and neck (LoRA on its Linear layers) from
    features cached before that stage, which the decoder step would then follow."""
    import torch

    from SAMFineTuneLib import adapters
    from SAMFineTuneLib.training import DecoderStep

    torch.manual_seed(0)
    batch = args.batch_size
    encoder = model.image_encoder
    stage_model = torch.nn.Sequential(encoder.layers[3], encoder.neck)
    lora = adapters.wrap_decoder(stage_model, adapters.lora_config(8, 16.0, 0.0, ("qkv", "proj", "fc1", "fc2")))
    features = torch.randn(batch, 64 * 64, 320)
    decoder = adapters.wrap_decoder(model.mask_decoder, adapters.lora_config())
    step = DecoderStep(model, adapters.inner_decoder(decoder))
    embeddings, boxes = torch.randn(batch, 256, 64, 64), torch.tensor([[60.0, 50.0, 190.0, 200.0]] * batch)

    def decoder_step():
        logits, _ = step(embeddings, boxes, window_margin=4)
        logits.float().mean().backward()

    def stage_step():
        layer, neck = lora.base_model.model
        x = layer(features).view(batch, 64, 64, 320).permute(0, 3, 1, 2)
        neck(x).mean().backward()

    rows = []
    for name, run in (("LoRA decoder step (cached embeddings, 4-token window)", decoder_step),
                      ("+ last encoder stage and neck, LoRA (cached features before it)", stage_step)):
        run()
        started = time.monotonic()
        for _ in range(steps):
            run()
        rows.append((name, (time.monotonic() - started) / steps / batch))
    print(f"\nper training slice, batch {batch}, {torch.get_num_threads()} threads, {steps} steps each:")
    print("| what runs per step | s per slice | x decoder step |\n|---|---:|---:|")
    for name, seconds in rows:
        print(f"| {name} | {seconds:.3f} | {seconds / rows[0][1]:.1f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("speed", "cold", "stage"))
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--merge-labels", action="store_true", help="all labels as one structure")
    parser.add_argument("--work", help="speed: scratch folder for the exported dataset and its embedding cache "
                        "(cold always exports into a fresh temporary folder, so that nothing is cached)")
    parser.add_argument("--patient-pattern", help="regex whose group 1 is the patient id of a case id")
    parser.add_argument("--model", default="litemedsam")
    parser.add_argument("--checkpoint")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--random-weights", action="store_true",
                        help="speed only: time a model whose checkpoint is not at hand (Dice is then meaningless)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4, help="speed: batch size")
    parser.add_argument("--epochs", type=int, default=3, help="speed: epochs (epoch 1 and the mean of the later ones)")
    parser.add_argument("--train", type=int, default=10, help="training patients (cold: 8)")
    parser.add_argument("--val", type=int, default=10, help="validation patients (cold: 2)")
    parser.add_argument("--segmented-first", action="store_true",
                        help="cold: segment each case from one ROI in this process before training (as a user "
                             "does), so training reads those slices from the segmenter")
    parser.add_argument("--skip-whole-slice-cached", action="store_true",
                        help="speed: leave out the cached + whole-slice run (the row that splits caching from "
                             "windowed decoding)")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    from SAMFineTuneLib.models import build_model, load_model

    model = load_model(args.model, checkpoint=args.checkpoint, device=args.device, pretrained=not args.random_weights)
    if args.what == "speed":
        # the re-encoding loop encodes with the model as segment-anything builds it
        seeds_model = build_model(args.model, checkpoint=args.checkpoint, device=args.device,
                                  pretrained=not args.random_weights)
        speed(args, model, seeds_model)
    elif args.what == "stage":
        stage(args, model)
    else:
        cold(args, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
