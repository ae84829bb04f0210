"""Interactive correction with SAM: a click or a box on one slice, and re-propagation from a
corrected slice, run by the background worker on the embeddings it keeps.

The worker holds the volume under a key made from the node and the time its voxels last
changed (``geometry.volumeKey``), the key the panel's segmentations use too, so the voxels travel
once per worker process (``backends.WorkerBackend.submitWithVolume``). Each slice the user corrects
is remembered on the segment (a tag), so an exported case says which slices a person checked.
"""

import numpy as np
import vtk

from . import geometry, slices
from .options import MODEL_KEYS, checkOptions
from .tasks import Task

#: The Segment Editor effect's name ("SAMFineTuneEffect/SegmentEditorEffect.py"): modules find effects by it.
EFFECT_NAME = "SAM"
#: Segment tag listing the slices corrected by hand or by clicks: "axial:3,4;coronal:12".
CORRECTED_TAG = "SAMFineTune.CorrectedSlices"
#: Options a click or a propagation takes from the panel's settings.
_ENGINE_OPTIONS = MODEL_KEYS + ("adapter", "window")


def correctedSlices(segment):
    """{engine axis: set of slice indices} from a segment's tag."""
    found = {}
    text = vtk.reference("")  # vtkSegment::GetTag(tag, std::string& value)
    if segment is None or not segment.GetTag(CORRECTED_TAG, text):
        return found
    for part in str(text).split(";"):
        axis, _, indices = part.partition(":")
        if axis and indices:
            found.setdefault(axis, set()).update(int(index) for index in indices.split(","))
    return found


def markCorrected(segment, axis, indices):
    found = correctedSlices(segment)
    found.setdefault(axis, set()).update(int(index) for index in indices)
    segment.SetTag(CORRECTED_TAG, ";".join("%s:%s" % (name, ",".join(str(i) for i in sorted(values)))
                                           for name, values in sorted(found.items())))


class ResultTask(Task):
    """A worker job whose mask goes to ``onMask(mask, result)`` when it succeeds."""

    def __init__(self, session, command, params, arrays, onMask, onFinished=None):
        self.onMask = onMask
        Task.__init__(self, session.submit(command, params, arrays), session.client, onFinished,
                      resend=lambda: session.submit(command, params, arrays, resend=True))

    def complete(self, result, arrays):
        self.onMask(arrays["mask"], result)


class InteractiveSession:
    """The volume a Segment Editor effect corrects, as the worker sees it."""

    def __init__(self, logic, volumeNode):
        geometry.checkVolumeNode(volumeNode)
        self.logic = logic
        self.volumeNode = volumeNode

    @property
    def client(self):
        return self.logic.worker.client

    def submit(self, command, params, arrays=None, resend=False):
        """Send a job naming the volume by key; the voxels go along when this worker has not had them."""
        return self.logic.worker.submitWithVolume(command, params, geometry.volumeKey(self.volumeNode),
                                                  lambda: geometry.volumeToArray(self.volumeNode, copy=False)[0],
                                                  arrays, resend)

    def baseParams(self, axis, index, options):
        options = checkOptions({k: v for k, v in options.items() if k in _ENGINE_OPTIONS})
        params = {k: options[k] for k in _ENGINE_OPTIONS}
        params.update(axis=axis, index=int(index), spacing=[float(s) for s in geometry.volumeSpacing(self.volumeNode)])
        return params

    def refine(self, axis, index, points, box=None, startMask=None, reset=False, options=None, onMask=None,
               onFinished=None, roi=None):
        """One decode on one slice from positive/negative points ``[(x, y, positive)]`` and an optional
        box (x0, y0, x1, y1), starting from the worker's previous result on this slice unless
        ``reset`` (then from ``startMask``, e.g. the segment's current slice, when given). ``roi``:
        the IJK box of the ROI the segment came from, so that the worker windows the slice as the
        segmentation did."""
        if not points and box is None:
            raise ValueError("Give at least one point or a box.")
        params = self.baseParams(axis, index, options or {})
        params.update(points=[[float(x), float(y), 1 if positive else 0] for x, y, positive in points],
                      box=None if box is None else [float(v) for v in box], reset=bool(reset))
        if roi is not None:
            params.update(roi=[int(v) for v in roi])
        arrays = {"mask": startMask.astype("uint8")} if startMask is not None else None
        return ResultTask(self, "refine", params, arrays, onMask, onFinished)

    def propagate(self, axis, index, mask, locked=(), limits=None, box=None, options=None, onMask=None,
                  onFinished=None):
        """Track the structure from a corrected slice ``mask`` outwards in both directions, within
        ``limits`` (first, last slice; default the whole volume) and the IJK ``box`` of the ROI the
        segment came from (``propagationBox``), never over ``locked`` slices: the other corrected
        slices, as indices or as {index: mask}, whose masks let the worker fill the slices between
        two corrections from boxes interpolated between theirs."""
        if not mask.any():
            raise ValueError("The slice to propagate from is empty: correct it first.")
        params = self.baseParams(axis, index, options or {})
        params.update(locked=sorted(int(i) for i in locked))
        if limits is not None:
            params.update(first=int(limits[0]), last=int(limits[1]))
        if box is not None:
            params.update(box=[int(v) for v in box])
        arrays = {"mask": mask.astype("uint8")}
        if isinstance(locked, dict) and locked:
            arrays["locked_masks"] = np.stack([np.asarray(locked[i], dtype="uint8") for i in params["locked"]])
        return ResultTask(self, "propagate", params, arrays, onMask, onFinished)


def propagationStart(corrected, lastSlice=None):
    """The (axis, slice) Propagate starts from, given the segment's corrected slices ({axis: set of
    slices}, ``correctedSlices``): the slice corrected last in the effect when it is one of them,
    else the last slice of the axis with the most of them (the segment remembers corrections made
    before the effect was opened); None when there are none."""
    if lastSlice is not None and lastSlice[1] in corrected.get(lastSlice[0], ()):
        return tuple(lastSlice)
    if not any(corrected.values()):
        return None
    axis = max(sorted(corrected), key=lambda name: len(corrected[name]))
    return axis, max(corrected[axis])


def propagationBox(roiBox, axis, index):
    """The IJK box (i0, j0, k0, i1, j1, k1) a propagation from slice ``index`` keeps to: the ROI's,
    when the slice lies among the ROI's slices; None (the whole volume) when the user corrected a
    slice beyond them, to carry the structure past the ROI."""
    if roiBox is None:
        return None
    along = 2 - slices.arrayAxis(axis)  # IJK position of the axis the slices step along
    return tuple(roiBox) if roiBox[along] <= int(index) <= roiBox[along + 3] else None


#: A press and release further apart than this (in view pixels) is a drag: a box, not a click.
DRAG_PIXELS = 5


def gesture(pressXY, releaseXY, shift=False, right=False):
    """What a mouse gesture in a slice view asks for: ("box", None) for a drag, else ("point",
    positive); Shift+click and right click add a negative point."""
    dx, dy = releaseXY[0] - pressXY[0], releaseXY[1] - pressXY[1]
    if not right and dx * dx + dy * dy > DRAG_PIXELS * DRAG_PIXELS:
        return "box", None
    return "point", not (shift or right)


class Prompts:
    """The points and box on the slice being corrected. Prompts on another slice start afresh."""

    def __init__(self):
        self.slice = None  # (axis, index)
        self.points = []  # [(x, y, positive)]
        self.box = None

    def add(self, axis, index, point=None, positive=True, box=None):
        """Add a point or a box; returns True when this starts a new slice (the worker forgets the
        previous slice's result)."""
        fresh = self.slice != (axis, int(index))
        if fresh:
            self.clear()
            self.slice = (axis, int(index))
        if point is not None:
            self.points.append((float(point[0]), float(point[1]), bool(positive)))
        if box is not None:
            x0, y0, x1, y1 = box
            self.box = (min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1))
        return fresh

    def clear(self):
        self.slice, self.points, self.box = None, [], None
