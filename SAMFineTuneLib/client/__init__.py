"""Talk to the background worker: start it, send jobs, follow them, notice when it dies.

Plain Python (no Qt, no torch), so Slicer's panel, the Python console, batch scripts and CI all
use the same class::

    client = WorkerClient(reader="poll")        # the worker starts on the first job; no reader thread
    job = client.submit("segment", {"box": [10, 12, 3, 40, 44, 9]}, {"volume": array_kji})
    # from a qt.QTimer every ~100 ms:
    client.poll()                               # never blocks; updates job.state / progress / message
    if job.state == "done": mask = job.arrays["mask"]
    client.cancel(job)                          # the worker stops it within a second or two

    result, arrays = client.run("segment", params, {"volume": array_kji}, progress=print)  # blocking

``reader="poll"`` (what Slicer uses) reads what the worker sent inside ``poll``; the default
``"thread"`` has a reader thread, which suits plain Python but lags in Slicer, whose idle Qt loop
does not release the GIL. A worker that dies (killed, out of memory, segfault) turns its jobs into errors with a
``WorkerCrashed`` message; the next ``submit`` starts a fresh one. ``WorkerClient(address=
"127.0.0.1:8765", token=...)`` talks to ``python -m SAMFineTuneLib serve`` instead, e.g. a GPU
box reached through an SSH tunnel.
"""
from .connections import kill_process_tree
from .jobs import FINAL_STATES, Job, JobCancelled, JobError, JobTimeout, WorkerCrashed
from .worker_client import BOOT, LOG_ROTATE_BYTES, PACKAGE_PARENT, WorkerClient

__all__ = ["BOOT", "FINAL_STATES", "Job", "JobCancelled", "JobError", "JobTimeout", "LOG_ROTATE_BYTES",
           "PACKAGE_PARENT", "WorkerClient", "WorkerCrashed", "kill_process_tree"]
