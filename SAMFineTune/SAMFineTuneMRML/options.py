"""The segmentation options as the panel and the logic take them, checked before any work.

Names, choices and defaults are the engine's catalogue (``SAMFineTuneLib.catalogue``); this
module only adds what the panel shows besides them.
"""

import os

from .library import ensureLibraryImportable

ensureLibraryImportable()
from SAMFineTuneLib.adapter_folders import COMPLETE_MARK, holds_adapter  # noqa: E402
from SAMFineTuneLib.catalogue import (AXES, BACKENDS, BOX_MODES, CLICK_TRAINING_SHARE, DEVICES,  # noqa: E402,F401
                                      MODEL_KEYS, MODEL_SPECS, PRECISIONS, PROMPT_OPTIONS, SEGMENT_DEFAULTS,
                                      VALIDATION_ROI_MARGIN, WINDOWS, comparison_roi_margin)
from SAMFineTuneLib.cli_args import BACKEND_HELP, PRECISION_HELP  # noqa: E402,F401  (the panel's tooltips)
from SAMFineTuneLib.windows import window_setting  # noqa: E402

#: (engine name, label) pairs for the panel's combo boxes.
MODEL_CHOICES = tuple((name, spec.title) for name, spec in MODEL_SPECS.items())
#: The engine's windows, and "custom" for the width/level the user types.
CUSTOM_WINDOW = "custom"
WINDOW_CHOICES = tuple(WINDOWS.items()) + ((CUSTOM_WINDOW, "custom W/L"),)
AXIS_CHOICES = tuple((name, name) for name in AXES)
BOX_MODE_CHOICES = tuple(BOX_MODES.items())
DEVICE_CHOICES = tuple(DEVICES.items())
BACKEND_CHOICES = tuple(BACKENDS.items())
PRECISION_CHOICES = tuple((name, name) for name in PRECISIONS)


def optionalPath(value):
    """A path option as a string, None when unset (an empty ``pathlib.Path`` reads as '.')."""
    text = str(value) if value is not None else ""
    return None if text in ("", ".") else os.path.abspath(os.path.expanduser(text))


def checkOptions(options):
    """The catalogue's defaults updated with ``options``; TypeError for an unknown name and
    ValueError, naming the option and what to do, for a value that cannot work."""
    unknown = sorted(set(options) - set(SEGMENT_DEFAULTS))
    if unknown:
        raise TypeError("unknown segmentation option(s): %s; known: %s"
                        % (", ".join(unknown), ", ".join(sorted(SEGMENT_DEFAULTS))))
    merged = dict(SEGMENT_DEFAULTS)
    merged.update({k: v for k, v in options.items() if v is not None})
    merged["checkpoint"] = optionalPath(options.get("checkpoint"))
    merged["adapter"] = optionalPath(options.get("adapter"))
    _checkChoice(merged, "model", MODEL_SPECS)
    _checkChoice(merged, "axis", AXES)
    _checkChoice(merged, "box_mode", BOX_MODES)
    _checkChoice(merged, "device", DEVICES)
    _checkChoice(merged, "backend", BACKENDS)
    _checkChoice(merged, "precision", PRECISIONS)
    spec = MODEL_SPECS[merged["model"]]
    if spec.needs_checkpoint and not merged["checkpoint"]:
        raise ValueError("Model '%s' needs a checkpoint file: choose it under Model > Checkpoint (only LiteMedSAM "
                         "ships with its weights)." % merged["model"])
    if merged["checkpoint"] and not os.path.isfile(merged["checkpoint"]):
        raise ValueError("Checkpoint file not found: %s. Choose an existing .pth file." % merged["checkpoint"])
    if merged["adapter"] and not holds_adapter(merged["adapter"]):
        raise ValueError("Adapter folder %s holds no %s: choose an adapter trained by SAM Fine-Tune."
                         % (merged["adapter"], COMPLETE_MARK))
    return merged


def adapterWindowWarning(options, volumeArray):
    """A line for the status when the chosen adapter was trained with another intensity window
    than segmentation will use on this volume (None otherwise): an adapter given slices unlike the
    ones it learned can do worse than none (docs/finetuning.md measures it for another axis). Two
    names for one window are the same window ("auto" is the abdomen window on CT). A card that
    cannot be read, or names no window the engine knows, is the engine's to report when it loads
    the adapter."""
    if not options.get("adapter"):
        return None
    import json

    try:
        with open(os.path.join(options["adapter"], COMPLETE_MARK), encoding="utf-8") as handle:
            learned = (json.load(handle).get("inference") or {}).get("window")
    except (OSError, ValueError, AttributeError):
        return None
    if not learned:
        return None
    try:
        if window_setting(volumeArray, learned) == window_setting(volumeArray, options["window"]):
            return None
    except ValueError:
        return None
    return ("Adapter %s was trained with the '%s' window and segmentation uses '%s': where they differ it sees "
            "slices unlike those it learned; choose '%s' under Preprocessing, or train it again with this window."
            % (os.path.basename(options["adapter"]), learned, options["window"], learned))


def trainingOptions(segmentOptions, epochs, learnClicks):
    """A training run's settings from the panel's segmentation options: the model as segmentation
    loads it, and the window it segments with, so that an adapter learns the slices inference will
    give it (and the slices the worker encoded while the user segmented are training's too). No
    axis: the panel's is anatomical, which lies along another array axis on a volume acquired in
    another plane, so each exported case records its own (``exportTrainingSet(axis=)``)."""
    config = {key: segmentOptions[key] for key in MODEL_KEYS}
    config.update(window=segmentOptions["window"], epochs=epochs,
                  click_prompts=CLICK_TRAINING_SHARE if learnClicks else 0.0)
    return config


def _checkChoice(options, name, choices):
    if options[name] not in choices:
        raise ValueError("Unknown %s '%s'; choose one of: %s." % (name.replace("_", " "), options[name],
                                                                   ", ".join(choices)))
