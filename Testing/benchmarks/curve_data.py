"""Data for the fine-tuning benchmarks: shared-data folders exported as datasets, and one
embedding disk cache that training, reference-box scoring and one-ROI segmentation all read.

A learning curve trains dozens of adapters on the same slices and segments the same test cases
with each of them; the image encoder is frozen, so every slice is encoded once, ever, into the
dataset's ``.embeddings`` folder (the training cache: key = model fingerprint + model input), and
the Segmenter's encoder is wrapped to read that folder too (``DiskEncoder``).
"""
import csv
import os
import re
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from SAMFineTuneLib.dataset import DATASET_JSON, export_dataset, read_dataset, read_image_any  # noqa: E402


def as_dataset(source, work=None, patient_pattern=None, merge_labels=False):
    """(dataset folder, case ids in order, case -> patient) for a shared-data folder or a dataset.

    A shared-data folder (images/, masks/, cases.csv) is exported once into ``work`` (default
    under the temp dir), never into the repository; ``merge_labels`` turns every label into one
    structure (hippocampus head + body/tail: the structure a user segments)."""
    pattern = re.compile(patient_pattern) if patient_pattern else None

    def patient(case):
        match = pattern.match(case) if pattern else None
        return match.group(1) if match else case

    if os.path.isfile(os.path.join(source, DATASET_JSON)):
        cases = [c.case for c in read_dataset(source).cases]
        return source, cases, {c: patient(c) for c in cases}
    with open(os.path.join(source, "cases.csv")) as handle:
        rows = list(csv.DictReader(handle))
    name = os.path.basename(os.path.normpath(source)) + ("_merged" if merge_labels else "")
    target = os.path.join(work or os.path.join(tempfile.gettempdir(), "samfinetune_bench"), name)
    cases = [r["case"] for r in rows]
    if not os.path.isfile(os.path.join(target, DATASET_JSON)):
        print(f"exporting {len(rows)} cases of {source} to {target}", file=sys.stderr)
        items = []
        for r in rows:
            label = read_image_any(os.path.join(source, r["mask"]))
            if merge_labels:
                label = label.with_array((np.asarray(label.array) > 0).astype(np.uint8))
            items.append((r["case"], read_image_any(os.path.join(source, r["image"])), label))
        export_dataset(items, target, val_fraction=0.0, groups={c: patient(c) for c in cases}, modality="image",
                       label_names={1: "structure"} if merge_labels else None)
    return target, cases, {c: patient(c) for c in cases}


class DiskEncoder:
    """``model.encode`` through the dataset's embedding disk cache (float16, as training stores
    it): installed on a model with ``DiskEncoder.install(model, cache_dir)``, so a Segmenter on
    that model encodes a slice only if no training run or earlier segmentation did."""

    def __init__(self, model, cache_dir):
        self.model, self.cache_dir, self.encode = model, cache_dir, model.encode
        self.hits = self.calls = 0
        os.makedirs(cache_dir, exist_ok=True)

    @classmethod
    def install(cls, model, cache_dir):
        encoder = cls(model, cache_dir)
        model.encode = encoder
        return encoder

    def __call__(self, images):
        import torch

        from SAMFineTuneLib.files import atomic_write
        from SAMFineTuneLib.training import cache_fingerprint, embedding_key
        from SAMFineTuneLib.training.samples import embedding_file, read_embedding

        out = []
        for image in images:
            key = embedding_key(cache_fingerprint(self.model), image)
            cached = read_embedding(self.cache_dir, key)
            if cached is not None:
                self.hits += 1
                out.append(cached.float())
                continue
            self.calls += 1
            embedding = self.encode(image[None])[0].to("cpu", torch.float16)
            atomic_write(embedding_file(self.cache_dir, key), lambda temp: np.save(temp, embedding.numpy()))
            out.append(embedding.float())
        return torch.stack(out).to(self.model.device)


def roi_slices(label, axis, margin):
    """The slice indices of the structure's 3D box grown by ``margin`` voxels, inside the volume."""
    from SAMFineTuneLib.imaging import axis_index, slices_holding

    along = axis_index(axis)
    present = slices_holding(label, axis)
    return range(max(0, present[0] - margin), min(label.shape[along] - 1, present[-1] + margin) + 1)


def prefill(model, root, cases, axis="axial", window="auto", margin=3, progress=None):
    """Encode every slice of each case's ROI range (the structure's box grown by ``margin``) into
    the dataset's cache: what training (labelled and end slices) and one-ROI segmentation read."""
    import torch

    from SAMFineTuneLib.dataset import load_case
    from SAMFineTuneLib.imaging import extract_slice, slice_pixel_spacing
    from SAMFineTuneLib.model_input import SliceGeometry, to_model_input
    from SAMFineTuneLib.windows import apply_window, window_range
    from SAMFineTuneLib.training import cache_dir_for

    info = read_dataset(root)
    encoder = DiskEncoder(model, cache_dir_for(info.root))
    for n, case in enumerate(cases):
        image, label = load_case(info.case(case))
        array = np.asarray(image.array)
        low, high = window_range(array, window)
        for index in roi_slices(np.asarray(label.array), axis, margin):
            plane = apply_window(extract_slice(array, axis, index), low, high)
            geometry = SliceGeometry(plane.shape, slice_pixel_spacing(image.spacing, axis), model.spec.input_size)
            with torch.no_grad():
                encoder(to_model_input(plane, geometry, model.spec)[None])
        if progress:
            progress(n + 1, len(cases), f"{case}: {encoder.calls} encoded, {encoder.hits} cached")
    return encoder
