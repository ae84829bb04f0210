"""Where the engine runs for the Slicer side: in this process, or in the background worker.

Inside the Slicer application the worker is always used, so torch never loads into Slicer and
its GUI never waits on the engine. Plain Python and batch runs outside Slicer may run the
engine in their own process (``InProcessBackend``), which saves starting a worker.

Both backends segment one ROI of a volume named by a key (``geometry.volumeKey``: it changes
whenever the voxels do) and given by ``voxels()``, which returns its KJI array. The worker keeps
the last volumes it received under their keys, so the voxels travel once per worker, not once per
Segment click, ROI or click of the SAM effect (a 512 x 512 x 600 CT is 300 MB): a job names the
key, and one the worker answers with ``UNKNOWN_VOLUME`` (it restarted, or let the volume go) is sent
again with the voxels.
"""

from .library import ensureLibraryImportable
from .paths import workerEnvironment, workerLogPath, workerPython

ensureLibraryImportable()
from SAMFineTuneLib.catalogue import MODEL_KEYS  # noqa: E402


#: How a worker's error begins when a job names a volume it does not hold.
UNKNOWN_VOLUME = "UnknownVolume"


def lostVolume(error):
    """Whether a job's error (text or exception) says the worker no longer holds its volume, so the
    job is worth sending once more with the voxels."""
    return str(error or "").startswith(UNKNOWN_VOLUME)


def segmentParams(spacing, box, options):
    """The worker's ``segment``/``reprompt`` parameters."""
    return dict(options, box=[int(v) for v in box], spacing=[float(s) for s in spacing])


class InProcessBackend:
    """The engine in this process: the model is kept between calls (the engine's SegmenterCache,
    as in the worker), replaced when the model or device changes, its adapter swapped in place."""

    def __init__(self):
        self._segmenters = None

    def segmenter(self, options):
        from SAMFineTuneLib.segmenter_cache import SegmenterCache

        self._segmenters = self._segmenters or SegmenterCache()
        return self._segmenters.get(**{k: options[k] for k in MODEL_KEYS + ("adapter",)})

    def segment(self, volumeKey, voxels, spacing, box, options, progress=None, cancel=None):
        """Blocking: (mask, stats). ``volumeKey`` is not needed here: the engine reads ``voxels()``."""
        engineOptions = {k: v for k, v in options.items() if k not in MODEL_KEYS + ("adapter",)}
        result = self.segmenter(options).segment(voxels(), box=box, spacing=spacing, progress=progress,
                                                 cancel=cancel, **engineOptions)
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
        self._held = set()  # (volume key, worker start count) of each volume sent to the worker

    @property
    def client(self):
        if self._client is None:
            from SAMFineTuneLib.client import WorkerClient

            self._client = WorkerClient(python=workerPython(), env=workerEnvironment(), log_path=workerLogPath(),
                                        reader="poll")  # Qt's idle loop holds the GIL: a reader thread would lag
        return self._client

    def submit(self, command, params, arrays=None):
        return self.client.submit(command, params, arrays)

    def holds(self, volumeKey):
        """Whether the running worker was sent the volume ``volumeKey`` (it may since have let it go)."""
        return (volumeKey, self.client.starts) in self._held

    def submitWithVolume(self, command, params, volumeKey, voxels, arrays=None, resend=False):
        """A job naming its volume by ``volumeKey``, carrying the voxels (``voxels()``) when the
        worker was not sent them or, with ``resend``, said it no longer holds them."""
        arrays = dict(arrays or {})
        if resend or not self.holds(volumeKey):
            arrays["volume"] = voxels()
        job = self.submit(command, dict(params, volume_key=volumeKey), arrays)
        if "volume" in arrays:
            self._held = {held for held in self._held if held[1] == self.client.starts}
            self._held.add((volumeKey, self.client.starts))
        return job

    def submitSegment(self, volumeKey, voxels, spacing, box, options, resend=False):
        """A ``reprompt`` of the volume the worker holds under ``volumeKey``, or a ``segment`` job
        carrying its voxels."""
        params = segmentParams(spacing, box, options)
        if not resend and self.holds(volumeKey):
            return self.submit("reprompt", dict(params, volume_key=volumeKey))
        return self.submitWithVolume("segment", params, volumeKey, voxels, resend=True)

    def segment(self, volumeKey, voxels, spacing, box, options, progress=None, cancel=None):
        """Blocking: (mask, stats); raises the job's error (a cancel raises progress.Cancelled)."""
        job = self.submitSegment(volumeKey, voxels, spacing, box, options)
        try:
            result, arrays = self.client.wait(job, progress=progress, cancel=cancel)
        except Exception as exc:
            if not lostVolume(exc):
                raise
            job = self.submitSegment(volumeKey, voxels, spacing, box, options, resend=True)
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
        self._held = set()  # a new client counts its workers from 0 again
