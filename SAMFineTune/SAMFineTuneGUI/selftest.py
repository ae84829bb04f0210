"""The panel's part in Reload and Test (``SAMFineTuneMRML.smoke``): the smoke run fills the panel as a user does."""

import slicer


def fillPanel(volumeNode, roiNode):
    """Open the module panel and fill its parameter node (used by the smoke test)."""
    if slicer.util.mainWindow() is not None:
        # selectModule needs the main window's module selector: with --no-main-window (how
        # Testing/slicer_smoke.py runs) it raises, and getModuleWidget alone builds the panel.
        slicer.util.selectModule("SAMFineTune")
    widget = slicer.util.getModuleWidget("SAMFineTune")
    parameters = widget.logic.getParameterNode()
    parameters.inputVolume = volumeNode
    parameters.rois = [roiNode]
    parameters.window = "auto"
    slicer.app.processEvents()
    if not widget.ui.segmentButton.enabled:
        raise AssertionError("the panel's Segment button stays disabled with a volume and an ROI chosen")
