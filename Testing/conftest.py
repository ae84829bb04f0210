"""Shared test set-up: two CPU threads (CI has two cores), the repo on sys.path, and models
built once per session."""
import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "2")
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
