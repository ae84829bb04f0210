"""A dataset's embedding cache on disk and a ``Segmenter``'s in-memory cache fill each other, so
no slice is encoded twice between segmenting, exporting and training.

Both are keyed by what the encoder saw: the segmenter by the slice's content, axis and window
(``zoom.SliceSource.key``), the dataset by the model input itself (``samples.embedding_key``). A
slice the user segmented and then exported therefore meets training's key for it as long as the
dataset holds the same voxels, axis and window; otherwise nothing matches and the slice is
simply encoded again. Only a float32 segmenter's embeddings are handed over, and a dataset files
bf16 embeddings apart from float32 ones (``samples.cache_fingerprint``): an adapter is trained on
what inference feeds it.
"""
from __future__ import annotations

import os
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from ..catalogue import VALIDATION_ROI_MARGIN
from ..progress import check_cancel, report
from .samples import (cache_dir_for, cache_dirs, cache_fingerprint, embedding_file, embedding_key, read_first,
                      write_embedding)


def segmenter_from_dataset(segmenter, image, axis: str, window: str, box: Sequence[int],
                           cache_dir: Optional[str]) -> None:
    """Put the ROI's slices that training already encoded into the segmenter's cache, so only the
    slices around the structure are encoded again."""
    from ..imaging import axis_index
    from ..zoom import SliceSource

    folders = [folder for folder in cache_dirs(cache_dir) if os.path.isdir(folder)]
    if not folders:
        return
    source = SliceSource(image, axis, window, segmenter.model)
    along = 2 - axis_index(axis)  # the ROI box is (i0, j0, k0, i1, j1, k1)
    for index in range(box[along], box[along + 3] + 1):
        key = embedding_key(cache_fingerprint(segmenter.model), source.model_input(index))
        embedding = read_first(folders, key)
        if embedding is not None:  # None: not encoded by training (past the structure's ends), or damaged
            segmenter.cache.put(source.key(index), embedding.to(segmenter.cache_device, torch.float32))


def dataset_from_segmenter(segmenter, image, axis: str, window: str, cache_dir: str, indices: Iterable[int]) -> int:
    """Write the slices ``indices`` of ``image`` that the segmenter holds encoded into a dataset's
    embedding cache ``cache_dir`` (those not there yet, nor in the dataset cache it stands in for);
    the number written."""
    from ..zoom import SliceSource

    if segmenter is None or segmenter.model.precision != "float32" or not len(segmenter.cache):
        return 0
    source = SliceSource(image, axis, window, segmenter.model)
    written = 0
    for index in indices:
        embedding = segmenter.cache.peek(source.key(index))
        if embedding is None:
            continue
        key = embedding_key(cache_fingerprint(segmenter.model), source.model_input(index))
        if not any(os.path.isfile(embedding_file(folder, key)) for folder in cache_dirs(cache_dir)):
            os.makedirs(cache_dir, exist_ok=True)
            write_embedding(cache_dir, key, embedding)
            written += 1
    return written


def keep_for_training(segmenter, config, progress=None, cancel=None) -> int:
    """Before a run (``TrainConfig``): the slices of its cases the segmenter holds encoded, into the
    dataset's cache (``dataset_from_segmenter``); the number written. Cases the user segmented
    in this process (the worker) then cost training no encoder call."""
    from ..dataset import read_dataset
    from ..volume_io import read_volume
    from .slices import split_cases

    if segmenter is None or not len(segmenter.cache):
        return 0
    info = read_dataset(config.dataset)
    wanted = set().union(*split_cases(config, info))
    cases = [entry for entry in info.cases if entry.case in wanted]
    written, cache_dir = 0, cache_dir_for(info.root)
    for n, entry in enumerate(cases):
        check_cancel(cancel)
        report(progress, n, len(cases), f"taking the slices segmented here: {entry.case}")
        axis = entry.slicing_axis(config.axis)
        written += dataset_from_segmenter(segmenter, read_volume(entry.image), axis, config.window, cache_dir,
                                          training_slices(read_volume(entry.label).array, axis, config))
    return written


def training_slices(label: np.ndarray, axis: str, config) -> range:
    """The slices along ``axis`` a run reads of a case (KJI ``label``): those holding a label and, past
    each end, ``end_slices`` or the validation ROI's margin, whichever reaches further. Only these
    are worth handing over: every slice of a 600-slice CT is seconds of hashing for a 40-slice
    structure."""
    from ..imaging import axis_index, slices_holding

    values = config.labels or None
    holding = slices_holding(np.isin(label, values) if values else label != 0, axis)
    if not holding.size:
        return range(0)
    reach = max(config.end_slices, VALIDATION_ROI_MARGIN)
    return range(max(int(holding[0]) - reach, 0), min(int(holding[-1]) + reach + 1, label.shape[axis_index(axis)]))
