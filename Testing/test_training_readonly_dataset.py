"""Training never writes into its dataset: embeddings go to the user's cache folder of that dataset,
so a set the user keeps, syncs or shares stays small, and one the user cannot write (a curated set
on a read-only share, a colleague's folder) trains all the same; what a set carries in its own
``.embeddings`` is read first. Every test checks the dataset's files byte for byte: nothing is
written there, so a read-only one trains as any other."""
import json
import os
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

from SAMFineTuneLib.dataset import EMBEDDING_DIR, export_dataset, read_dataset
from SAMFineTuneLib.paths import dataset_cache_dir
from SAMFineTuneLib.phantom_lowcontrast import make_cases
from SAMFineTuneLib.training import TrainConfig, prepare, train
from SAMFineTuneLib.training import samples as training_samples
from SAMFineTuneLib.training.samples import cache_dir_for
from SAMFineTuneLib.training.shared_embeddings import keep_for_training

FAST = dict(batch_size=2, lr=3e-3, lora_dropout=0.0, patience=0, tracked_prompts=0.0, roi_prompts=0.0, end_slices=0,
            min_epoch_steps=0, final_scores=False, choose_tracking=False, epochs=1)


@pytest.fixture
def user_cache(tmp_path, monkeypatch):
    """The engine's user cache folder, in this test's own folder."""
    folder = tmp_path / "user cache"
    monkeypatch.setenv("SAMFINETUNE_CACHE", str(folder))
    return folder


def _dataset(folder) -> str:
    """2 training and 1 validation case of one phantom slice each."""
    train_cases, val_cases = make_cases(2, first_seed=0, slices=1), make_cases(1, first_seed=100, slices=1)
    export_dataset(train_cases + val_cases, str(folder), label_names={1: "organ"},
                   splits={**{c[0]: "train" for c in train_cases}, **{c[0]: "val" for c in val_cases}})
    return str(folder)


def _files(folder) -> dict:
    """Every file under ``folder`` and its bytes."""
    found = {}
    for parent, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(parent, name)
            with open(path, "rb") as handle:
                found[os.path.relpath(path, folder)] = handle.read()
    return found


def _npy(folder) -> list:
    return sorted(name for name in os.listdir(folder) if name.endswith(".npy")) if os.path.isdir(folder) else []


def _fake_model(fingerprint: str, value: float):
    from SAMFineTuneLib.catalogue import get_spec

    return types.SimpleNamespace(spec=get_spec("litemedsam"), fingerprint=fingerprint, precision="float32",
                                 device="cpu", encode=lambda x: torch.full((x.shape[0], 256, 64, 64), value))


def _slices(dataset: str):
    from SAMFineTuneLib.dataset import load_samples

    return load_samples(read_dataset(dataset), axis="axial", window="auto")


def test_training_writes_nothing_into_its_dataset(litemedsam, tmp_path, user_cache):
    dataset = _dataset(tmp_path / "my set")
    before = _files(dataset)
    train(TrainConfig(dataset=dataset, output=str(tmp_path / "adapter"), **FAST), model=litemedsam)
    assert os.path.isfile(os.path.join(tmp_path, "adapter", "adapter_config.json"))
    assert _files(dataset) == before and not os.path.exists(os.path.join(dataset, EMBEDDING_DIR))
    cache = dataset_cache_dir(dataset)
    assert cache.startswith(str(user_cache) + os.sep) and len(_npy(cache)) == 3  # one per slice


def test_a_dataset_carrying_embeddings_is_read_first_and_left_as_it_is(tmp_path, user_cache):
    dataset = _dataset(tmp_path / "colleague's set")
    samples = _slices(dataset)
    own = os.path.join(dataset, EMBEDDING_DIR)
    prepare(_fake_model("fake:1", 1.0), samples, own)  # what the set's owner shipped with it
    before = _files(dataset)
    cache = cache_dir_for(dataset)
    assert cache == dataset_cache_dir(dataset)
    read = prepare(_fake_model("fake:1", 2.0), samples, cache)
    assert read.stats == {"encoder_calls": 0, "cache_hits": len(samples)} and float(read.embeddings.max()) == 1.0
    assert _npy(cache) == []
    other = prepare(_fake_model("fake:2", 3.0), samples, cache)  # a model the owner did not cache for
    assert other.stats == {"encoder_calls": len(samples), "cache_hits": 0} and len(_npy(cache)) == len(samples)
    again = prepare(_fake_model("fake:2", 4.0), samples, cache_dir_for(dataset))
    assert again.stats == {"encoder_calls": 0, "cache_hits": len(samples)} and float(again.embeddings.max()) == 3.0
    assert _files(dataset) == before
    # another process handed only the user's folder (the worker, a later run) reads the set's own first
    code = ("import sys, json; from SAMFineTuneLib.training.samples import cache_dirs; "
            "print(json.dumps(cache_dirs(sys.argv[1])))")
    done = subprocess.run([sys.executable, "-c", code, cache], capture_output=True, text=True, timeout=120,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert json.loads(done.stdout) == [own, cache], done.stderr


class _Held:
    """A worker's segmenter cache that holds every slice encoded."""

    def __len__(self):
        return 1

    def peek(self, key):
        return torch.ones(256, 64, 64)


def test_the_worker_hands_its_slices_to_the_users_cache_of_its_dataset(tmp_path, user_cache):
    dataset = _dataset(tmp_path / "shared set")
    before = _files(dataset)
    segmenter = types.SimpleNamespace(model=_fake_model("fake:1", 1.0), cache=_Held())
    config = TrainConfig(dataset=dataset, output=str(tmp_path / "adapter"), **FAST)
    assert keep_for_training(segmenter, config) == 3  # one slice in each of the 3 cases
    assert len(_npy(dataset_cache_dir(dataset))) == 3 and _files(dataset) == before


def test_the_worker_hands_over_only_the_slices_training_reads(tmp_path, user_cache):
    """A case is a whole CT; training reads the structure's slices and a few past each end, so only
    those are hashed and handed over."""
    from SAMFineTuneLib.catalogue import VALIDATION_ROI_MARGIN
    from SAMFineTuneLib.volume_io import Volume

    padded, rng = [], np.random.default_rng(0)
    for case, image, label in make_cases(3, first_seed=0, slices=4, size=32):
        grow = ((10, 6), (0, 0), (0, 0))  # 10 slices of other tissue below the structure, 6 above
        array = rng.normal(0.0, 50.0, (20, 32, 32)).astype(image.array.dtype)
        array[10:14] = image.array
        padded.append((case, Volume(array, image.spacing), Volume(np.pad(label.array, grow), label.spacing)))
    dataset = str(tmp_path / "ct set")
    export_dataset(padded, dataset, label_names={1: "organ"}, splits={"phantom000": "train", "phantom001": "train",
                                                                      "phantom002": "val"})
    segmenter = types.SimpleNamespace(model=_fake_model("fake:1", 1.0), cache=_Held())
    for end_slices in (1, 5):
        config = TrainConfig(dataset=dataset, output=str(tmp_path / "adapter"), **dict(FAST, end_slices=end_slices))
        reach = max(end_slices, VALIDATION_ROI_MARGIN)
        expected = min(10, reach) + 4 + min(6, reach)  # each case: its 4 slices and what lies past its ends
        cache = dataset_cache_dir(dataset)
        shutil.rmtree(cache, ignore_errors=True)
        assert keep_for_training(segmenter, config) == 3 * expected < 3 * 20
        assert len(_npy(cache)) == 3 * expected


def test_each_dataset_has_its_own_per_user_cache_folder(tmp_path, user_cache):
    first, second = tmp_path / "a" / "set", tmp_path / "b" / "set"
    first.mkdir(parents=True)
    second.mkdir(parents=True)
    os.symlink(first, tmp_path / "link")
    assert dataset_cache_dir(str(first)) != dataset_cache_dir(str(second))
    assert dataset_cache_dir(str(tmp_path / "link")) == dataset_cache_dir(str(first))  # one dataset, one folder
    assert os.path.dirname(dataset_cache_dir(str(first))).startswith(str(user_cache))


def test_a_dataset_folder_that_does_not_exist_is_an_error_not_a_cache(tmp_path, user_cache):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        cache_dir_for(missing)
    assert not os.path.exists(missing) and not user_cache.exists()
    with pytest.raises(ValueError, match="is not a dataset"):
        train(TrainConfig(dataset=missing, output=str(tmp_path / "adapter"), **FAST))
    assert not os.path.exists(missing) and not user_cache.exists()


def _aged_folder(folder: str, age_s: float) -> None:
    """A cache folder last used ``age_s`` ago, of a dataset that is gone."""
    os.makedirs(folder, exist_ok=True)
    marker, embedding = os.path.join(folder, training_samples.STANDS_IN_FOR), os.path.join(folder, "slice.npy")
    with open(marker, "w", encoding="utf-8") as handle:
        json.dump({"dataset_cache": "/gone/.embeddings"}, handle)
    open(embedding, "wb").close()
    when = time.time() - age_s
    for path in (embedding, marker, folder):
        os.utime(path, (when, when))


def test_choosing_a_cache_folder_removes_those_unused_for_a_month_and_dates_its_own(tmp_path, user_cache):
    dataset = _dataset(tmp_path / "shared set")
    mine = dataset_cache_dir(dataset)
    root, month = os.path.dirname(mine), training_samples.UNUSED_CACHE_S
    old, recent = os.path.join(root, "0" * 16), os.path.join(root, "1" * 16)
    for folder, age in ((old, month + 60), (recent, month - 3600), (mine, 2 * month)):
        _aged_folder(folder, age)
    assert cache_dir_for(dataset) == mine
    assert sorted(os.listdir(root)) == sorted(os.path.basename(f) for f in (recent, mine))  # nothing left aside
    assert time.time() - os.stat(os.path.join(mine, training_samples.STANDS_IN_FOR)).st_mtime < 600
    assert training_samples.remove_unused_caches(root, keep="") == []  # the one in use is dated now
