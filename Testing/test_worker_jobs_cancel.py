"""Each worker job's cancel is its own (one job ending leaves another's encoder check on), a cancel
during a model load ends the job and keeps nothing, and the evaluate plot lands whole or not at all.
Stand-ins replace the model: these tests load no weights."""
from __future__ import annotations

import errno
import os
import threading

import pytest

torch = pytest.importorskip("torch")

from SAMFineTuneLib import segmenter as segmenter_module  # noqa: E402
from SAMFineTuneLib.progress import Cancelled  # noqa: E402
from SAMFineTuneLib.worker import jobs  # noqa: E402
from SAMFineTuneLib.worker.core import WorkerCore  # noqa: E402


class FakeSegmenter:
    """Built instead of a model: records that a load ran; its encoder is two nested modules."""

    built = []

    def __init__(self, **options):
        self.options = options
        self.model = torch.nn.Module()
        self.model.image_encoder = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Identity()))
        FakeSegmenter.built.append(self)

    def set_adapter(self, adapter):
        pass


class FakeJob:
    """What a handler uses of ``session.RunningJob``; ``cancelled()`` answers from ``answers``."""

    command, id = "load_model", "j1"

    def __init__(self, params, answers):
        self.params, self.answers, self.asked = params, list(answers), 0

    def cancelled(self) -> bool:
        self.asked += 1
        return self.answers.pop(0) if self.answers else True

    def take_params(self, defaults, **given):
        return {**defaults, **given, **self.params}


@pytest.fixture
def core(monkeypatch):
    FakeSegmenter.built = []
    monkeypatch.setattr(segmenter_module, "Segmenter", FakeSegmenter)
    return WorkerCore()


def test_one_jobs_end_does_not_switch_off_another_jobs_encoder_cancel(core):
    """A job that outlives its conversation ends while the next conversation's job encodes: the
    later job's cancel must still stop its encoder (each job thread sets and clears its own)."""
    segmenter = core.get_segmenter(device="cpu", backend="torch")  # on_load hooks the encoder
    b_started, a_ended = threading.Event(), threading.Event()
    b_cancel = threading.Event()
    seen = {}

    def job_a():  # the old job: sets its check, then ends (its finally clears it) while B runs
        core.job_cancelled = lambda: False
        b_started.wait(10)
        core.job_cancelled = None
        a_ended.set()

    def job_b():
        core.job_cancelled = b_cancel.is_set
        b_started.set()
        a_ended.wait(10)
        b_cancel.set()  # the user cancels B
        try:
            segmenter.model.image_encoder(torch.zeros(1))
            seen["b"] = "ran to the end"
        except Cancelled:
            seen["b"] = "cancelled"
        finally:
            core.job_cancelled = None

    threads = [threading.Thread(target=job_a), threading.Thread(target=job_b)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"b": "cancelled"}
    assert core.job_cancelled is None  # nothing set on this thread


def test_a_cancel_during_the_model_load_ends_the_job_and_caches_nothing(core):
    job = FakeJob({"device": "cpu"}, answers=[False])  # not cancelled when the load starts, then cancelled
    with pytest.raises(Cancelled):
        jobs.load_model(core, job)
    assert len(FakeSegmenter.built) == 1 and job.asked == 2  # the load ran; the cancel was seen right after it
    assert core.segmenters.segmenter is None and core.segmenters.key is None
    fresh = core.get_segmenter(device="cpu")
    assert fresh is not FakeSegmenter.built[0] and core.get_segmenter(device="cpu") is fresh


def test_a_cancel_before_the_load_keeps_the_warm_model(core):
    warm = core.get_segmenter(device="cpu")
    with pytest.raises(Cancelled):
        jobs.load_model(core, FakeJob({"device": "cpu", "backend": "torch"}, answers=[True]))
    assert FakeSegmenter.built == [warm] and core.get_segmenter(device="cpu") is warm


def _report(folder):
    row = {"case": "c1", "label": 1, "slices": 3, "base": {"dice": 0.5}, "adapted": {"dice": 0.7}}
    return {"dataset": str(folder), "split": "val", "cases": [row],
            "mean": {"base": {"dice": 0.5}, "adapted": {"dice": 0.7}}}


def test_a_failed_plot_write_leaves_the_old_plot(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from SAMFineTuneLib.evaluate import write_plot
    from SAMFineTuneLib.files import WriteError

    plot = tmp_path / "dice.png"
    plot.write_bytes(b"the previous plot")

    def disk_fills(self, path, **kwargs):
        with open(path, "wb") as handle:
            handle.write(b"\x89PNG half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", disk_fills)
    with pytest.raises(WriteError, match="disk is full"):
        write_plot(_report(tmp_path), str(plot))
    assert plot.read_bytes() == b"the previous plot" and os.listdir(tmp_path) == ["dice.png"]


def test_plot_format_follows_the_extension_and_an_unknown_one_is_refused_first(tmp_path):
    from SAMFineTuneLib.evaluate import evaluate, write_plot

    bare = tmp_path / "dice"
    write_plot(_report(tmp_path), str(bare))
    assert bare.read_bytes().startswith(b"\x89PNG") and os.listdir(tmp_path) == ["dice"]
    write_plot(_report(tmp_path), str(tmp_path / "dice.svg"))
    assert b"<svg" in (tmp_path / "dice.svg").read_bytes()[:400]
    with pytest.raises(ValueError, match=r"dice.foo: '.foo' is not an image format"):
        evaluate(str(tmp_path / "no-dataset"), model="no-such-model", plot_path=str(tmp_path / "dice.foo"))
    assert sorted(os.listdir(tmp_path)) == ["dice", "dice.svg"]  # nothing left of the refused one
