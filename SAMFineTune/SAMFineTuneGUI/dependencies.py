"""The panel's dependency check and install: ask first, install, offer a restart when needed."""

import slicer
from SAMFineTuneMRML import deps


def showStatus(ui):
    """The 'not installed yet' line and the Install button; True when everything is there."""
    missing = deps.describeMissing()
    ui.dependenciesLabel.text = ("Not installed yet: %s." % missing) if missing else ""
    ui.dependenciesLabel.visible = bool(missing)
    ui.installDependenciesButton.visible = bool(missing)
    return not missing


def ensure(ui):
    """Install what is missing, after the user agrees. True when everything is there."""
    needed = deps.missing()
    if not needed:
        return True
    if not slicer.util.confirmOkCancelDisplay(
            "SAM Fine-Tune needs Python packages that are not installed yet:\n\n%s\n\nInstall them now? "
            "This downloads about 1-3 GB and can take several minutes." % "\n".join(map(deps.describe, needed)),
            windowTitle="Install dependencies"):
        return False
    try:
        with slicer.util.WaitCursor():
            deps.install()
    except Exception as exc:
        slicer.util.errorDisplay("Installing the dependencies failed: %s" % exc, detailedText=str(exc))
        return False
    finally:
        showStatus(ui)
    stale = deps.importedAlready(needed)
    if stale and slicer.util.confirmYesNoDisplay(
            "Installed. Slicer has loaded older versions of %s: restart Slicer now to use the new ones?"
            % ", ".join(stale), windowTitle="Restart Slicer"):
        slicer.util.restart()
    return not deps.missing()
