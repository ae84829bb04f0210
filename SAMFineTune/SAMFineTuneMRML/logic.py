"""The module's logic without the Slicer application: MRML nodes <-> the engine.

``SAMFineTuneCoreLogic`` does all the MRML work and runs the engine two ways:

- blocking (``waitForCompletion=True``): the console, ``--python-script`` and batch runs.
  ``backend="inprocess"`` (default when blocking) keeps one ``SAMFineTuneLib.segmenter.Segmenter``
  (model + embedding cache) in this process; ``backend="worker"`` uses the worker's blocking
  ``run``.
- non-blocking (``waitForCompletion=False``): the job goes to the background worker process
  (``SAMFineTuneLib.client.WorkerClient``) and the returned task is advanced by calling
  ``poll()`` (the panel does it from a ``qt.QTimer``), so the GUI never freezes.

Either way the result is written only when the job succeeds, as one undoable step; on error,
cancel or a crashed worker the scene is left as it was. The user's ROI nodes are never
modified or deleted.

Only ``slicer`` core, ``vtk`` and ``numpy`` are imported here; torch and the engine are
imported on first use.
"""

import os
import sys

from . import geometry, segments
from .paths import adaptersDirectory, workerEnvironment

STATES_FINAL = ("done", "error", "cancelled")


def ensureLibraryImportable():
    """Make ``SAMFineTuneLib`` importable when running from the source tree (it sits beside the
    ``SAMFineTune`` folder there; an installed extension puts it next to the module)."""
    try:
        import SAMFineTuneLib  # noqa: F401
        return
    except ImportError:
        pass
    here = os.path.dirname(os.path.abspath(__file__))
    for candidate in (os.path.dirname(here), os.path.dirname(os.path.dirname(here))):
        if os.path.isdir(os.path.join(candidate, "SAMFineTuneLib")) and candidate not in sys.path:
            sys.path.insert(0, candidate)
            return


ensureLibraryImportable()
from SAMFineTuneLib.catalogue import MODEL_KEYS, MODEL_SPECS, SEGMENT_DEFAULTS, WINDOWS  # noqa: E402

#: (engine name, label) for the panel; every model but LiteMedSAM needs a checkpoint file.
MODEL_CHOICES = tuple((name, spec.title) for name, spec in MODEL_SPECS.items())
#: (window value, label): the engine's windows, and "custom" for the W/L the user types.
WINDOW_CHOICES = tuple(WINDOWS.items()) + (("custom", "custom W/L"),)


def checkOptions(options):
    unknown = sorted(set(options) - set(SEGMENT_DEFAULTS))
    if unknown:
        raise TypeError("unknown segmentation option(s): %s; known: %s"
                        % (", ".join(unknown), ", ".join(sorted(SEGMENT_DEFAULTS))))
    merged = dict(SEGMENT_DEFAULTS)
    merged.update({k: v for k, v in options.items() if v is not None or k in ("checkpoint", "adapter")})
    if merged["model"] != "litemedsam" and not merged["checkpoint"]:
        raise ValueError("Model '%s' needs a checkpoint file (only LiteMedSAM ships with its weights)." % merged["model"])
    return merged


class InProcessBackend:
    """The engine in this process: one long-lived Segmenter, rebuilt when model/device change."""

    def __init__(self):
        self._segmenter = None
        self._key = None

    def segmenter(self, options):
        ensureLibraryImportable()
        from SAMFineTuneLib.segmenter import Segmenter

        key = tuple(options[k] for k in MODEL_KEYS)
        if self._segmenter is None or self._key != key:
            self._segmenter = Segmenter(model=options["model"], checkpoint=options["checkpoint"], device=options["device"])
            self._key = key
        if self._segmenter.adapter != options["adapter"]:
            self._segmenter.set_adapter(options["adapter"])
        return self._segmenter

    def run(self, array, spacing, box, options, progress=None, cancel=None):
        segmenter = self.segmenter(options)
        result = segmenter.segment(array, box=box, axis=options["axis"], window=options["window"],
                                   box_mode=options["box_mode"], spacing=spacing,
                                   keep_largest=options["keep_largest"], fill_holes=options["fill_holes"],
                                   progress=progress, cancel=cancel)
        return result.mask, dict(result.stats or {})


class WorkerBackend:
    """The background worker process (started on first use, restarted after a crash)."""

    def __init__(self, client=None, python=None):
        self._client = client
        self.python = python

    @property
    def client(self):
        if self._client is None:
            ensureLibraryImportable()
            from SAMFineTuneLib.client import WorkerClient

            self._client = WorkerClient(python=self.python or pythonExecutable(), env=workerEnvironment())
        return self._client

    @staticmethod
    def params(spacing, box, options):
        params = dict(options)
        params["box"] = [int(v) for v in box]
        params["spacing"] = [float(s) for s in spacing]
        return params

    def run(self, array, spacing, box, options, progress=None, cancel=None):
        """Blocking: submit, follow progress, pass a cancel on; raises the job's error."""
        client = self.client
        job = client.submit("segment", self.params(spacing, box, options), {"volume": array})
        seen = None
        while not job.done:
            client.poll(timeout=0.1)
            if cancel is not None and cancel():
                client.cancel(job)
            if progress is not None and job.step[1] and (job.step, job.message) != seen:
                seen = (job.step, job.message)
                progress(job.step[0], job.step[1], job.message)
        result, arrays = client.wait(job)
        return arrays["mask"], dict(result.get("stats") or {})

    def shutdown(self):
        if self._client is not None:
            self._client.shutdown()
            self._client = None


def pythonExecutable():
    """Slicer's own Python (PythonSlicer) inside Slicer, else this interpreter."""
    import shutil

    if hasattr(sys.modules.get("slicer"), "app"):
        found = shutil.which("PythonSlicer")
        if found:
            return found
    return sys.executable


class WorkerTask:
    """A job in the background worker, advanced with ``poll()`` (the panel's QTimer).

    state: "queued" | "running" | "done" | "error" | "cancelled"; progress in 0..1; message;
    error (text); result (the job's result dict when done). ``onEvent(message)`` sees every
    worker event (progress, log lines); ``onFinished(task)`` is called once at the end.
    """

    def __init__(self, worker, onFinished=None, onEvent=None):
        self.worker = worker
        self.onFinished = onFinished
        self.onEvent = onEvent
        self.state = "queued"
        self.progress = 0.0
        self.message = "queued"
        self.error = None
        self.result = None
        self.job = None

    def submit(self, command, params, arrays=None):
        self.job = self.worker.client.submit(command, params, arrays)
        if self.onEvent is not None:
            self.job.on_event = self.onEvent
        return self

    @property
    def finished(self):
        return self.state in STATES_FINAL

    def reportProgress(self, done, total, message=""):
        self.state = "running"
        self.progress = float(done) / total if total else 0.0
        self.message = message or "%d/%d" % (done, total)

    def finish(self, state, message, error=None):
        self.state = state
        self.message = message
        self.error = error
        if state == "done":
            self.progress = 1.0
        if self.onFinished is not None:
            self.onFinished(self)

    def complete(self, result, arrays):
        self.result = result
        self.finish("done", "done")

    def poll(self):
        """Read the worker's events; finish the task when its job has ended. Returns True while
        the job is still running."""
        if self.finished:
            return False
        try:
            self.worker.client.poll()
        except Exception as exc:  # a crashed worker: the scene is left as it was
            self.finish("error", "worker failed", "The background worker failed: %s" % exc)
            return False
        job = self.job
        self.progress = float(job.progress or 0.0)
        self.message = job.message or job.state
        if job.state in ("queued", "running"):
            self.state = job.state
            return True
        if job.state == "done":
            try:
                self.complete(job.result or {}, job.arrays)
            except Exception as exc:
                self.finish("error", "could not use the result", str(exc))
        elif job.state == "cancelled":
            self.finish("cancelled", "cancelled")
        else:
            self.finish("error", "failed", job.error or "the worker reported an error")
        return False

    def cancel(self):
        """Ask the job to stop; nothing is written."""
        if self.job is not None and not self.finished:
            self.worker.client.cancel(self.job)


class SegmentTask(WorkerTask):
    """One ROI -> one segment. Blocking runs return it finished; non-blocking ones are advanced
    with ``poll()``. Besides WorkerTask's fields: stats (engine statistics), roiBox
    (geometry.RoiBox, with its clipping warning), segmentId (the segment written)."""

    def __init__(self, logic, volumeNode, roiNode, segmentationNode, segmentId, roiBox, options, onFinished=None):
        WorkerTask.__init__(self, logic.worker, onFinished)
        self.logic = logic
        self.volumeNode = volumeNode
        self.roiNode = roiNode
        self.segmentationNode = segmentationNode
        self.segmentId = segmentId
        self.roiBox = roiBox
        self.options = options
        self.stats = {}

    @property
    def warning(self):
        return self.roiBox.warning if self.roiBox is not None else None

    def complete(self, result, arrays):
        """Write the mask (one undoable step) and mark the task done."""
        mask = arrays["mask"]
        self.logic.writeMask(mask, self.volumeNode, self.segmentationNode, self.segmentId, self.roiBox.box)
        self.stats = dict(result.get("stats") or {})
        self.result = result
        self.finish("done", "done: %d voxels in '%s'" % (int((mask > 0).sum()), self.segmentName()))

    def segmentName(self):
        segment = self.segmentationNode.GetSegmentation().GetSegment(self.segmentId)
        return segment.GetName() if segment is not None else self.segmentId


class SAMFineTuneCoreLogic:
    """MRML <-> engine. Usable from the Python console, batch scripts and plain Python."""

    def __init__(self, inProcess=None, worker=None):
        self.inProcess = inProcess or InProcessBackend()
        self.worker = worker or WorkerBackend()
        self.history = segments.UndoHistory()
        self.saveStateForUndoHook = None  # set by the panel: also saves the Segment Editor's undo state

    # ------------------------------------------------------------ geometry

    def volumeToArray(self, volumeNode):
        """(KJI numpy array, 4x4 IJK-to-RAS array including the volume's parent transforms)."""
        return geometry.volumeToArray(volumeNode)

    def roiToIJKBox(self, roiNode, volumeNode):
        """geometry.RoiBox: inclusive (i0, j0, k0, i1, j1, k1) box, clipped, with a warning."""
        return geometry.roiToIJKBox(roiNode, volumeNode)

    # ------------------------------------------------------------ segments

    def createSegmentation(self, volumeNode, name=None):
        scene = volumeNode.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or (volumeNode.GetName() + " SAM"))
        segments.prepareSegmentation(node, volumeNode)
        node.SetNodeReferenceID("SAMFineTuneSourceVolume", volumeNode.GetID())
        return node

    def writeMask(self, mask, volumeNode, segmentationNode, segmentId, box=None):
        """Mask (KJI, volume-shaped) -> segment inside ``box``, one undoable step."""
        if self.saveStateForUndoHook is not None:
            self.saveStateForUndoHook(segmentationNode, volumeNode)
        return segments.writeMaskToSegment(mask, volumeNode, segmentationNode, segmentId, box,
                                           history=self.history.forNode(segmentationNode))

    def undo(self, segmentationNode):
        """Return the segmentation to its state before the last result; False if none."""
        return self.history.undo(segmentationNode)

    def segmentArray(self, segmentationNode, segmentId, volumeNode):
        return segments.segmentToArray(segmentationNode, segmentId, volumeNode)

    # ------------------------------------------------------------ segmentation

    def prepareTask(self, volumeNode, roiNode, segmentationNode=None, segmentId=None, segmentName=None,
                    onFinished=None, **options):
        options = checkOptions(options)
        roiBox = geometry.roiToIJKBox(roiNode, volumeNode)
        if segmentationNode is None:
            segmentationNode = self.createSegmentation(volumeNode)
        segments.prepareSegmentation(segmentationNode, volumeNode)
        segmentId = segments.ensureSegment(segmentationNode, segmentId, segmentName or roiNode.GetName())
        options = dict(options, axis=geometry.engineAxis(volumeNode, options["axis"]))
        return SegmentTask(self, volumeNode, roiNode, segmentationNode, segmentId, roiBox, options, onFinished)

    def segment(self, volumeNode, roiNode, segmentationNode=None, segmentId=None, segmentName=None,
                waitForCompletion=True, backend=None, progress=None, cancel=None, onFinished=None, **options):
        """Segment the structure inside ``roiNode`` on ``volumeNode`` into a segment.

        The segment is ``segmentId`` if given, else the segment named ``segmentName`` (default:
        the ROI's name), created when missing; ``segmentationNode=None`` creates a new
        segmentation. ``options``: model, checkpoint, adapter, device, axis
        (anatomical: axial/coronal/sagittal), window, box_mode (tracked/fixed), keep_largest,
        fill_holes.

        Blocking (default): returns the finished SegmentTask; errors raise. ``backend``:
        "inprocess" (default) or "worker". ``progress(done, total, message)`` and
        ``cancel() -> bool`` follow the engine's convention.

        Non-blocking: the job goes to the worker; call ``task.poll()`` until it returns False
        (``onFinished(task)`` is called at the end).
        """
        task = self.prepareTask(volumeNode, roiNode, segmentationNode, segmentId, segmentName, onFinished, **options)
        array, _ = geometry.volumeToArray(volumeNode)
        spacing = geometry.volumeSpacing(volumeNode)
        if waitForCompletion:
            runner = self.worker if backend == "worker" else self.inProcess

            def onProgress(done, total, message=""):
                task.reportProgress(done, total, message)
                if progress is not None:
                    progress(done, total, message)

            task.state = "running"
            try:
                mask, stats = runner.run(array, spacing, task.roiBox.box, task.options, onProgress, cancel)
            except Exception as exc:
                from SAMFineTuneLib.progress import Cancelled

                if isinstance(exc, Cancelled):
                    task.finish("cancelled", "cancelled")
                    return task
                task.finish("error", "failed", str(exc))
                raise
            task.complete({"stats": stats}, {"mask": mask})
            return task
        if backend == "inprocess":
            raise ValueError("Non-blocking segmentation runs in the background worker; use backend='worker'.")
        return task.submit("segment", WorkerBackend.params(spacing, task.roiBox.box, task.options), {"volume": array})

    def segmentROIs(self, volumeNode, roiNodes, segmentationNode=None, **kwargs):
        """Several ROIs = several structures: one segment per ROI, named after it. Returns the
        tasks (finished when blocking). A new segmentation is shared by all ROIs."""
        if not roiNodes:
            raise ValueError("No ROI given: place at least one Markups ROI.")
        if segmentationNode is None:
            segmentationNode = self.createSegmentation(volumeNode)
        return [self.segment(volumeNode, roi, segmentationNode, **kwargs) for roi in roiNodes]

    # ------------------------------------------------------------ training sets, fine-tuning, adapters

    def exportTrainingSet(self, cases, outputDir, structureName, valFraction=0.2, seed=0, progress=None):
        """Append cases to a training set on disk (MSD/nnU-Net layout, split by case).

        ``cases``: [(volumeNode, segmentationNode, segmentId)], e.g. from
        ``training.findCases(scene, structureName)``; each becomes one case with label 1 =
        ``structureName``. Runs here (it only writes files). Returns the engine's summary."""
        from . import training

        if not cases:
            raise ValueError("No case to export: segment '%s' on at least one volume first." % structureName)
        ensureLibraryImportable()
        from SAMFineTuneLib.dataset import export_dataset

        used = set()
        prepared = [training.caseFromNodes(volume, node, segmentId, training.caseId(volume, used))
                    for volume, node, segmentId in cases]
        return export_dataset(prepared, outputDir, val_fraction=valFraction, seed=seed,
                              label_names={1: structureName}, progress=progress)

    def train(self, dataset, output=None, name=None, waitForCompletion=True, progress=None, cancel=None, log=None,
              onFinished=None, onEvent=None, **config):
        """Fine-tune a LoRA adapter on ``dataset``; it is written to ``output`` (default: the
        adapters library, folder ``name``). ``config``: other ``training.TrainConfig`` fields
        (model, checkpoint, device, epochs, ...).

        Blocking (console, scripts): runs here and returns the model card. Non-blocking (the
        panel): runs in the worker and returns a WorkerTask; its ``onEvent`` sees each epoch's
        loss/Dice message (``training.TrainingCurve.addFromMessage``)."""
        if output is None:
            if not name:
                raise ValueError("Give the adapter a name (or an output folder).")
            output = os.path.join(adaptersDirectory(), name)
        params = dict(config, dataset=os.path.abspath(dataset), output=os.path.abspath(output))
        if waitForCompletion:
            ensureLibraryImportable()
            from SAMFineTuneLib.training import TrainConfig, train

            return train(TrainConfig(**params), progress=progress, cancel=cancel, log=log)
        task = WorkerTask(self.worker, onFinished, onEvent)
        task.output = params["output"]
        return task.submit("train", params)

    def deviceInfo(self, onFinished=None):
        """Non-blocking: what the worker sees (device, GPU name and memory) in ``task.result``."""
        return WorkerTask(self.worker, onFinished).submit("info", {})

    def listAdapters(self, folder=None):
        """[(name, path)] of fine-tuned adapters in the library (folders with a model card)."""
        folder = folder or adaptersDirectory()
        found = []
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if os.path.isfile(os.path.join(path, "model_card.json")):
                    found.append((name, path))
        return found

    def shutdown(self):
        self.worker.shutdown()


def describeDevice(info):
    """One line for the panel from the worker's ``info`` result."""
    if not info:
        return "unknown"
    if info.get("error"):
        return info["error"]
    device = info.get("device") or "?"
    text = device.upper() if device != "cuda" else "GPU %s" % (info.get("cuda_name") or "")
    memory = info.get("memory") or {}
    if memory.get("gpu_total"):
        text += ", %.1f GiB (%.1f GiB free)" % (memory["gpu_total"] / 2.0 ** 30, memory.get("gpu_free", 0) / 2.0 ** 30)
    elif memory.get("ram_total"):
        text += ", %.1f GiB RAM" % (memory["ram_total"] / 2.0 ** 30)
    return "%s; torch %s" % (text.strip(), info.get("torch") or "?")
