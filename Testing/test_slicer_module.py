"""The Slicer module's structure, checked without Slicer: the .ui file against the code, Python
3.9 syntax, import without torch or GUI, CMake lists, dependency handling, cache folders."""
import ast
import os
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
HELPERS = sorted(f for f in os.listdir(os.path.join(MODULE_DIR, "SAMFineTuneMRML")) if f.endswith(".py"))
SLICER_FILES = [MODULE_FILE, os.path.join(MODULE_DIR, "batch.py")] + [
    os.path.join(MODULE_DIR, "SAMFineTuneMRML", f) for f in HELPERS]

QT_CLASSES = {"QWidget", "QLabel", "QComboBox", "QPushButton", "QToolButton", "QCheckBox", "QLineEdit", "QSpinBox",
              "QProgressBar"}


@pytest.fixture(scope="module")
def ui():
    return ET.parse(UI_FILE).getroot()


def widgets(root):
    return {w.get("name"): w for w in root.iter("widget")}


def ui_names_in_code():
    """Every ``self.ui.<name>`` the module code uses."""
    tree = ast.parse(open(MODULE_FILE).read())
    names = set()
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute)
                and node.value.attr == "ui" and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    # combo boxes named through the _COMBOS table
    combos = re.search(r"_COMBOS = \{(.*?)\}", open(MODULE_FILE).read(), re.S).group(1)
    return names | set(re.findall(r':\s*"(\w+)"', combos))


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


def test_custom_widgets_are_declared_and_mrml_widgets_get_the_scene(ui):
    declared = {c.find("class").text for c in ui.iter("customwidget")}
    used = {w.get("class") for w in ui.iter("widget")}
    assert used - QT_CLASSES <= declared, sorted(used - QT_CLASSES - declared)
    receivers = {c.find("receiver").text for c in ui.iter("connection")}
    assert receivers <= set(widgets(ui))
    mrml = {name for name, w in widgets(ui).items() if w.get("class", "").startswith("qMRML") and name != "SAMFineTune"}
    assert mrml <= receivers, "MRML widgets without the scene: %s" % sorted(mrml - receivers)


@pytest.mark.parametrize("path", SLICER_FILES, ids=os.path.basename)
def test_code_slicer_imports_is_python_3_9_syntax(path):
    source = open(path).read()
    tree = ast.parse(source, feature_version=(3, 9))
    assert not any(isinstance(n, getattr(ast, "Match", ())) for n in ast.walk(tree))
    # no PEP 604 unions in annotations (parameterNodeWrapper evaluates them at runtime)
    annotations = [n.annotation for n in ast.walk(tree) if isinstance(n, (ast.AnnAssign, ast.arg)) and n.annotation]
    assert not any(isinstance(a, ast.BinOp) and isinstance(a.op, ast.BitOr)
                   for ann in annotations for a in ast.walk(ann))


STUBS = textwrap.dedent('''
    import sys, types, importlib.abc
    class BlockTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("torch", "torchvision", "timm", "segment_anything", "monai", "peft"):
                raise ImportError("blocked for the test: " + name)
    sys.meta_path.insert(0, BlockTorch())
    import slicer
    qt = types.ModuleType("qt")
    qt.QIcon = lambda path: ("icon", path)
    sys.modules["qt"] = qt
    slm = types.ModuleType("slicer.ScriptedLoadableModule")
    class Base:
        def __init__(self, parent=None):
            self.parent = parent
        def getParameterNode(self):
            return "parameter node"
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic",
                 "ScriptedLoadableModuleTest"):
        setattr(slm, name, type(name, (Base,), {}))
    sys.modules["slicer.ScriptedLoadableModule"] = slm
    pnw = types.ModuleType("slicer.parameterNodeWrapper")
    pnw.parameterNodeWrapper = lambda cls: cls
    pnw.WithinRange = lambda lo, hi: ("range", lo, hi)
    sys.modules["slicer.parameterNodeWrapper"] = pnw
''')


def test_module_imports_without_torch_and_without_a_gui():
    code = STUBS + textwrap.dedent('''
        sys.path.insert(0, %r)
        import SAMFineTune
        parent = types.SimpleNamespace()
        SAMFineTune.SAMFineTune(parent)
        assert parent.title == "SAM Fine-Tune" and parent.categories == ["Segmentation"], parent
        assert parent.icon[1].endswith("SAMFineTune.png"), parent.icon
        logic = SAMFineTune.SAMFineTuneLogic()
        assert callable(logic.segment) and callable(logic.roiToIJKBox) and callable(logic.undo)
        assert SAMFineTune.resourcePath("UI/SAMFineTune.ui").endswith("SAMFineTune.ui")
        import os; assert os.path.isfile(SAMFineTune.resourcePath("UI/SAMFineTune.ui"))
        fields = SAMFineTune.SAMFineTuneParameterNode.__annotations__
        assert {"inputVolume", "segmentation", "rois", "model", "window", "boxMode", "epochs"} <= set(fields)
        heavy = [m for m in ("torch", "SAMFineTuneLib.segmenter", "SAMFineTuneLib.models") if m in sys.modules]
        assert not heavy, heavy
        print("OK")
    ''' % MODULE_DIR)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout + out.stderr


def test_cmake_lists_every_module_file_and_follows_extension_conventions():
    module_cmake = open(os.path.join(MODULE_DIR, "CMakeLists.txt")).read()
    for name in HELPERS:
        assert "SAMFineTuneMRML/%s" % name in module_cmake, name
    assert "slicerMacroBuildScriptedModule" in module_cmake and "WITH_GENERIC_TESTS" in module_cmake
    assert re.search(r"slicer_add_python_unittest\(SCRIPT \$\{MODULE_NAME\}\.py\)", module_cmake)
    assert "batch.py" in module_cmake
    root = open(os.path.join(REPO, "CMakeLists.txt")).read()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS"):
        assert re.search(r"set\(%s " % key, root), key
    assert 'set(EXTENSION_CATEGORY "Segmentation")' in root and "add_subdirectory(SAMFineTune)" in root
    assert "SAMFineTuneLib/*.py" in root and "Resources/UI/*.ui" in root
    assert "Slicer_EXTENSION_GENERATE_CONFIG" in root and "Slicer_EXTENSION_CPACK" in root


def test_dependency_check_and_install_use_pinned_requirements(monkeypatch):
    sys.path.insert(0, MODULE_DIR)
    from SAMFineTuneMRML import deps

    present = {"torch", "torchvision", "timm"}
    monkeypatch.setattr(deps, "isInstalled", lambda name: name in present)
    missing = deps.missingPackages()
    assert "segment-anything==1.0" in missing and not any(r.startswith("timm") for r in missing)
    assert all(("==" in r or ">=" in r) for r in missing)
    assert deps.missingTorch() == []
    installed = []
    assert deps.installPackages(pipInstall=installed.append) == missing and installed == missing
    present.discard("torch")
    assert "PyTorch" in deps.describeMissing()
    with pytest.raises(RuntimeError, match="PyTorch.*Extensions Manager"):
        deps.installTorch()  # no PyTorchUtils outside Slicer: a clear message, nothing installed


def test_caches_live_in_the_user_cache_folder_never_the_install_folder(monkeypatch, tmp_path):
    sys.path.insert(0, MODULE_DIR)
    from SAMFineTuneMRML import paths

    monkeypatch.delenv("SAMFINETUNE_CACHE", raising=False)
    monkeypatch.delenv("SAMFINETUNE_ADAPTERS", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("LOCALAPPDATA", str(tmp_path / "cache"))
    assert paths.cacheDirectory().startswith(str(tmp_path / "cache"))
    assert not paths.cacheDirectory().startswith(REPO)
    assert paths.adaptersDirectory() == os.path.join(paths.cacheDirectory(), "adapters")
    monkeypatch.setenv("SAMFINETUNE_CACHE", str(tmp_path / "mine"))
    assert paths.cacheDirectory() == str(tmp_path / "mine") and paths.workerEnvironment() == {
        "SAMFINETUNE_CACHE": str(tmp_path / "mine")}
