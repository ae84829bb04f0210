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
    """New items, the current value kept, without announcing the change."""
    wasBlocked = combo.blockSignals(True)
    fillCombo(combo, choices)
    selectData(combo, value)
    combo.blockSignals(wasBlocked)
