"""Path line edits bound to text parameters by the panel (``SAMFineTune.PATH_BINDINGS``)."""

from SAMFineTuneMRML.options import optionalPath


def showPath(lineEdit, value):
    """Show a path parameter; unset ("", or the "." a pathlib parameter saved) shows empty, not as
    the working folder. Unchanged text is left alone, so the cursor stays where the user types."""
    shown = value if optionalPath(value) else ""
    if lineEdit.currentPath != shown:
        lineEdit.currentPath = shown
