"""Check that SAM Fine-Tune works in this 3D Slicer, end to end, without touching your data.

    Slicer --no-main-window --additional-module-paths SAMFineTune --python-script Testing/slicer_smoke.py

(from the repository's folder; with the extension installed, leave out --additional-module-paths).
It opens the module panel, fills its parameters, segments a synthetic CT in the background worker,
undoes, exports two cases, trains one epoch and checks the training chart's table, printing each
step. Exit status 0 when every step passed, 1 at the first failure, 2 when the module cannot run
here (not loaded, Slicer too old, or its Python packages not installed: the message says which).
The module's self-test (Reload and Test) runs the same steps.
"""
import traceback

import slicer


def say(text):
    print(text, flush=True)


def main():
    try:
        import SAMFineTune
    except ImportError:
        say("SAM Fine-Tune is not loaded in this Slicer: install the extension, or start Slicer with "
            "--additional-module-paths <repository>/SAMFineTune")
        return 2
    if SAMFineTune.UNSUPPORTED:
        say(SAMFineTune.UNSUPPORTED)
        return 2
    from SAMFineTuneGUI.selftest import fillPanel
    from SAMFineTuneMRML import deps
    from SAMFineTuneMRML.smoke import SmokeRun

    missing = deps.describeMissing()
    if missing:
        say("SAM Fine-Tune's Python packages are not installed (%s): open the module and press 'Install "
            "dependencies', then run this check again." % missing)
        return 2
    slicer.mrmlScene.Clear()
    logic = SAMFineTune.SAMFineTuneLogic()
    try:
        SmokeRun(logic, slicer.mrmlScene, say=say, fillPanel=fillPanel).run()
    except Exception as exc:
        say("FAILED: %s" % exc)
        traceback.print_exc()
        return 1
    finally:
        logic.shutdown()
    return 0


slicer.util.exit(main())
