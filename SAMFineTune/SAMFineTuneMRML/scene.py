"""A headless MRML scene for running the module's logic without the Slicer application.

Inside Slicer, ``slicer.mrmlScene`` and ``slicer.modules`` already exist and nothing here is
used. Under plain Python with the PyPI wheel ``slicer-core`` (CI, the batch script run with
``python``), :func:`ensure_scene` builds a scene with the module logics that
``slicer.util`` needs (volumes, segmentations, colors, subject hierarchy) and publishes it
as ``slicer.mrmlScene`` / ``slicer.modules`` so the same code runs in both places.
"""

import types

import slicer

# vtkSlicerApplicationLogic.SetModuleLogic keeps weak pointers: the Python references kept
# here are what keeps the logics alive.
_HEADLESS = {}


def haveApplication():
    """True inside the Slicer application (GUI or --no-main-window)."""
    return hasattr(slicer, "app")


def _logicNamespace(logic):
    return types.SimpleNamespace(logic=lambda: logic)


def createHeadlessScene():
    """Create a new scene with application, color, volumes, segmentations, markups and
    subject hierarchy logics; returns (scene, dict of logics). Does not touch ``slicer``."""
    scene = slicer.vtkMRMLScene()
    appLogic = slicer.vtkSlicerApplicationLogic()
    appLogic.SetMRMLScene(scene)
    logics = {"application": appLogic}

    colorLogic = slicer.vtkSlicerColorLogic()
    colorLogic.SetMRMLApplicationLogic(appLogic)
    colorLogic.SetMRMLScene(scene)
    appLogic.SetColorLogic(colorLogic)
    appLogic.SetModuleLogic("Colors", colorLogic)
    logics["colors"] = colorLogic

    for name, cls in (("subjecthierarchy", slicer.vtkSlicerSubjectHierarchyModuleLogic),
                      ("volumes", slicer.vtkSlicerVolumesLogic),
                      ("segmentations", slicer.vtkSlicerSegmentationsModuleLogic),
                      ("markups", slicer.vtkSlicerMarkupsLogic),
                      ("transforms", slicer.vtkSlicerTransformLogic)):
        logic = cls()
        logic.SetMRMLApplicationLogic(appLogic)
        logic.SetMRMLScene(scene)
        appLogic.SetModuleLogic(name, logic)
        logics[name] = logic
    return scene, logics


def ensure_scene():
    """Return the scene that ``slicer.util`` uses, creating a headless one if there is none."""
    if getattr(slicer, "mrmlScene", None) is not None:
        return slicer.mrmlScene
    scene, logics = createHeadlessScene()
    _HEADLESS.clear()
    _HEADLESS.update(logics, scene=scene)
    slicer.mrmlScene = scene
    slicer.modules = types.SimpleNamespace(**{name: _logicNamespace(logic)
                                              for name, logic in logics.items() if name != "application"})
    return scene


def reset_scene():
    """Clear the scene (keeps default color nodes); works in Slicer and headless."""
    scene = ensure_scene()
    scene.Clear(0)
    return scene


def removeNodes(*nodes):
    """Remove each node with its display and storage nodes, which ``vtkMRMLScene.RemoveNode``
    leaves behind; None and nodes already out of a scene are skipped."""
    for node in nodes:
        scene = None if node is None else node.GetScene()
        if scene is None:
            continue
        helpers = []
        if node.IsA("vtkMRMLDisplayableNode"):
            helpers += [node.GetNthDisplayNode(n) for n in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            helpers += [node.GetNthStorageNode(n) for n in range(node.GetNumberOfStorageNodes())]
        scene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and helper.GetScene() is scene:
                scene.RemoveNode(helper)
