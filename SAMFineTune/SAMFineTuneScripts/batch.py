"""Segment volumes inside ROI boxes without the GUI; writes one .seg.nrrd per volume.

In Slicer, headless (an installed extension has the file in its module folder's ``SAMFineTuneScripts/``)::

    Slicer --no-main-window --python-script SAMFineTune/SAMFineTuneScripts/batch.py -- \\
        --volumes ct1.nrrd ct2.nii.gz --rois liver1.mrk.json liver2.mrk.json --output out/

With plain Python and the PyPI wheel ``slicer-core`` (the same file)::

    python SAMFineTune/SAMFineTuneScripts/batch.py --volumes ct.nrrd --rois liver.mrk.json,kidney.mrk.json --output out/

Inside Slicer the engine runs in the background worker (torch never loads into Slicer); with
plain Python it runs in this process unless ``--worker`` is given.

``--rois``: one entry per volume (paired in order), or one entry for all volumes, or, with a
single volume, any number of entries; an entry may list several ROI files separated by commas
(several structures: one segment per ROI, named after it). Progress goes to stdout; the exit
status is 0 when every volume was segmented and written, 1 otherwise, 2 for bad arguments.
"""

import os
import sys
import time

# The module folder (SAMFineTuneMRML) is one level up, in the source tree and when installed.
_MODULE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(globals().get("__file__") or sys.argv[0])))


def _setupPath():
    if _MODULE_DIR not in sys.path:
        sys.path.insert(0, _MODULE_DIR)


def buildParser():
    from SAMFineTuneMRML.library import ensureLibraryImportable

    ensureLibraryImportable()
    from SAMFineTuneLib import cli_args

    parser = cli_args.OneLineParser(prog="batch.py", description=__doc__.split("\n")[0])
    parser.add_argument("--volumes", nargs="+", required=True, help="volume files (.nrrd, .nii.gz, .mha, ...)")
    parser.add_argument("--rois", nargs="+", required=True, help="Markups ROI files (.mrk.json); see above")
    parser.add_argument("--output", required=True, help="folder for the <volume>.seg.nrrd files (created)")
    cli_args.add_model_arguments(parser)
    parser.add_argument("--adapter", help="fine-tuned adapter folder")
    cli_args.add_encoder_arguments(parser)
    cli_args.add_slicing_arguments(parser)
    cli_args.add_prompt_arguments(parser)
    cli_args.add_postprocess_arguments(parser)
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--worker", dest="runIn", action="store_const", const="worker",
                       help="run the engine in the background worker process (the default inside Slicer)")
    where.add_argument("--in-process", dest="runIn", action="store_const", const="inprocess",
                       help="run the engine in this process (the default with plain Python)")
    return parser


def pairROIs(volumes, rois):
    """[[roi files] per volume] following the --rois rules."""
    groups = [[path for path in entry.split(",") if path] for entry in rois]
    if len(groups) == len(volumes):
        return groups
    if len(groups) == 1:
        return groups * len(volumes)
    if len(volumes) == 1:
        return [[path for group in groups for path in group]]
    raise ValueError("%d volumes but %d --rois entries: give one entry per volume, one entry for all, "
                     "or a single volume" % (len(volumes), len(rois)))


def uniqueOutput(folder, stem, used):
    """``<stem>.seg.nrrd`` in ``folder``, numbered past the names in ``used`` (kept lower case):
    Windows and macOS file names ignore case, so CT.nrrd and ct.nrrd would write one file."""
    name, n = stem, 2
    while name.casefold() in used:
        name, n = "%s_%d" % (stem, n), n + 1
    used.add(name.casefold())
    return os.path.join(folder, name + ".seg.nrrd")


def segmentOne(logic, volumePath, roiPaths, outputPath, options, runIn, say):
    from SAMFineTuneMRML import storage
    from SAMFineTuneMRML.scene import removeNodes

    volume = storage.loadVolume(volumePath)
    rois, segmentation = [], None
    try:
        rois = [storage.loadROI(path) for path in roiPaths]
        segmentation = logic.createSegmentation(volume, volume.GetName() + " segmentation")

        def progress(done, total, message):
            say("  %d/%d %s" % (done, total, message))

        tasks = logic.segmentROIs(volume, rois, segmentation, runIn=runIn, progress=progress, **options)
        for task in tasks:
            if task.warning:
                say("  warning: " + task.warning)
            say("  %s: %s (%.1f s)" % (task.roiNode.GetName(), task.message, float(task.stats.get("seconds", 0.0))))
        if any(task.state != "done" for task in tasks):
            raise RuntimeError("not every ROI was segmented: " + ", ".join(
                "%s %s" % (task.roiNode.GetName(), task.state) for task in tasks if task.state != "done"))
        storage.saveSegmentation(segmentation, outputPath)
        say("  wrote " + outputPath)
    finally:
        removeNodes(segmentation, volume, *rois)


def main(argv=None):
    _setupPath()
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    parser = buildParser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:
        return int(exc.code or 0)

    def say(text):
        print(text, flush=True)

    from SAMFineTuneLib.input_checks import check_triplanar

    try:
        groups = pairROIs(args.volumes, args.rois)
        check_triplanar(args.triplanar, args.adapter)
    except ValueError as exc:
        say("error: %s" % exc)
        return 2

    from SAMFineTuneMRML.logic import SAMFineTuneCoreLogic
    from SAMFineTuneMRML.scene import ensure_scene
    from SAMFineTuneMRML.storage import fileStem

    ensure_scene()
    os.makedirs(args.output, exist_ok=True)
    options = dict(model=args.model, checkpoint=args.checkpoint, adapter=args.adapter, device=args.device,
                   precision=args.precision, backend=args.backend, axis=args.axis, window=args.window,
                   box_mode=args.box_mode, zoom=args.zoom, triplanar=args.triplanar,
                   keep_largest=not args.no_largest_component, fill_holes=not args.no_fill_holes)
    logic = SAMFineTuneCoreLogic()
    failures, used = 0, set()
    started = time.time()
    try:
        for index, (volumePath, roiPaths) in enumerate(zip(args.volumes, groups)):
            say("[%d/%d] %s" % (index + 1, len(args.volumes), volumePath))
            output = uniqueOutput(args.output, fileStem(volumePath), used)
            try:
                segmentOne(logic, volumePath, roiPaths, output, options, args.runIn, say)
            except Exception as exc:
                failures += 1
                say("  error: %s" % exc)
    finally:
        logic.shutdown()
    segmented = len(args.volumes) - failures
    say("%d of %d volumes segmented in %.1f s" % (segmented, len(args.volumes), time.time() - started))
    return 1 if failures else 0


def run():
    """``main``'s exit status, and 1 for anything it did not expect: ``--python-script`` does not
    quit Slicer on its own, so a run that raised would leave a hidden Slicer running."""
    try:
        return main()
    except Exception as exc:
        import traceback

        traceback.print_exc()
        print("error: %s" % exc, flush=True)
        return 1


def _exit(status):
    try:
        import slicer
    except ImportError:
        slicer = None
    if hasattr(slicer, "app"):
        slicer.util.exit(status)
    else:
        sys.exit(status)


if __name__ == "__main__":
    _exit(run())
