"""Installing the engine's packages inside Slicer: one list for pip and Slicer, arguments that
Slicer's pip_install passes to pip intact, the torch pair through PyTorchUtils."""
import importlib.metadata
import os
import shlex
import sys
import types

import pytest
from packaging.requirements import Requirement

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "SAMFineTune"))
from SAMFineTuneMRML import deps  # noqa: E402


def slicer_5_10_pip_args(requirements):
    """What Slicer 5.10's ``slicer.util.pip_install`` hands pip (Base/Python/slicer/util.py,
    v5.10.0, ``pip_install``): a string is shlex-split, a list goes item by item."""
    if type(requirements) == str:
        return ["install", *shlex.split(requirements)]
    return ["install", *requirements]


def slicer_5_12_pip_args(requirements, constraints=None):
    """What Slicer 5.12 hands pip (Base/Python/slicer/packaging.py, v5.12.3, ``_build_pip_args``)."""
    args = ["install", *(shlex.split(requirements) if type(requirements) == str else requirements)]
    if constraints is not None:
        args.extend(["-c", str(constraints)])
    return args


def test_one_list_for_pip_and_for_slicer():
    text = open(os.path.join(REPO, "pyproject.toml")).read()
    assert 'dynamic = ["dependencies"]' in text
    assert 'dependencies = {file = ["SAMFineTuneLib/requirements.txt"]}' in text
    assert deps.requirementsFile() == os.path.join(REPO, "SAMFineTuneLib", "requirements.txt")
    pinned = {r.name: str(r.specifier) for r in deps.requirements()}
    assert pinned["torch"] == "==2.14.1" and pinned["torchvision"] == "==0.29.1"
    assert all(r.specifier for r in deps.requirements()), "every requirement has a version"
    try:
        installed = importlib.metadata.requires("samfinetune")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the project is not pip-installed in this Python")
    from_pip = {Requirement(r).name: str(Requirement(r).specifier) for r in installed if "extra ==" not in r}
    assert from_pip == pinned


@pytest.mark.parametrize("build_args", [slicer_5_10_pip_args, slicer_5_12_pip_args], ids=["5.10", "5.12"])
def test_slicer_pip_install_passes_every_requirement_to_pip_intact(build_args, tmp_path):
    listed = tmp_path / "requirements.txt"
    listed.write_text("monai==1.6.1; python_version >= '3.10'\nold==1.0; python_version < '3.0'\ntorch==2.14.1\n")
    arguments = [deps.pipArgument(r) for r in deps.requirements(str(listed))]
    assert arguments == ["monai==1.6.1", "torch==2.14.1"]  # markers evaluated here, never sent
    for given in (arguments, " ".join(arguments)):
        passed = build_args(given)[1:]
        assert passed == arguments
        for argument in passed:
            assert Requirement(argument).marker is None
    # A marker inside a string is torn into words that pip cannot read: why markers never go to pip.
    torn = build_args("monai==1.6.1; python_version >= '3.10'")[1:]
    assert torn[0] == "monai==1.6.1;" and "python_version" in torn


def test_missing_names_what_to_install_and_what_is_there(monkeypatch, tmp_path):
    listed = tmp_path / "requirements.txt"
    listed.write_text("monai==1.6.1\npeft==0.21.2\nnumpy>=1.26\n")
    versions = {"monai": "1.4.0", "numpy": "2.1.0"}
    monkeypatch.setattr(deps, "installedVersion", versions.get)
    assert [r.name for r in deps.missing(str(listed))] == ["monai", "peft"]
    assert deps.describeMissing(str(listed)) == "monai==1.6.1 (1.4.0 installed), peft==0.21.2"


def test_torch_pair_goes_through_pytorchutils_even_when_only_torchvision_is_missing(monkeypatch, tmp_path):
    listed = tmp_path / "requirements.txt"
    listed.write_text("torch==2.14.1\ntorchvision==0.29.1\nmonai==1.6.1\n")
    monkeypatch.setattr(deps, "installedVersion", {"torch": "2.14.1"}.get)
    calls = []

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=False, forceComputationBackend=None, torchVersionRequirement=None,
                         torchvisionVersionRequirement=None):
            calls.append(("torch", torchVersionRequirement, torchvisionVersionRequirement, askConfirmation))
            return types.ModuleType("torch")

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=PyTorchUtilsLogic))
    installed = deps.install(str(listed), pipInstaller=lambda arguments: calls.append(("pip", arguments)))
    assert calls == [("torch", "==2.14.1", "==0.29.1", False), ("pip", ["monai==1.6.1"])]
    assert [r.name for r in installed] == ["torchvision", "monai"]


def test_no_pytorch_extension_is_a_clear_error_and_installs_nothing(monkeypatch, tmp_path):
    listed = tmp_path / "requirements.txt"
    listed.write_text("torch==2.14.1\ntorchvision==0.29.1\nmonai==1.6.1\n")
    monkeypatch.setattr(deps, "installedVersion", lambda name: None)
    monkeypatch.setitem(sys.modules, "PyTorchUtils", None)
    pip = []
    with pytest.raises(RuntimeError, match="'PyTorch' extension.*Extensions Manager"):
        deps.install(str(listed), pipInstaller=pip.append)
    assert pip == []


@pytest.mark.parametrize("slicer_version", ["5.10", "5.12"])
def test_pip_install_uses_slicers_own_installer(monkeypatch, slicer_version):
    import slicer

    calls = []
    if slicer_version == "5.12":  # slicer.packaging.pip_install, with its progress dialog
        packaging_module = types.ModuleType("slicer.packaging")
        packaging_module.pip_install = lambda requirements, **kwargs: calls.append((requirements, kwargs))
        monkeypatch.setitem(sys.modules, "slicer.packaging", packaging_module)
        monkeypatch.setattr(slicer, "packaging", packaging_module, raising=False)
    else:
        monkeypatch.setitem(sys.modules, "slicer.packaging", None)
        monkeypatch.setattr(slicer.util, "pip_install", lambda requirements: calls.append((requirements, {})))
    deps.pipInstall(["monai==1.6.1", "peft==0.21.2"])
    expected = {"requester": "SAM Fine-Tune", "show_progress": True} if slicer_version == "5.12" else {}
    assert calls == [(["monai==1.6.1", "peft==0.21.2"], expected)]


def test_packages_loaded_before_an_install_ask_for_a_restart(tmp_path):
    listed = tmp_path / "requirements.txt"
    listed.write_text("packaging>=20\nnot-a-real-package==1.0\n")
    assert deps.importedAlready(deps.requirements(str(listed))) == ["packaging"]
