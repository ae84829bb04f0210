"""The module's logic without the Slicer application: MRML nodes <-> the engine.

``SAMFineTuneCoreLogic`` does all the MRML work and runs the engine two ways:

- blocking (``waitForCompletion=True``): the Python console, ``--python-script`` and batch runs;
- non-blocking (``waitForCompletion=False``): the job goes to the background worker and the
  returned task is advanced by calling ``poll()`` (the panel does it from a ``qt.QTimer``), so
  the GUI never freezes.

Inside the Slicer application both go through the background worker (``backends``), so torch
never loads into Slicer; plain Python may run the engine in its own process instead.
Either way a result is written only when the job succeeds, as one undoable step; on error,
cancel or a crashed worker the scene is left as it was. The user's ROI nodes are never
modified or deleted.

Only ``slicer`` core, ``vtk`` and ``numpy`` are imported here; torch and the engine's heavy
parts are imported on first use, in whichever process runs them.
"""

import functools
import os

import slicer

from . import geometry, segments
from .backends import InProcessBackend, WorkerBackend
from .options import adapterWindowWarning, checkOptions
from .paths import adapterFolder, adaptersDirectory
from .scene import haveApplication, removeNodes
from .tasks import SegmentTask, Task

#: Where blocking work runs: the background worker, or this process.
RUN_IN = ("worker", "inprocess")


class SAMFineTuneCoreLogic:
    """MRML <-> engine. Usable from the Python console, batch scripts and plain Python."""

    def __init__(self, inProcess=None, worker=None):
        self.inProcess = inProcess or InProcessBackend()
        self.worker = worker or WorkerBackend()
        self.history = segments.UndoHistory()
        self.saveStateForUndoHook = None  # set by the panel: also saves the Segment Editor's undo state

    def defaultRunIn(self):
        """The worker inside the Slicer application, this process elsewhere."""
        return "worker" if haveApplication() else "inprocess"

    def runner(self, runIn):
        runIn = runIn or self.defaultRunIn()
        if runIn not in RUN_IN:
            raise ValueError("Unknown runIn '%s'; choose one of: %s." % (runIn, ", ".join(RUN_IN)))
        return self.worker if runIn == "worker" else self.inProcess

    # ------------------------------------------------------------ segments

    def createSegmentation(self, volumeNode, name=None):
        scene = volumeNode.GetScene()
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name or (volumeNode.GetName() + " SAM"))
        segments.prepareSegmentation(node, volumeNode)
        node.SetNodeReferenceID(segments.SOURCE_VOLUME_ROLE, volumeNode.GetID())
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

    def prepareTask(self, volumeNode, roiNode, segmentationNode, segmentId=None, segmentName=None,
                    onFinished=None, **options):
        """Check everything about one ROI and make its task; nothing runs yet."""
        options = checkOptions(options)
        roiBox = geometry.roiToIJKBox(roiNode, volumeNode)
        segments.checkLabelmapSource(segmentationNode)
        segments.prepareSegmentation(segmentationNode, volumeNode)
        segmentName = segmentName or roiNode.GetName()
        existed = bool(segmentId or segmentationNode.GetSegmentation().GetSegmentIdBySegmentName(segmentName))
        segmentId = segments.ensureSegment(segmentationNode, segmentId, segmentName)
        options = dict(options, axis=geometry.engineAxis(volumeNode, options["axis"]))
        return SegmentTask(self, volumeNode, roiNode, segmentationNode, segmentId, roiBox, options, onFinished,
                           createdSegment=not existed,
                           optionsWarning=adapterWindowWarning(options, slicer.util.arrayFromVolume(volumeNode)))

    def segment(self, volumeNode, roiNode, segmentationNode=None, segmentId=None, segmentName=None, **kwargs):
        """Segment the structure inside ``roiNode`` on ``volumeNode`` into a segment.

        The segment is ``segmentId`` if given, else the segment named ``segmentName`` (default:
        the ROI's name), created when missing; ``segmentationNode=None`` creates a new
        segmentation. Options (``SAMFineTuneLib.catalogue.SEGMENT_DEFAULTS``): model,
        checkpoint, adapter, device, axis (anatomical: axial/coronal/sagittal), window,
        box_mode (``catalogue.BOX_MODES``), keep_largest, fill_holes. Other keywords as ``segmentROIs``.
        Returns the task (finished when blocking).
        """
        return self.segmentROIs(volumeNode, [roiNode], segmentationNode, segmentIds=[segmentId],
                                segmentNames=[segmentName], **kwargs)[0]

    def segmentROIs(self, volumeNode, roiNodes, segmentationNode=None, segmentIds=None, segmentNames=None,
                    waitForCompletion=True, runIn=None, progress=None, cancel=None, onFinished=None, **options):
        """Several ROIs = several structures: one segment per ROI (named after it unless
        ``segmentIds``/``segmentNames`` say otherwise), in one segmentation (new if None).

        Every ROI and option is checked before any work starts. Blocking (default): returns the
        finished tasks; an error raises and leaves later ROIs undone. ``runIn``: "worker" or
        "inprocess" (default: the worker inside Slicer, this process elsewhere);
        ``progress(done, total, message)`` and ``cancel() -> bool`` follow the engine's
        convention. Non-blocking: the jobs go to the worker; call ``task.poll()`` until it
        returns False (``onFinished(task)`` is called at the end).
        """
        if not roiNodes:
            raise ValueError("No ROI given: place at least one Markups ROI around the structure.")
        geometry.checkVolumeNode(volumeNode)
        if not waitForCompletion and runIn not in (None, "worker"):
            raise ValueError("Non-blocking segmentation runs in the background worker; use runIn='worker'.")
        runner = self.runner(runIn if waitForCompletion else "worker")
        created = segmentationNode is None
        segmentationNode = segmentationNode or self.createSegmentation(volumeNode)
        segmentIds = segmentIds or [None] * len(roiNodes)
        segmentNames = segmentNames or [None] * len(roiNodes)
        tasks = []
        try:
            for roi, segmentId, segmentName in zip(roiNodes, segmentIds, segmentNames):
                tasks.append(self.prepareTask(volumeNode, roi, segmentationNode, segmentId, segmentName, onFinished,
                                              **options))
            spacing = geometry.volumeSpacing(volumeNode)
            volumeKey = geometry.volumeKey(volumeNode)

            def voxels():
                return geometry.volumeToArray(volumeNode, copy=False)[0]

            for task in tasks:
                # The worker keeps the volume under its key: the voxels go with the first job it gets.
                if waitForCompletion:
                    self._runBlocking(task, runner, volumeKey, voxels, spacing, progress, cancel)
                else:
                    submit = functools.partial(runner.submitSegment, volumeKey, voxels, spacing, task.roiBox.box,
                                               task.options)
                    task.attach(submit(), runner.client, functools.partial(submit, resend=True))
        except Exception:
            for task in tasks:
                task.cancel()  # a job already sent stops; nothing of it is written
                if not task.finished:
                    task.abandon()
            if created and segmentationNode.GetSegmentation().GetNumberOfSegments() == 0:
                removeNodes(segmentationNode)
            raise
        return tasks

    def _runBlocking(self, task, runner, volumeKey, voxels, spacing, progress, cancel):
        from SAMFineTuneLib.progress import Cancelled

        def onProgress(done, total, message=""):
            task.reportProgress(done, total, message)
            if progress is not None:
                progress(done, total, "%s: %s" % (task.roiNode.GetName(), message))

        task.reportProgress(0, 1, "starting")
        try:
            mask, stats = runner.segment(volumeKey, voxels, spacing, task.roiBox.box, task.options, onProgress, cancel)
        except Cancelled:
            task.finishHere("cancelled")
            return
        except Exception as exc:
            task.finishHere("error", error=str(exc))
            raise
        task.finishHere("done", {"stats": stats}, {"mask": mask})
        if task.state == "error":
            raise RuntimeError(task.error)

    # ------------------------------------------------------------ training sets, fine-tuning, adapters

    def exportTrainingSet(self, cases, outputDir, structureName, valFraction=0.2, seed=0, progress=None, axis=None,
                          cancel=None):
        """Append cases to a training set on disk (MSD/nnU-Net layout, split by case); a case the
        set holds (the same volume, ``training.casesToExport``) is written again with its label as
        the scene has it now, or left alone when unchanged.

        ``cases``: [(volumeNode, segmentationNode, segmentId)], e.g. from
        ``training.findCases(scene, structureName)``; each becomes one case with label 1 =
        ``structureName``, and the slices corrected on its segment (``interactive.CORRECTED_TAG``)
        go with it. ``axis``: the anatomical axis the cases were segmented along; each case
        records the array axis it lies along on its volume, and training slices the case so.
        Runs here (it only writes files). ``progress(done, total, message)`` and ``cancel()`` as in
        the engine, per case read and per case written; a cancel (``progress.Cancelled``) leaves
        the dataset as it was. Returns the engine's summary."""
        from . import training
        from SAMFineTuneLib.dataset import export_dataset

        if not cases:
            raise ValueError("No case to export: segment '%s' on at least one volume first." % structureName)
        from .interactive import correctedSlices

        prepared, again, known = training.casesToExport(cases, outputDir, progress, cancel)
        corrected, sliceAxes = {}, {}
        for (volume, node, segmentId), (identifier, _, _) in zip(cases, prepared):
            slices = correctedSlices(node.GetSegmentation().GetSegment(segmentId))
            corrected[identifier] = {name: sorted(indices) for name, indices in slices.items()}
            if axis is not None:
                sliceAxes[identifier] = geometry.engineAxis(volume, axis)
        return export_dataset(prepared, outputDir, val_fraction=valFraction, seed=seed,
                              label_names={1: structureName}, progress=progress, cancel=cancel, corrected=corrected,
                              slice_axes=sliceAxes, replace=again, known=known)

    def train(self, dataset, output=None, name=None, waitForCompletion=True, runIn=None, progress=None, cancel=None,
              log=None, onFinished=None, onEvent=None, **config):
        """Fine-tune a LoRA adapter on ``dataset``; it is written to ``output`` (default: the
        adapters library, folder ``name``). ``config``: other ``TrainConfig`` fields (model,
        checkpoint, device, epochs, ...).

        Blocking: returns the model card (in the worker inside Slicer, see ``segmentROIs`` for
        ``runIn``). Non-blocking (the panel): runs in the worker and returns a Task whose
        ``output`` is the adapter folder; ``onEvent`` sees each worker event, such as each
        epoch's loss/Dice message (``training.TrainingCurve.addFromMessage``)."""
        if output is None:
            if not name:
                raise ValueError("Give the adapter a name (or an output folder).")
            output = adapterFolder(name)
        params = dict(config, dataset=os.path.abspath(str(dataset)), output=os.path.abspath(str(output)))
        if waitForCompletion:
            return self.runner(runIn).train(params, progress=progress, cancel=cancel, log=log)
        task = Task(self.worker.submit("train", params), self.worker.client, onFinished, onEvent)
        task.output = params["output"]
        return task

    def deviceInfo(self, onFinished=None):
        """Non-blocking: what the worker sees (device, GPU name and memory) in ``task.result``."""
        return Task(self.worker.submit("info", {}), self.worker.client, onFinished)

    def listAdapters(self, folder=None):
        """[(name, path)] of fine-tuned adapters in the library (folders with a model card); hidden
        folders are the engine's own (a swap's halves, keep learning's candidate)."""
        from SAMFineTuneLib.adapter_folders import holds_adapter

        folder = folder or adaptersDirectory()
        found = []
        if os.path.isdir(folder):
            for name in sorted(os.listdir(folder)):
                path = os.path.join(folder, name)
                if not name.startswith(".") and holds_adapter(path):
                    found.append((name, path))
        return found

    def shutdown(self):
        self.worker.shutdown()
        self.inProcess.shutdown()


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
