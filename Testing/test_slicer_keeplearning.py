"""Keep learning: retraining after every few exported cases, and the adapter in use kept until a
new one scores better on the validation cases (fake worker, real folders)."""
import json
import os

import pytest

from slicer_scene import scene  # noqa: F401
from fake_worker import FakeWorkerClient
from SAMFineTuneMRML.backends import WorkerBackend
from SAMFineTuneMRML.keeplearning import KeepLearning
from SAMFineTuneMRML.logic import SAMFineTuneCoreLogic


class LearningClient(FakeWorkerClient):
    """Trains by writing an adapter folder whose card has ``new`` validation Dice (reference
    boxes) and, with ``fromRoi`` ({"in use": Dice, "candidate": Dice}), a tracking choice; scores
    the adapter in use at ``current`` with boxes and each adapter at its ``fromRoi`` Dice from one
    ROI; ``fail`` makes training fail."""

    def __init__(self, new=0.8, current=0.7, fail=False, fromRoi=None):
        FakeWorkerClient.__init__(self)
        self.new, self.current, self.fail, self.fromRoi = new, current, fail, fromRoi

    def answer(self, job):
        if job.command == "evaluate":
            which = "candidate" if job.params["adapter"].endswith(".candidate") else "in use"
            dice = self.fromRoi[which] if "roi_margin" in job.params else self.current
            job.state, job.result = "done", {"report": {"mean": {"adapted": {"dice": dice}}}}
        elif self.fail:
            job.state, job.error = "error", "ValueError: the dataset has no validation case"
        else:
            card = {"scores": {"adapted": {"dice": self.new}}}
            if self.fromRoi is not None:
                card["tracking_choice"] = {"min_margin_px": 2, "dice": {"2": self.fromRoi["candidate"]}}
            os.makedirs(job.params["output"])
            with open(os.path.join(job.params["output"], "model_card.json"), "w") as handle:
                json.dump(card, handle)
            job.state, job.result = "done", {"card": card}


def adapter_in_use(folder, dice):
    os.makedirs(folder)
    with open(os.path.join(folder, "model_card.json"), "w") as handle:
        json.dump({"scores": {"adapted": {"dice": dice}}, "mark": "in use"}, handle)


def card_of(folder):
    with open(os.path.join(folder, "model_card.json")) as handle:
        return json.load(handle)


def finish(run):
    while run.poll():
        pass
    return run


@pytest.mark.parametrize("new,current,state", [(0.8, 0.7, "kept"), (0.6, 0.7, "discarded"), (0.8, None, "kept")])
def test_a_new_adapter_replaces_the_one_in_use_only_when_it_scores_better(tmp_path, new, current, state):
    adapter = str(tmp_path / "liver")
    if current is not None:
        adapter_in_use(adapter, current)
    client = LearningClient(new=new, current=current)
    learning = KeepLearning(SAMFineTuneCoreLogic(worker=WorkerBackend(client=client)), every=3)
    assert learning.exported(2, str(tmp_path / "set"), adapter, model="litemedsam") is None
    run = finish(learning.exported(1, str(tmp_path / "set"), adapter, model="litemedsam"))
    assert run.state == state, run.message
    commands = [job.command for job in client.jobs]
    assert commands == (["train", "evaluate"] if current is not None else ["train"])
    assert client.jobs[0].params["output"] == str(tmp_path / ".liver.candidate")  # hidden from the adapter list
    assert client.jobs[0].params["overwrite"]  # the candidate folder is the run's own, whatever a killed run left
    assert card_of(adapter)["scores"]["adapted"]["dice"] == (new if state == "kept" else current)
    assert os.listdir(tmp_path) == ["liver"]
    if current is not None:
        assert client.jobs[1].params["adapter"] == adapter


@pytest.mark.parametrize("fromRoi,state", [({"in use": 0.75, "candidate": 0.7}, "discarded"),
                                           ({"in use": 0.6, "candidate": 0.7}, "kept")])
def test_adapters_of_tracked_structures_are_compared_from_one_roi(tmp_path, fromRoi, state):
    """The candidate scores higher with reference boxes (0.8 against 0.7) in both runs; from one
    ROI, as users segment, it is worse in one and better in the other, which decides."""
    adapter = str(tmp_path / "liver")
    adapter_in_use(adapter, 0.7)
    client = LearningClient(new=0.8, current=0.7, fromRoi=fromRoi)
    learning = KeepLearning(SAMFineTuneCoreLogic(worker=WorkerBackend(client=client)), every=1)
    run = finish(learning.exported(1, str(tmp_path / "set"), adapter, model="litemedsam"))
    assert run.state == state and "from one ROI" in run.message, run.message
    assert [job.command for job in client.jobs] == ["train", "evaluate", "evaluate"]
    scored = [job.params for job in client.jobs[1:]]
    assert [params["adapter"] for params in scored] == [adapter, str(tmp_path / ".liver.candidate")]
    assert all(params["roi_margin"] == 3 and params["dataset"] == str(tmp_path / "set") for params in scored)
    assert ("tracking_choice" in card_of(adapter)) == (state == "kept")
    assert os.listdir(tmp_path) == ["liver"]


def test_a_failed_retraining_leaves_the_adapter_in_use_and_one_run_at_a_time(tmp_path):
    adapter = str(tmp_path / "liver")
    adapter_in_use(adapter, 0.7)
    client = LearningClient(fail=True)
    learning = KeepLearning(SAMFineTuneCoreLogic(worker=WorkerBackend(client=client)), every=1)
    run = learning.exported(1, str(tmp_path / "set"), adapter)
    assert learning.exported(1, str(tmp_path / "set"), adapter) is None  # one run at a time
    finish(run)
    assert run.state == "failed" and "no validation case" in run.message
    assert card_of(adapter)["mark"] == "in use"
    assert learning.exported(1, str(tmp_path / "set"), adapter) is not None  # the next export starts again


def test_a_better_candidate_waits_while_a_training_writes_the_adapter_in_use(tmp_path):
    """A training into the adapter's folder (a manual Train) holds its lock: keep learning must not
    swap under it; the run says so and the candidate stays whole for the user."""
    from SAMFineTuneLib.adapter_folders import FolderLock

    adapter = str(tmp_path / "liver")
    adapter_in_use(adapter, 0.7)
    learning = KeepLearning(SAMFineTuneCoreLogic(worker=WorkerBackend(client=LearningClient(new=0.8))), every=1)
    with FolderLock(adapter, "training"):
        run = finish(learning.exported(1, str(tmp_path / "set"), adapter, model="litemedsam"))
    assert run.state == "failed" and "being written by another run (training by process" in run.message, run.message
    assert card_of(adapter)["mark"] == "in use"
    assert card_of(str(tmp_path / ".liver.candidate"))["scores"]["adapted"]["dice"] == 0.8


def test_a_linked_adapter_folder_stays_a_link_to_the_new_adapter(tmp_path):
    library = tmp_path / "library"
    os.makedirs(library / "versions")
    adapter_in_use(str(library / "versions" / "v1"), 0.7)
    os.symlink(library / "versions" / "v1", library / "current")
    learning = KeepLearning(SAMFineTuneCoreLogic(worker=WorkerBackend(client=LearningClient(new=0.8))), every=1)
    run = finish(learning.exported(1, str(tmp_path / "set"), str(library / "current"), model="litemedsam"))
    assert run.state == "kept", run.message
    assert os.path.islink(library / "current") and card_of(str(library / "versions" / "v1"))["scores"]["adapted"][
        "dice"] == 0.8
    assert sorted(os.listdir(library)) == ["current", "versions"] and os.listdir(library / "versions") == ["v1"]
