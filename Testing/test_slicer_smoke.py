"""The installation check of Testing/slicer_smoke.py and the module's self-test, on slicer-core:
segment a synthetic CT in the real background worker, undo, export two cases, train one epoch,
chart. Only the panel step needs the Slicer application and is skipped here.

On the Slicer-side run (Python 3.12, no torch) the worker runs under $SAMFINETUNE_WORKER_PYTHON,
as it runs under PythonSlicer inside Slicer."""
import importlib.util
import os

import pytest

from slicer_scene import scene  # noqa: F401
from SAMFineTuneMRML.logic import SAMFineTuneCoreLogic
from SAMFineTuneMRML.smoke import SmokeRun


@pytest.mark.slow
def test_smoke_steps_pass_with_the_real_worker(scene, tmp_path, monkeypatch):
    if importlib.util.find_spec("torch") is None and not os.environ.get("SAMFINETUNE_WORKER_PYTHON"):
        pytest.skip("no torch here and no $SAMFINETUNE_WORKER_PYTHON for the worker")
    monkeypatch.setenv("SAMFINETUNE_CACHE", str(tmp_path / "cache"))
    said = []
    logic = SAMFineTuneCoreLogic()
    logic.worker.client.env["OMP_NUM_THREADS"] = "2"
    try:
        SmokeRun(logic, scene, say=said.append, workFolder=str(tmp_path)).run()
    finally:
        logic.shutdown()
    assert said[-1] == "smoke test passed"
    assert [line.split(".")[0] for line in said[:-1]] == ["1", "2", "3", "4", "5", "6"]
    assert "skipped" in said[1] and "Dice" in said[2]
