"""Where the engine runs for the Slicer side: in this process, or in the background worker.

Inside the Slicer application the worker is always used, so torch never loads into Slicer and
its GUI never waits on the engine. Plain Python and batch runs outside Slicer may run the
engine in their own process (``InProcessBackend``), which saves starting a worker.

Both backends segment one ROI of a volume given as a KJI array. The worker keeps the last
volumes it received under a key, so a batch of ROIs on one volume sends the voxels once: the
first job carries the array, the others name its key.
"""

from .library import ensureLibraryImportable
from .paths import workerEnvironment, workerLogPath, workerPython

ensureLibraryImportable()
from SAMFineTuneLib.catalogue import MODEL_KEYS  # noqa: E402


def segmentParams(spacing, box, options, volumeKey=None):
    """The worker's ``segment``/``reprompt`` parameters."""
    params = dict(options, box=[int(v) for v in box], spacing=[float(s) for s in spacing])
    if volumeKey:
        params["volume_key"] = volumeKey
    return params


class InProcessBackend:
    """The engine in this process: the model is kept between calls (the engine's SegmenterCache,
    as in the worker), replaced when the model or device changes, its adapter swapped in place."""

    def __init__(self):
        self._segmenters = None

    def segmenter(self, options):
        from SAMFineTuneLib.segmenter_cache import SegmenterCache

        self._segmenters = self._segmenters or SegmenterCache()
        return self._segmenters.get(**{k: options[k] for k in MODEL_KEYS + ("adapter",)})

    def segment(self, array, volumeKey, spacing, box, options, progress=None, cancel=None):
        """Blocking: (mask, stats). ``volumeKey`` is not needed here: the array is always given."""
        engineOptions = {k: v for k, v in options.items() if k not in MODEL_KEYS + ("adapter",)}
        result = self.segmenter(options).segment(array, box=box, spacing=spacing, progress=progress, cancel=cancel,
                                                 **engineOptions)
        return result.mask, dict(result.stats or {})

    def train(self, params, progress=None, cancel=None, log=None):
        from SAMFineTuneLib.training import TrainConfig, train

        return train(TrainConfig(**params), progress=progress, cancel=cancel, log=log)

    def shutdown(self):
        if self._segmenters is not None:
            self._segmenters.clear()


class WorkerBackend:
    """The background worker process (started on first use, restarted after a crash)."""

    def __init__(self, client=None):
        self._client = client

    @property
    def client(self):
        if self._client is None:
            from SAMFineTuneLib.client import WorkerClient

            self._client = WorkerClient(python=workerPython(), env=workerEnvironment(), log_path=workerLogPath(),
                                        reader="poll")  # Qt's idle loop holds the GIL: a reader thread would lag
        return self._client

    def submit(self, command, params, arrays=None):
        return self.client.submit(command, params, arrays)

    def submitSegment(self, array, volumeKey, spacing, box, options):
        """A ``segment`` job carrying the array, or, with ``array`` None, a ``reprompt`` of the
        volume the worker holds under ``volumeKey``."""
        params = segmentParams(spacing, box, options, volumeKey)
        if array is None:
            return self.submit("reprompt", params)
        return self.submit("segment", params, {"volume": array})

    def segment(self, array, volumeKey, spacing, box, options, progress=None, cancel=None):
        """Blocking: (mask, stats); raises the job's error (a cancel raises progress.Cancelled)."""
        job = self.submitSegment(array, volumeKey, spacing, box, options)
        result, arrays = self.client.wait(job, progress=progress, cancel=cancel)
        return arrays["mask"], dict(result.get("stats") or {})

    def train(self, params, progress=None, cancel=None, log=None):
        job = self.submit("train", params)
        if log is not None:
            job.on_event = lambda message: message.get("event") == "log" and log(str(message.get("message", "")))
        result, _ = self.client.wait(job, progress=progress, cancel=cancel)
        return result.get("card")

    def shutdown(self):
        if self._client is not None:
            self._client.shutdown()
            self._client = None
