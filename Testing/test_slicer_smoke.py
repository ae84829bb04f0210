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


def fake_panel(monkeypatch, mainWindow):
    """slicer.util as Slicer 5.10 and 5.12 have it (Base/Python/slicer/util.py): selectModule goes
    through moduleSelector(), which raises without a main window; getModuleWidget builds the panel."""
    import types

    import slicer

    selected, parameters = [], types.SimpleNamespace()
    widget = types.SimpleNamespace(logic=types.SimpleNamespace(getParameterNode=lambda: parameters),
                                   ui=types.SimpleNamespace(segmentButton=types.SimpleNamespace(enabled=True)))

    def selectModule(name):
        if mainWindow is None:
            raise RuntimeError("Could not find main window")
        selected.append(name)

    monkeypatch.setattr(slicer.util, "mainWindow", lambda: mainWindow, raising=False)
    monkeypatch.setattr(slicer.util, "selectModule", selectModule, raising=False)
    monkeypatch.setattr(slicer.util, "getModuleWidget", lambda name: widget, raising=False)
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(processEvents=lambda: None), raising=False)
    return selected, parameters


@pytest.mark.parametrize("mainWindow", [None, "main window"])
def test_the_panel_step_runs_with_and_without_a_main_window(monkeypatch, mainWindow):
    """Testing/slicer_smoke.py runs with --no-main-window, where Slicer's selectModule raises."""
    from SAMFineTuneGUI.selftest import fillPanel

    selected, parameters = fake_panel(monkeypatch, mainWindow)
    fillPanel("volume", "roi")
    assert parameters.inputVolume == "volume" and parameters.rois == ["roi"] and parameters.window == "auto"
    assert selected == ([] if mainWindow is None else ["SAMFineTune"])
