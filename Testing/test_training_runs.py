"""What a fine-tuning run does with what is already on disk before it starts: an output folder
holding an adapter, a resume state (damaged, of other settings, of a dataset that has grown since)
and damaged entries of the dataset's embedding cache. Each refusal comes before the model loads
and leaves the folder as it was. One small run (3 phantom slices, 1 of 2 epochs) serves them."""
import os
import types

import numpy as np
import pytest
import torch

from SAMFineTuneLib import models
from SAMFineTuneLib.dataset import export_dataset
from SAMFineTuneLib.phantom_lowcontrast import make_cases
from SAMFineTuneLib.progress import Cancelled
from SAMFineTuneLib.training import RESUME_FILE, TrainConfig, config_from_args, train
from SAMFineTuneLib.training.trainer import check_start

FAST = dict(batch_size=2, lr=3e-3, lora_dropout=0.0, patience=0, tracked_prompts=0.0, roi_prompts=0.0, end_slices=0,
            min_epoch_steps=0, final_scores=False, choose_tracking=False, epochs=2)


@pytest.fixture
def run(litemedsam, tmp_path):
    """A run on 2 training and 1 validation slice, cancelled after its first of 2 epochs: its
    folder holds a complete adapter and the state to resume it."""
    dataset, output = str(tmp_path / "set"), str(tmp_path / "my adapter")
    train_cases, val_cases = make_cases(2, first_seed=0, slices=1), make_cases(1, first_seed=100, slices=1)
    export_dataset(train_cases + val_cases, dataset, label_names={1: "organ"},
                   splits={**{c[0]: "train" for c in train_cases}, **{c[0]: "val" for c in val_cases}})
    done = []
    with pytest.raises(Cancelled):
        train(TrainConfig(dataset=dataset, output=output, **FAST), model=litemedsam, cancel=lambda: bool(done),
              progress=lambda step, total, message: message.startswith("epoch 1/2:") and done.append(message))
    assert torch.load(os.path.join(output, RESUME_FILE), weights_only=True)["epoch"] == 1
    return types.SimpleNamespace(dataset=dataset, output=output, config=TrainConfig(dataset=dataset, output=output,
                                                                                     **FAST))


@pytest.fixture
def no_model_loads(monkeypatch):
    """Calls that must be refused before any slow work: loading the model fails the test."""
    def load_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the run was refused")

    monkeypatch.setattr(models, "load_model", load_model)


def _files(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


def _refused(config, match):
    """Train with ``config`` (no model given: it would load one) and return the one-line refusal."""
    with pytest.raises(ValueError, match=match) as caught:
        train(config)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_a_new_run_refuses_a_folder_holding_an_adapter_unless_told_to_replace_it(run, litemedsam, no_model_loads):
    before = _files(run.output)
    message = _refused(run.config, "already holds an adapter")
    assert message == (f"{run.output} already holds an adapter: give another output, --resume to continue its run, "
                       "or --overwrite to replace it")
    with pytest.raises(ValueError, match="already holds an adapter"):  # what the worker can ask before its model loads
        check_start(run.config)
    from SAMFineTuneLib.worker import jobs

    def no_model(*key):
        raise AssertionError("the worker loaded the model before refusing the run")

    core = types.SimpleNamespace(loaded_model=no_model, segmenters=types.SimpleNamespace(segmenter=None))
    with pytest.raises(ValueError, match="already holds an adapter"):
        jobs.train(core, types.SimpleNamespace(params=dict(dataset=run.dataset, output=run.output), command="train"))
    os.remove(os.path.join(run.output, RESUME_FILE))  # nothing to continue: resuming would start it again
    _refused(TrainConfig(**dict(vars(run.config), resume=True)),
             f"holds an adapter but no {RESUME_FILE} to continue its run: give another output, or --overwrite")
    del before[RESUME_FILE]
    assert _files(run.output) == before
    card = train(TrainConfig(**dict(vars(run.config), overwrite=True, epochs=1, seed=3)), model=litemedsam)
    assert card["hyperparameters"]["seed"] == 3 and [h["epoch"] for h in card["history"]] == [1]
    assert not {"overwrite", "resume"} & set(card["hyperparameters"])  # about the folder, not the adapter


def test_overwrite_on_the_command_line():
    import argparse

    from SAMFineTuneLib import training

    parser = argparse.ArgumentParser()
    training.add_arguments(parser)
    assert not config_from_args(parser.parse_args(["--dataset", "d", "--output", "o"])).overwrite
    assert config_from_args(parser.parse_args(["--dataset", "d", "--output", "o", "--overwrite"])).overwrite


def test_a_damaged_or_other_resume_state_is_refused_before_the_model_loads(run, no_model_loads):
    state = os.path.join(run.output, RESUME_FILE)
    resume = TrainConfig(**dict(vars(run.config), resume=True))
    _refused(TrainConfig(**dict(vars(resume), seed=8)), "settings changed since it was written: seed 0 -> 8")
    saved = torch.load(state, weights_only=True)
    torch.save({k: v for k, v in saved.items() if k != "cases"}, state)
    _refused(resume, "the dataset changed since that run \\(the state records no case lists\\)")
    data = open(state, "rb").read()
    with open(state, "wb") as handle:  # cut short, as a copy onto a full disk leaves it
        handle.write(data[:len(data) // 2])
    before = _files(run.output)
    _refused(resume, f"cannot resume from .*{RESUME_FILE}: it does not read back \\(.+\\); start the run again "
                     "without --resume \\(with --overwrite\\), or give another output")
    with open(state, "wb"):
        pass
    _refused(resume, "it does not read back")
    before[RESUME_FILE] = b""
    assert _files(run.output) == before


def test_a_resume_on_a_dataset_that_has_grown_is_refused(run, no_model_loads):
    """Keep learning exports more cases into the dataset: a resumed run would train and validate
    on other cases and weigh its epochs against a best Dice of the old validation cases."""
    extra = make_cases(2, first_seed=400, slices=1)
    export_dataset(extra, run.dataset, splits={extra[0][0]: "train", extra[1][0]: "val"})
    _refused(TrainConfig(**dict(vars(run.config), resume=True)),
             "the dataset changed since that run \\(training cases changed \\(2 -> 3\\), validation cases changed "
             "\\(1 -> 2\\)\\); start a new run")


def test_a_resume_continues_the_run(run, litemedsam):
    card = train(TrainConfig(**dict(vars(run.config), resume=True)), model=litemedsam)
    assert [h["epoch"] for h in card["history"]] == [1, 2]


# ---------------------------------------------------------------- the embedding cache

def _write(data):
    return lambda path: open(path, "wb").write(data)


def _npy(array):
    return lambda path: np.save(path, array)


@pytest.mark.parametrize("damage", [
    _write(b""), _write(b"\x93NUMPY"), _write(b"\0" * 4096), _npy(np.zeros(10, np.float16)),
    _npy(np.zeros((256, 64, 64), np.float32)), _npy(np.zeros((256, 32, 32), np.float16)),
], ids=["empty", "header cut short", "zeros", "another shape", "float32", "another size"])
def test_a_damaged_embedding_cache_entry_is_encoded_again(tmp_path, damage):
    from SAMFineTuneLib.catalogue import get_spec
    from SAMFineTuneLib.dataset import case_samples
    from SAMFineTuneLib.training import prepare
    from SAMFineTuneLib.training.samples import read_embedding

    image, label = make_cases(1, first_seed=0, slices=1)[0][1:]
    samples = case_samples("c", image, np.asarray(label.array), "axial", "auto")
    model = types.SimpleNamespace(spec=get_spec("litemedsam"), fingerprint="fake:1", precision="float32",
                                  encode=lambda x: torch.full((x.shape[0], 256, 64, 64), 2.0))
    cache = str(tmp_path / "cache")
    prepare(model, samples, cache)
    (name,) = os.listdir(cache)
    damage(os.path.join(cache, name))
    again = prepare(model, samples, cache)
    assert again.stats == {"encoder_calls": len(samples), "cache_hits": 0}
    assert again.embeddings.shape == (len(samples), 256, 64, 64) and float(again.embeddings.max()) == 2.0
    assert os.listdir(cache) == [name] and read_embedding(cache, name[:-len(".npy")]).dtype == torch.float16
    damage(os.path.join(cache, name))
    assert read_embedding(cache, name[:-len(".npy")]) is None and not os.listdir(cache)  # a miss, and gone
