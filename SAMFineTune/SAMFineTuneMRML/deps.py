"""The engine's Python packages inside Slicer: what is missing, and installing it.

The list is the engine's own ``SAMFineTuneLib/requirements.txt`` (pip reads the same file
through pyproject.toml), so Slicer installs exactly what the tests run with. Finding out what is
missing reads package metadata only: nothing is imported, so this works before torch exists.

Installation follows the well-made Slicer extensions: the caller asks the user first; torch and
torchvision go through the PyTorch extension's ``PyTorchUtils`` (it picks the build for the
machine's GPU), the rest through Slicer's pip on the main thread. Slicer's ``pip_install``
shlex-splits a string into pip arguments (5.10: ``Base/Python/slicer/util.py``; 5.12:
``_build_pip_args`` in ``Base/Python/slicer/packaging.py``), so an environment marker inside a
string reaches pip as separate words; markers are therefore evaluated here and pip gets a list
of plain specifiers.
"""

import importlib.metadata
import logging
import os
import sys

from packaging.requirements import Requirement

from .library import libraryFolder

#: Installed through PyTorchUtils, as a pair.
TORCH_PACKAGES = ("torch", "torchvision")
REQUESTER = "SAM Fine-Tune"


def requirementsFile():
    return os.path.join(libraryFolder(), "requirements.txt")


def requirements(path=None):
    """The engine's requirements whose environment markers hold here (packaging Requirements)."""
    found = []
    with open(path or requirementsFile(), encoding="utf-8") as handle:
        for line in handle:
            line = line.split("#", 1)[0].strip()
            if line:
                requirement = Requirement(line)
                if requirement.marker is None or requirement.marker.evaluate():
                    found.append(requirement)
    return found


def installedVersion(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def isSatisfied(requirement):
    version = installedVersion(requirement.name)
    return version is not None and requirement.specifier.contains(version, prereleases=True)


def missing(path=None):
    """Requirements not installed, or installed at a version outside their specifier."""
    return [requirement for requirement in requirements(path) if not isSatisfied(requirement)]


def pipArgument(requirement):
    """One pip argument: name, extras and version specifier, never a marker (see the module doc)."""
    extras = "[%s]" % ",".join(sorted(requirement.extras)) if requirement.extras else ""
    return requirement.name + extras + str(requirement.specifier)


def describe(requirement):
    version = installedVersion(requirement.name)
    return pipArgument(requirement) + (" (%s installed)" % version if version else "")


def describeMissing(path=None):
    """One line for the panel listing what is missing, or '' when everything is there."""
    return ", ".join(describe(requirement) for requirement in missing(path))


def checkPython():
    """An error text when this Python cannot run the engine (Slicer 5.8 and older ship 3.9), else ''."""
    if sys.version_info < (3, 10):
        return ("SAM Fine-Tune needs 3D Slicer 5.10 or later (Python 3.10+); this Slicer runs Python %d.%d. "
                "Install a current Slicer from download.slicer.org." % sys.version_info[:2])
    return ""


def installTorch(requirementsByName, askConfirmation=False):
    """torch and torchvision at the pinned versions through PyTorchUtils (PyTorch extension).

    PyTorchUtils installs both in one go, so a missing torchvision is installed even where torch
    is there (``PyTorchUtilsLogic.torchInstalled`` looks at torch alone)."""
    try:
        import PyTorchUtils
    except ImportError:
        raise RuntimeError(
            "PyTorch is installed through the 'PyTorch' extension: open the Extensions Manager, install "
            "'PyTorch', restart Slicer and try again.") from None
    logging.info("Installing %s through PyTorchUtils", ", ".join(pipArgument(r) for r in requirementsByName.values()))
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=askConfirmation,
        torchVersionRequirement=str(requirementsByName["torch"].specifier),
        torchvisionVersionRequirement=str(requirementsByName["torchvision"].specifier))
    if torch is None:
        raise RuntimeError("PyTorch was not installed (cancelled or failed); the Python console shows pip's output.")


def pipInstall(arguments):
    """Slicer's pip with a list of plain specifiers; on Slicer 5.12+ with its progress dialog."""
    try:
        from slicer import packaging as slicerPackaging  # Slicer 5.12+
    except ImportError:
        slicerPackaging = None
    if slicerPackaging is not None:
        slicerPackaging.pip_install(list(arguments), requester=REQUESTER, show_progress=True)
    else:
        import slicer

        slicer.util.pip_install(list(arguments))


def install(path=None, torchInstaller=installTorch, pipInstaller=pipInstall):
    """Install what is missing: the torch pair first, then the rest in one pip call. Returns the
    requirements installed. A failure raises (pip's CalledProcessError or RuntimeError)."""
    needed = missing(path)
    torchPair = {r.name: r for r in requirements(path) if r.name in TORCH_PACKAGES}
    if any(r.name in TORCH_PACKAGES for r in needed):
        torchInstaller(torchPair)
    rest = [r for r in needed if r.name not in TORCH_PACKAGES]
    if rest:
        logging.info("pip install %s", " ".join(pipArgument(r) for r in rest))
        pipInstaller([pipArgument(r) for r in rest])
    return needed


def importedAlready(requirements_):
    """Names of the given packages that this process has imported already: their new versions
    load only after a restart."""
    wanted = {canonical(r.name) for r in requirements_}
    found = set()
    for module, distributions in importlib.metadata.packages_distributions().items():
        if module in sys.modules:
            found.update(canonical(name) for name in distributions if canonical(name) in wanted)
    return sorted(found)


def canonical(name):
    return name.lower().replace("_", "-")
