"""Where the engine package ``SAMFineTuneLib`` is, from the source tree or an installed extension.

In the source tree it sits beside the ``SAMFineTune`` module folder; an installed extension puts
it next to the module in ``qt-scripted-modules``. Importing this module makes it importable.
"""

import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))


def ensureLibraryImportable():
    """Put the folder that holds ``SAMFineTuneLib`` on sys.path unless it is importable already."""
    if importlib.util.find_spec("SAMFineTuneLib") is not None:
        return
    for candidate in (os.path.dirname(_HERE), os.path.dirname(os.path.dirname(_HERE))):
        if os.path.isdir(os.path.join(candidate, "SAMFineTuneLib")):
            sys.path.insert(0, candidate)
            return
    raise ImportError("SAMFineTuneLib not found beside %s: the extension is incomplete; reinstall it" % _HERE)


def libraryFolder():
    """The ``SAMFineTuneLib`` folder (files that ship with it, such as requirements.txt)."""
    ensureLibraryImportable()
    return list(importlib.util.find_spec("SAMFineTuneLib").submodule_search_locations)[0]


ensureLibraryImportable()
