"""Combo boxes whose items carry a value as item data (the panel's choices come from the catalogue)."""


def fillCombo(combo, choices):
    """Replace the items with ``choices``: (value, label) pairs."""
    combo.clear()
    for value, text in choices:
        combo.addItem(text, value)


def selectData(combo, value):
    index = combo.findData(value)
    if index >= 0 and index != combo.currentIndex:
        combo.setCurrentIndex(index)


def refillCombo(combo, choices, value):
    """The items made ``choices`` and ``value`` selected, without announcing the change; the items
    are replaced only when they differ (the panel refreshes while a job runs, and replacing them
    closes a list the user has open). Returns whether ``value`` is among them; if not, the first
    item is selected."""
    wasBlocked = combo.blockSignals(True)
    try:
        if [(combo.itemData(index), combo.itemText(index)) for index in range(combo.count)] != list(choices):
            fillCombo(combo, choices)
        found = combo.findData(value) >= 0
        selectData(combo, value if found or not choices else choices[0][0])
    finally:
        combo.blockSignals(wasBlocked)
    return found
