"""Shared test set-up: two CPU threads (CI has two cores), the repo on sys.path, a cache folder of
the session's own, and models built once per session."""
import atexit
import os
import shutil
import sys
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "2")
# What the engine keeps in the user's cache (converted encoders, worker logs) goes to a folder of
# this session, inherited by the workers it starts, and removed at its end; one conversion then
# serves every test that does not name a cache folder of its own.
os.environ["SAMFINETUNE_CACHE"] = tempfile.mkdtemp(prefix="samfinetune-tests-")
atexit.register(shutil.rmtree, os.environ["SAMFINETUNE_CACHE"], True)
os.environ["SAMFINETUNE_DATA"] = tempfile.mkdtemp(prefix="samfinetune-tests-data-")  # never the user's Documents
atexit.register(shutil.rmtree, os.environ["SAMFINETUNE_DATA"], True)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def litemedsam():
    """The real LiteMedSAM with its pip-shipped weights, on the CPU."""
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from SAMFineTuneLib.models import load_model

    return load_model("litemedsam", device="cpu")


@pytest.hookimpl(tryfirst=True)  # before ``-m`` selects by marker
def pytest_collection_modifyitems(items):
    """Mark the Slicer-side tests (``test_slicer_*.py``) ``slicer_side``: run_tests.sh runs them on
    Slicer's Python, without torch, and on the engine's Python only those marked ``in_process``,
    which need torch in Slicer's process."""
    for item in items:
        if item.path.name.startswith("test_slicer_"):
            item.add_marker(pytest.mark.slicer_side)
