"""The Slicer module's structure, checked without Slicer: the .ui file against the code, the
parameter node's bindings against what Slicer's GUI connectors accept, import without torch or
GUI, what an older Slicer shows, CMake lists and metadata, cache folders."""
import ast
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULE_DIR = os.path.join(REPO, "SAMFineTune")
MODULE_FILE = os.path.join(MODULE_DIR, "SAMFineTune.py")
UI_FILE = os.path.join(REPO, "Resources", "UI", "SAMFineTune.ui")
PACKAGES = ("SAMFineTuneMRML", "SAMFineTuneGUI", "SAMFineTuneEffect")
SLICER_FILES = [os.path.join(MODULE_DIR, "SAMFineTuneScripts", "batch.py")] + [
    os.path.join(MODULE_DIR, package, f) for package in PACKAGES
    for f in sorted(os.listdir(os.path.join(MODULE_DIR, package))) if f.endswith(".py")]
PANEL_FILES = [MODULE_FILE] + [f for f in SLICER_FILES if os.sep + "SAMFineTuneGUI" + os.sep in f]

QT_CLASSES = {"QWidget", "QLabel", "QComboBox", "QPushButton", "QToolButton", "QCheckBox", "QLineEdit", "QSpinBox",
              "QProgressBar"}
PATH_TYPES = {pathlib.Path, pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePath, pathlib.PurePosixPath,
              pathlib.PureWindowsPath}
NODE = "a vtkMRMLNode subclass"
#: Which parameter types each widget class binds to through ``connectParametersToGui``, written from
#: the ``canRepresent`` methods in Slicer 5.12.3's Base/Python/slicer/parameterNodeWrapper/guiConnectors.py
#: (the same in 5.10.0): any other pairing makes ``createGuiConnector`` raise RuntimeError, and the
#: wrapper builds every connector before connecting any, so one bad pair breaks the whole panel.
GUI_CONNECTOR_TYPES = {
    "QCheckBox": {bool},
    "QPushButton": {bool},  # checkable buttons only
    "ctkCheckablePushButton": {bool},
    "QSlider": {int},  # bounded ints only
    "QSpinBox": {int},
    "QDoubleSpinBox": {float, int},
    "ctkSliderWidget": {float, int},
    "QComboBox": {int, float, str, bool},  # with a Choice annotation, or an Enum
    "ctkComboBox": {int, float, str, bool},
    "QLineEdit": {str},
    "QLabel": {str},
    "QTextEdit": {str},
    "ctkPathLineEdit": PATH_TYPES,
    "ctkDirectoryButton": PATH_TYPES,
    "qMRMLNodeComboBox": {NODE},
}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI_FILE).getroot()


def widgets(root):
    return {w.get("name"): w for w in root.iter("widget")}


def module_tables():
    """The module file's GUI_BINDINGS and COMBO_BINDINGS tables (parameter -> widget name)."""
    tree = ast.parse(open(MODULE_FILE).read())
    tables = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name) and node.targets[0].id.endswith(
                "_BINDINGS"):
            tables[node.targets[0].id] = ast.literal_eval(node.value)
    return tables


def ui_names_in_code():
    """Every ``<something>.ui.<name>`` or ``ui.<name>`` the panel's code uses, and the widgets of its
    binding tables and its combo-filling table."""
    names = set()
    for path in PANEL_FILES:
        source = open(path).read()
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and (
                    (isinstance(node.value, ast.Attribute) and node.value.attr == "ui")
                    or (isinstance(node.value, ast.Name) and node.value.id == "ui")):
                names.add(node.attr)
        names |= set(re.findall(r'\("(\w+ComboBox)", options\.', source))
    for table in module_tables().values():
        names |= set(table.values())
    return names


def test_ui_is_qt_designer_xml_with_a_mrml_top_widget(ui):
    assert ui.tag == "ui" and ui.get("version") == "4.0"
    assert ui.find("class").text == "SAMFineTune"
    top = ui.find("widget")
    assert top.get("class") == "qMRMLWidget"  # the code calls setMRMLScene on it
    names = [w.get("name") for w in ui.iter("widget")]
    assert len(names) == len(set(names)), "duplicate object names"


def test_every_widget_the_code_names_exists_in_the_ui(ui):
    used = ui_names_in_code()
    assert len(used) > 30
    missing = sorted(used - set(widgets(ui)))
    assert not missing, "named in SAMFineTune.py but not in the .ui: %s" % missing


def test_widgets_have_the_classes_the_code_relies_on(ui):
    found = widgets(ui)
    expected = {"roiSelector": "qMRMLCheckableNodeComboBox", "inputVolumeSelector": "qMRMLNodeComboBox",
                "segmentationSelector": "qMRMLNodeComboBox", "trainingTableView": "qMRMLTableView",
                "checkpointPathLineEdit": "ctkPathLineEdit", "datasetPathLineEdit": "ctkPathLineEdit",
                "epochsSpinBox": "QSpinBox", "progressBar": "QProgressBar"}
    for name, cls in expected.items():
        assert found[name].get("class") == cls, name
    node_types = {name: [s.text for s in found[name].iter("string")] for name in
                  ("roiSelector", "inputVolumeSelector", "segmentationSelector")}
    assert "vtkMRMLMarkupsROINode" in node_types["roiSelector"]
    assert "vtkMRMLScalarVolumeNode" in node_types["inputVolumeSelector"]
    assert "vtkMRMLSegmentationNode" in node_types["segmentationSelector"]


def test_combo_boxes_hold_no_items_of_their_own(ui):
    """Their items come from the engine's catalogue, filled by the code."""
    for name in module_tables()["COMBO_BINDINGS"].values():
        assert not widgets(ui)[name].findall("item"), name


def test_custom_widgets_are_declared_and_mrml_widgets_get_the_scene(ui):
    declared = {c.find("class").text for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")}
    assert used - QT_CLASSES <= declared, sorted(used - QT_CLASSES - declared)
    receivers = {c.find("receiver").text for c in ui.iter("connection")}
    assert receivers <= set(widgets(ui))
    mrml = {name for name, w in widgets(ui).items() if w.get("class", "").startswith("qMRML") and name != "SAMFineTune"}
    assert mrml <= receivers, "MRML widgets without the scene: %s" % sorted(mrml - receivers)


def test_the_module_file_stays_python_3_9_so_an_old_slicer_can_say_why_it_cannot_run():
    tree = ast.parse(open(MODULE_FILE).read(), feature_version=(3, 9))
    assert not any(isinstance(n, getattr(ast, "Match", ())) for n in ast.walk(tree))
    # no PEP 604 unions in annotations (parameterNodeWrapper evaluates them at runtime)
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.AnnAssign, ast.arg)) and n.annotation]
    assert not any(isinstance(a, ast.BinOp) and isinstance(a.op, ast.BitOr)
                   for ann in annotations for a in ast.walk(ann))


@pytest.mark.parametrize("path", SLICER_FILES, ids=os.path.basename)
def test_slicer_side_code_is_python_3_10(path):
    ast.parse(open(path).read(), feature_version=(3, 10))


STUBS = textwrap.dedent('''
    import sys, types, importlib.abc
    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm", "segment_anything", "monai", "peft"):
                raise ImportError("blocked for the test: " + name)
    sys.meta_path.insert(0, BlockTorch())
    try:
        import slicer
    except ImportError:  # an old Python without slicer-core: just what the module file touches
        slicer = types.ModuleType("slicer")
        slicer.util = types.ModuleType("slicer.util")
        slicer.util.VTKObservationMixin = type("VTKObservationMixin", (), {"__init__": lambda self: None})
        for name in ("vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode", "vtkMRMLMarkupsROINode"):
            setattr(slicer, name, type(name, (), {}))
        sys.modules.update({"slicer": slicer, "slicer.util": slicer.util, "vtk": types.ModuleType("vtk")})
    qt = types.ModuleType("qt")
    qt.QIcon = lambda path: ("icon", path)
    class QLabel:
        def __init__(self, text):
            self.text = text
    qt.QLabel = QLabel
    sys.modules["qt"] = qt
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    class Base:
        def __init__(self, parent=None):
            self.parent = parent
    class LogicBase:
        def __init__(self, parent=None):
            super().__init__()  # as Slicer's ScriptedLoadableModuleLogic does
        def getParameterNode(self):
            return "parameter node"
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (Base,), {}))
    slm.ScriptedLoadableModuleLogic = LogicBase
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.WithinRange = lambda lo, hi: ("range", lo, hi)
    sys.modules["slicer.parameterNodeWrapper"] = pnw
    sys.path.insert(0, %r)
''' % MODULE_DIR)


def run_python(code, python=sys.executable):
    return subprocess.run([python, "-c", STUBS + textwrap.dedent(code)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)


def test_module_imports_without_torch_and_without_a_gui():
    out = run_python('''
        import SAMFineTune
        from SAMFineTuneMRML import logic as core
        parent = types.SimpleNamespace()
        SAMFineTune.SAMFineTune(parent)
        assert parent.title == "SAM Fine-Tune" and parent.categories == ["Segmentation"], parent
        assert parent.icon[1].endswith("SAMFineTune.png"), parent.icon
        assert "5.10" in parent.helpText and not SAMFineTune.UNSUPPORTED
        inits = []
        original = core.SAMFineTuneCoreLogic.__init__
        core.SAMFineTuneCoreLogic.__init__ = lambda self, *a: (inits.append(1), original(self, *a))[1]
        logic = SAMFineTune.SAMFineTuneLogic()
        assert inits == [1], "the core logic was initialised %d times" % len(inits)
        assert callable(logic.segment) and callable(logic.segmentROIs) and callable(logic.undo)
        assert SAMFineTune.resourcePath("UI/SAMFineTune.ui").endswith("SAMFineTune.ui")
        import os; assert os.path.isfile(SAMFineTune.resourcePath("UI/SAMFineTune.ui"))
        fields = SAMFineTune.SAMFineTuneParameterNode.__annotations__
        assert {"inputVolume", "segmentation", "rois", "model", "window", "boxMode", "epochs"} <= set(fields)
        heavy = [m for m in ("torch", "SAMFineTuneLib.segmenter", "SAMFineTuneLib.models") if m in sys.modules]
        assert not heavy, heavy
        print("OK")
    ''')
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_the_panel_lets_go_of_every_parameter_binding_it_made():
    """Slicer's parameter-node wrapper numbers a wrapper's GUI bindings from 0, and the panel wraps
    the node anew on each entry: a binding left connected would keep writing into the widgets."""
    out = run_python('''
        import SAMFineTune
        widget = SAMFineTune.SAMFineTuneWidget.__new__(SAMFineTune.SAMFineTuneWidget)
        widget.parameters, widget._parameterNodeGuiTag = None, None
        widget.ui = type("Widgets", (), {"__getattr__": lambda self, name: name})()
        widget.addObserver = widget.removeObserver = widget.updateGUIFromParameterNode = lambda *a: None
        class Wrapper:
            def __init__(self):
                self.live, self.next = set(), 0
            def connectParametersToGui(self, mapping):
                self.live.add(self.next)
                self.next += 1
                return self.next - 1
            def disconnectGui(self, tag):
                self.live.discard(tag)
        first, second = Wrapper(), Wrapper()
        widget.setParameterNode(first)
        widget.setParameterNode(second)
        assert not first.live and second.live == {0}, (first.live, second.live)
        widget.setParameterNode(None)
        assert not second.live and widget._parameterNodeGuiTag is None
        print("OK")
    ''')
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_reload_and_test_without_the_engines_packages_says_skipped_and_what_to_do():
    """Slicer's Reload and Test calls ``runTest`` outside a test runner and reports any exception
    as a failure; a missing install is a skip, and the user is told how to install."""
    out = run_python('''
        import unittest
        slm.ScriptedLoadableModuleTest = type("ScriptedLoadableModuleTest", (unittest.TestCase,), {})
        import SAMFineTune
        shown = []
        slicer.util.infoDisplay = lambda text, **kwargs: shown.append(text)
        slicer.mrmlScene = types.SimpleNamespace(Clear=lambda: None)
        SAMFineTune.deps.describeMissing = lambda: "torch, openvino"
        SAMFineTune.SAMFineTuneTest().runTest()
        assert len(shown) == 1 and "skipped" in shown[0] and "Install dependencies" in shown[0], shown
        print("OK")
    ''')
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


@pytest.mark.skipif(not os.path.exists("/root/.pyenv/versions/3.9.18/bin/python"), reason="no Python 3.9 here")
def test_an_older_slicer_loads_the_module_and_is_told_which_slicer_it_needs():
    """Slicer 5.8 ships Python 3.9: the module loads and says what to install, instead of failing."""
    out = run_python('''
        import SAMFineTune
        parent = types.SimpleNamespace()
        SAMFineTune.SAMFineTune(parent)
        assert "needs 3D Slicer 5.10 or later" in parent.helpText and "Python 3.9" in parent.helpText, parent.helpText
        added = []
        widget = SAMFineTune.SAMFineTuneWidget()
        widget.layout = types.SimpleNamespace(addWidget=added.append)
        SAMFineTune.ScriptedLoadableModuleWidget.setup = lambda self: None
        widget.setup()
        assert len(added) == 1 and "5.10" in added[0].text
        try:
            SAMFineTune.SAMFineTuneLogic()
        except RuntimeError as exc:
            assert "5.10" in str(exc)
        else:
            raise AssertionError("the logic started on Python 3.9")
        print("OK")
    ''', python="/root/.pyenv/versions/3.9.18/bin/python")
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def parameter_types():
    """The parameter node's fields -> their types, from the module file imported with stubs."""
    out = run_python('''
        import typing, SAMFineTune
        for name, annotation in SAMFineTune.SAMFineTuneParameterNode.__annotations__.items():
            base = typing.get_origin(annotation) is typing.Annotated and typing.get_args(annotation)[0] or annotation
            print(name, getattr(base, "__module__", ""), getattr(base, "__qualname__", repr(base)))
    ''')
    assert out.returncode == 0, out.stderr
    return {name: (module, qualname) for name, module, qualname in (line.split(" ", 2)
                                                                    for line in out.stdout.splitlines())}


def test_every_parameter_binds_to_a_widget_class_slicers_connectors_accept(ui):
    import builtins

    found = widgets(ui)
    types = parameter_types()
    bindings = module_tables()["GUI_BINDINGS"]
    assert set(bindings) <= set(types)
    for parameter, widget in bindings.items():
        widget_class = found[widget].get("class")
        assert widget_class in GUI_CONNECTOR_TYPES, "%s: Slicer has no connector for %s" % (widget, widget_class)
        module, qualname = types[parameter]
        if module == "builtins":
            kind = getattr(builtins, qualname)
        elif module == "pathlib":
            kind = getattr(pathlib, qualname)
        else:
            assert qualname.startswith("vtkMRML") and qualname.endswith("Node"), (parameter, module, qualname)
            kind = NODE
        assert kind in GUI_CONNECTOR_TYPES[widget_class], (
            "parameter %r (%s) is bound to %s %r, whose Slicer connector takes %s"
            % (parameter, qualname, widget_class, widget, GUI_CONNECTOR_TYPES[widget_class]))


def test_cmake_installs_every_module_file_and_follows_extension_conventions():
    module_cmake = open(os.path.join(MODULE_DIR, "CMakeLists.txt")).read()
    for package in PACKAGES:  # every file of the module's packages, listed by CMake
        assert "${CMAKE_CURRENT_SOURCE_DIR}/%s/*.py" % package in module_cmake, package
    assert "SAMFineTuneEffect/SegmentEditorEffect.png" in module_cmake
    assert "slicerMacroBuildScriptedModule" in module_cmake and "WITH_GENERIC_TESTS" in module_cmake
    assert re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", module_cmake)
    # The batch script installs into a sub-folder, as in the source tree, so the module scan skips it.
    assert "SCRIPTS SAMFineTuneScripts/batch.py" in module_cmake
    assert not [f for f in os.listdir(MODULE_DIR) if f.endswith(".py") and f != "SAMFineTune.py"]
    root = open(os.path.join(REPO, "CMakeLists.txt")).read()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(r"set\(%s " % key, root), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in root and "add_subdirectory(SAMFineTune)" in root
    assert 'set(EXTENSION_DEPENDS "PyTorch")' in root and "Slicer 5.10" in root
    assert 'if(Slicer_REQUIRED_PYTHON_VERSION VERSION_LESS "3.10")' in root
    assert "GLOB_RECURSE SAMFineTuneLib_SCRIPTS" in root and "SAMFineTuneLib/*.txt" in root
    assert "Resources/UI/*.ui" in root
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in root and "Slicer_EXTENSION_CPACK" in root
    # The catalogue's icon and screenshot are the repository's own files.
    for key in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        url = re.search(r'set\(%s "([^"]+)"\)' % key, root).group(1)
        assert os.path.isfile(os.path.join(REPO, url.split("/main/", 1)[1])), url


def test_icon_is_the_128_pixel_png_the_catalogue_wants():
    import struct

    with open(os.path.join(REPO, "Resources", "Icons", "SAMFineTune.png"), "rb") as handle:
        head = handle.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and struct.unpack(">II", head[16:24]) == (128, 128)


def test_caches_live_in_the_user_cache_folder_never_the_install_folder(monkeypatch, tmp_path):
    sys.path.insert(0, MODULE_DIR)
    from SAMFineTuneMRML import paths

    monkeypatch.delenv("SAMFINETUNE_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "cache"))
    assert paths.cacheDirectory().startswith(str(tmp_path / "cache"))
    assert not paths.cacheDirectory().startswith(REPO)
    monkeypatch.setenv("SAMFINETUNE_CACHE", str(tmp_path / "mine"))
    assert paths.cacheDirectory() == str(tmp_path / "mine") and paths.workerEnvironment() == {
        "SAMFINETUNE_CACHE": str(tmp_path / "mine")}
    assert paths.workerLogPath() == os.path.join(str(tmp_path / "mine"), "logs", "worker.log")


def test_what_the_user_keeps_lives_in_their_documents_never_a_cache(monkeypatch, tmp_path):
    """Adapters and training sets are the user's work: Slicer 5.12 trims its own cache folder to
    its size limit at every start, whole top-level folders oldest first (Libs/MRML/Core/
    vtkCacheManager.cxx PruneCache, called from Base/QTGUI/qSlicerApplication.cxx), 5.10's Clear
    cache removes it all, and a user cache folder is for what may be deleted. They go where Slicer
    keeps its DICOM database, the user's Documents."""
    import types

    sys.path.insert(0, MODULE_DIR)
    import slicer
    from SAMFineTuneMRML import paths

    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(cachePath=str(tmp_path / "slicer-cache")), raising=False)
    for name in ("SAMFINETUNE_CACHE", "SAMFINETUNE_ADAPTERS", "SAMFINETUNE_DATA"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("USERPROFILE", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user cache"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "user cache"))
    mine = str(tmp_path / "home" / "Documents" / "SAMFineTune")
    assert paths.dataDirectory() == mine
    assert paths.adaptersDirectory() == os.path.join(mine, "adapters")
    # one training set per structure unless the user chose a folder: a set holds one structure (label 1)
    assert paths.trainingSetFolder("", "liver") == os.path.join(mine, "datasets", "liver")
    assert paths.trainingSetFolder(".", "left kidney/2") == os.path.join(mine, "datasets", "left_kidney_2")
    assert paths.trainingSetFolder(str(tmp_path / "set"), "liver") == str(tmp_path / "set")
    assert paths.trainingSetFolder("", "") is None and paths.trainingSetFolder("", "***") is None
    # a structure named as Windows names a device gets a folder every system can make
    assert paths.trainingSetFolder("", "Con") == os.path.join(mine, "datasets", "Con_case")
    assert paths.folderName("nul ") == "nul_case" and paths.folderName("console") == "console"
    for folder in (paths.cacheDirectory(), paths.adaptersDirectory(), paths.trainingSetFolder("", "liver")):
        assert not folder.startswith(str(tmp_path / "slicer-cache")) and not folder.startswith(REPO)
    assert not paths.adaptersDirectory().startswith(paths.cacheDirectory())
    monkeypatch.setenv("SAMFINETUNE_DATA", str(tmp_path / "lab share"))
    monkeypatch.setenv("SAMFINETUNE_ADAPTERS", str(tmp_path / "adapters"))
    assert paths.trainingSetFolder("", "liver") == str(tmp_path / "lab share" / "datasets" / "liver")
    assert paths.adaptersDirectory() == str(tmp_path / "adapters")


def test_the_panels_defaults_are_the_engines():
    """The parameter node's defaults are literals (the class is read before the engine can be
    imported); they must say what the engine's catalogue says."""
    from SAMFineTuneLib.catalogue import SEGMENT_DEFAULTS, TRAINING_DEFAULTS

    out = run_python('''
        import json, SAMFineTune
        node = SAMFineTune.SAMFineTuneParameterNode
        print(json.dumps({name: getattr(node, name) for name in ("epochs", "model", "device", "backend", "precision",
                                                                  "window", "axis", "boxMode", "keepLargest",
                                                                  "fillHoles", "zoom", "triplanar")}))
    ''')
    assert out.returncode == 0, out.stderr
    panel = json.loads(out.stdout.strip().splitlines()[-1])
    assert panel.pop("epochs") == TRAINING_DEFAULTS["epochs"]
    engine = {"boxMode": "box_mode", "keepLargest": "keep_largest", "fillHoles": "fill_holes"}
    for name, value in panel.items():
        assert value == SEGMENT_DEFAULTS[engine.get(name, name)], name


def test_tri_planar_reaches_the_engine_only_for_the_base_model():
    """The engine refuses tri-planar with an adapter (it learned one axis), so the panel leaves a
    ticked box out while an adapter is selected instead of failing every Segment."""
    out = run_python('''
        import json, SAMFineTune
        node = SAMFineTune.SAMFineTuneParameterNode
        p = types.SimpleNamespace(**{name: getattr(node, name) for name in node.__annotations__
                                     if hasattr(node, name)})
        p.checkpoint, p.triplanar, p.customWindow = "", True, ""
        base = SAMFineTune.segmentOptions(p)
        p.adapter = "/adapters/hippocampus"
        adapted = SAMFineTune.segmentOptions(p)
        print(json.dumps([base["triplanar"], adapted["triplanar"], adapted["adapter"]]))
    ''')
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [True, False, "/adapters/hippocampus"]


class Combo:
    """A QComboBox as far as ``SAMFineTuneGUI.combos`` uses one; counts how often it was cleared."""

    def __init__(self):
        self.items, self.currentIndex, self.clears = [], -1, 0

    @property
    def count(self):
        return len(self.items)

    def itemData(self, index):
        return self.items[index][0]

    def itemText(self, index):
        return self.items[index][1]

    def clear(self):
        self.items, self.currentIndex, self.clears = [], -1, self.clears + 1

    def addItem(self, text, value):
        self.items.append((value, text))
        self.currentIndex = max(self.currentIndex, 0)

    def findData(self, value):
        return next((n for n, (data, _) in enumerate(self.items) if data == value), -1)

    def setCurrentIndex(self, index):
        self.currentIndex = index

    def blockSignals(self, block):
        return False


def test_a_combo_refreshed_while_a_job_runs_keeps_its_items_and_says_when_its_value_is_gone():
    sys.path.insert(0, MODULE_DIR)
    from SAMFineTuneGUI.combos import refillCombo

    combo = Combo()
    choices = [("", "(new segment)"), ("Segment_1", "liver"), ("Segment_2", "spleen")]
    assert refillCombo(combo, choices, "Segment_2") and combo.currentIndex == 2 and combo.clears == 1
    assert refillCombo(combo, list(choices), "Segment_2") and combo.clears == 1  # unchanged: an open list stays
    assert not refillCombo(combo, choices[:2], "Segment_2")  # the segment was deleted
    assert combo.clears == 2 and combo.currentIndex == 0



class PathEdit:
    """A ctkPathLineEdit as far as ``SAMFineTuneGUI.pathedits`` uses one; counts the text it was given."""

    def __init__(self, path=""):
        self._path, self.sets = path, 0

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, path):
        self._path, self.sets = path, self.sets + 1


def test_an_unset_path_shows_empty_not_the_working_folder(ui):
    """Slicer binds a ctkPathLineEdit only to a pathlib parameter, whose unset value shows '.' (and a
    browse dialog opened there starts in Slicer's working folder): the panel binds its paths as text."""
    sys.path.insert(0, MODULE_DIR)
    from SAMFineTuneGUI.pathedits import showPath

    paths = module_tables()["PATH_BINDINGS"]
    assert set(paths) == {"checkpoint", "datasetDir"} and not set(paths) & set(module_tables()["GUI_BINDINGS"])
    assert all(widgets(ui)[name].get("class") == "ctkPathLineEdit" for name in paths.values())
    types = parameter_types()
    assert all(types[name] == ("builtins", "str") for name in paths)
    edit = PathEdit("/old/sam.pth")
    for saved, shown in ((".", ""), ("", ""), ("/data/sam_vit_b.pth", "/data/sam_vit_b.pth")):
        showPath(edit, saved)
        assert edit.currentPath == shown, saved
    sets = edit.sets
    showPath(edit, "/data/sam_vit_b.pth")  # unchanged: left alone while the user types
    assert edit.sets == sets
