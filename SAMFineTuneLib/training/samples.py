"""Training and evaluation slices as tensors for the decoder, with the embedding disk cache.

The image encoder stays frozen, so every slice is encoded once and its embedding cached on disk
(``<key>.npy``, float16, key = SHA-256 of the model fingerprint, the encoder's precision when it
is not float32, and the preprocessed input, as in the inference cache); every epoch after that
only runs the prompt encoder and the mask decoder.

The cache is the user's, one folder per dataset in the engine's cache folder
(``paths.dataset_cache_dir``), never the dataset: an embedding takes about 2 MB a slice, four
times the slice it comes from, and a dataset is what the user keeps, backs up, syncs and shares
(or cannot write: a read-only share, a colleague's folder). Embeddings a dataset carries in its
own ``.embeddings`` folder (a set shared with them) are read first. A user's folder left unused
for ``UNUSED_CACHE_S`` goes when another is chosen: the dataset may be gone, and encoding again
costs the encoder's time, nothing else.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.nn import functional as F

from ..files import atomic_write, last_used, mark_used, sweep_folders, write_json_atomic
from ..paths import dataset_cache_dir, make_private_dir
from ..progress import check_cancel, report
from .eta import Eta

LOW_RES = 256  # the decoder's low-res mask frame
#: In a user's cache folder of a dataset: the dataset's own ``.embeddings``, so whoever is handed the
#: folder (another process too) reads what the dataset carries first.
STANDS_IN_FOR = "stands_in_for.json"
_CHOSEN: set = set()  # the cache folders this process has dated and swept beside
UNUSED_CACHE_S = 30 * 24 * 3600  # a cache folder's use is dated by its STANDS_IN_FOR file


@dataclass
class Prepared:
    """Slices ready for the decoder: embeddings (or encoder inputs), boxes, targets."""

    samples: list
    geometries: list
    boxes: Any  # Tensor[N,4] tight boxes, model-input pixels (zeros for an empty mask: a slice past the structure)
    targets: Any  # Tensor[N,256,256] bool, the mask in the decoder's low-res frame
    embeddings: Any = None  # Tensor[N,256,64,64] float16, indexed by batch (None: not encoded)
    inputs: Any = None  # Tensor[N,3,S,S], the encoder's inputs (prepared with encode=False)
    stats: Dict[str, int] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.samples)

    def part(self, index: slice) -> "Prepared":
        """The slices at ``index`` (a slice: tensors are views); the stats stay with the whole."""
        pick = (lambda tensor: None if tensor is None else tensor[index])
        return Prepared(self.samples[index], self.geometries[index], self.boxes[index], self.targets[index],
                        pick(self.embeddings), pick(self.inputs), {})


def cache_fingerprint(model) -> str:
    """What a dataset's embedding cache files a model's embeddings under: its weights, and its
    encoder's precision unless float32, so a bf16 embedding never stands in for a float32 one (a
    float32 segmentation is what an adapter is scored on)."""
    return model.fingerprint if model.precision == "float32" else f"{model.fingerprint}|{model.precision}"


def embedding_key(fingerprint: str, model_input) -> str:
    digest = hashlib.sha256(fingerprint.encode("utf-8") + b"|")
    digest.update(np.ascontiguousarray(model_input.detach().cpu().numpy()).tobytes())
    return digest.hexdigest()


def cache_dir_for(dataset_root: str) -> str:
    """The folder a dataset's embeddings are written to: the user's cache folder of that dataset
    (module docstring), which reads the dataset's own ``.embeddings`` first (``cache_dirs``)."""
    from ..dataset import EMBEDDING_DIR

    if not os.path.isdir(dataset_root):
        raise FileNotFoundError(f"dataset folder not found: {dataset_root}")
    own = os.path.join(os.path.abspath(dataset_root), EMBEDDING_DIR)
    folder = make_private_dir(dataset_cache_dir(dataset_root))
    if _stands_in_for(folder) != own:
        write_json_atomic(os.path.join(folder, STANDS_IN_FOR), {"dataset_cache": own})
    if folder not in _CHOSEN:
        _CHOSEN.add(folder)
        mark_used(folder, STANDS_IN_FOR)
        remove_unused_caches(os.path.dirname(folder), keep=folder)
    return folder


def cache_dirs(cache_dir: Optional[str]) -> Tuple[str, ...]:
    """The folders an embedding cache is read from, in order; the last, ``cache_dir``, is the one
    written. A user's folder from ``cache_dir_for`` reads its dataset's own first."""
    if not cache_dir:
        return ()
    own = _stands_in_for(cache_dir)
    return (own, cache_dir) if own and os.path.isdir(own) else (cache_dir,)


def remove_unused_caches(root: str, keep: str, now: Optional[float] = None) -> List[str]:
    """Remove the cache folders under ``root`` (``paths.dataset_cache_dir``'s parent) but ``keep``
    that no process has chosen for ``UNUSED_CACHE_S``, and hidden leftovers of a removal
    that old, each as one step (``files.remove_folder_whole``). Returns the names removed."""
    now = time.time() if now is None else now
    return sweep_folders(root, lambda name, folder: folder != keep
                         and now - last_used(folder, STANDS_IN_FOR) >= UNUSED_CACHE_S)


def _stands_in_for(folder: str) -> Optional[str]:
    """The dataset cache a per-user folder stands in for (``STANDS_IN_FOR``), None for any other."""
    try:
        with open(os.path.join(folder, STANDS_IN_FOR), encoding="utf-8") as handle:
            own = json.load(handle).get("dataset_cache")
    except (OSError, ValueError, AttributeError):
        return None
    return own if isinstance(own, str) else None


def lowres_target(mask: np.ndarray, geometry, input_size: int) -> torch.Tensor:
    """A slice mask in the decoder's low-res frame: resized like the image, padded, at 256x256."""
    tensor = torch.from_numpy(mask.astype(np.float32))[None, None]
    nh, nw = geometry.resized_shape
    tensor = F.interpolate(tensor, size=(nh, nw), mode="bilinear", align_corners=False)
    tensor = F.pad(tensor, (0, input_size - nw, 0, input_size - nh))
    if input_size != LOW_RES:
        tensor = F.interpolate(tensor, size=(LOW_RES, LOW_RES), mode="area")
    return tensor[0, 0] >= 0.5


def prepare(model, samples: Sequence, cache_dir: Optional[str], encode: bool = True, progress=None, cancel=None,
            write_cache: bool = True) -> Prepared:
    """Geometry, boxes and targets of each sample, plus its embedding (from ``cache_dir``, or the
    dataset cache a per-user one stands in for (``cache_dirs``), when there, else from the encoder,
    then stored in ``cache_dir``) or, with ``encode=False``, its encoder input."""
    from ..model_input import SliceGeometry, to_model_input

    size = model.spec.input_size
    geometries, boxes, targets, embeddings, inputs = [], [], [], [], []
    stats = {"encoder_calls": 0, "cache_hits": 0}
    memo: Dict[str, Any] = {}
    folders = cache_dirs(cache_dir)
    if cache_dir and write_cache:
        os.makedirs(cache_dir, exist_ok=True)
    eta = Eta(len(samples))
    for n, sample in enumerate(samples):
        check_cancel(cancel)
        report(progress, n, len(samples), f"preparing slice {n + 1}/{len(samples)} ({sample.case}){eta.text(n)}")
        geometry = SliceGeometry(tuple(sample.image.shape), tuple(sample.pixel_spacing), size)
        geometries.append(geometry)
        box = sample.box
        boxes.append(geometry.box_to_model(box) if box is not None else (0.0, 0.0, 0.0, 0.0))
        targets.append(lowres_target(sample.mask, geometry, size))
        x = to_model_input(sample.image, geometry, model.spec)
        if not encode:
            inputs.append(x)
            continue
        keys = _keys(model, x)
        if keys[-1] not in memo:
            memo[keys[-1]] = _cached_embedding(model, x, keys, folders, stats, write_cache)
        embeddings.append(memo[keys[-1]])
    report(progress, len(samples), len(samples), "slices ready")
    return Prepared(list(samples), geometries, torch.tensor(boxes, dtype=torch.float32),
                    torch.stack(targets) if targets else torch.zeros(0, LOW_RES, LOW_RES, dtype=torch.bool),
                    torch.stack(embeddings) if embeddings else None, torch.stack(inputs) if inputs else None, stats)


def embedding_file(cache_dir: str, key: str) -> str:
    """Where the embedding cache keeps the embedding of ``key`` (``embedding_key``)."""
    return os.path.join(cache_dir, key + ".npy")


def read_embedding(cache_dir: str, key: str) -> Optional[torch.Tensor]:
    """The cached embedding of ``key`` (float16 [256,64,64]), or None when there is none. A damaged
    entry (one that does not read back, or of another shape or type, which would fail only later,
    when the batch is stacked) is deleted and also gives None: the caller encodes the slice again."""
    from ..models.registry import EMBED_DIM, EMBED_SIZE

    path = embedding_file(cache_dir, key)
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        return None
    except Exception:  # each kind of damage fails differently: EOFError (empty), ValueError, OSError, ...
        array = None
    if isinstance(array, np.ndarray) and array.dtype == np.float16 and array.shape == (EMBED_DIM,) + (EMBED_SIZE,) * 2:
        return torch.from_numpy(array)
    try:
        os.remove(path)
    except OSError:  # a read-only cache keeps it; the slice is encoded again all the same
        pass
    return None


def read_first(folders: Sequence[str], key: str) -> Optional[torch.Tensor]:
    """``read_embedding`` from the first of ``folders`` (``cache_dirs``) that holds ``key``."""
    for folder in folders:
        cached = read_embedding(folder, key)
        if cached is not None:
            return cached
    return None


def _keys(model, model_input) -> list:
    """The cache keys a slice's embedding may be read from, the model's own last (the one written):
    a bf16 encoder reads a float32 embedding when there is one (segmented in the worker, or
    encoded by an earlier run), as it is the better of the two."""
    own = embedding_key(cache_fingerprint(model), model_input)
    float32 = embedding_key(model.fingerprint, model_input)
    return [own] if own == float32 else [float32, own]


def _cached_embedding(model, x, keys, folders: Tuple[str, ...], stats: Dict[str, int], write_cache: bool):
    """``x``'s embedding from the first of ``folders`` (``cache_dirs``) that holds it, else encoded
    and written to the last."""
    for key in keys:
        cached = read_first(folders, key)
        if cached is not None:
            stats["cache_hits"] += 1
            return cached
    with torch.no_grad():
        embedding = model.encode(x[None])[0].to("cpu", torch.float16)
    stats["encoder_calls"] += 1
    if folders and write_cache:
        write_embedding(folders[-1], keys[-1], embedding)
    return embedding


def write_embedding(cache_dir: str, key: str, embedding: torch.Tensor) -> None:
    """Store one embedding [C,H,W] in the cache as float16 (half the disk, the precision training reads)."""
    half = embedding.detach().to("cpu", torch.float16).numpy()
    atomic_write(embedding_file(cache_dir, key), lambda temp: np.save(temp, half))


def batch_embeddings(model, prepared: Prepared, index) -> torch.Tensor:
    """The embeddings of the samples at ``index``, float32 on the model's device."""
    if prepared.embeddings is None:
        raise ValueError("these slices were prepared without embeddings (encode=False); prepare them with encode=True")
    return prepared.embeddings[index].to(model.device, torch.float32)
