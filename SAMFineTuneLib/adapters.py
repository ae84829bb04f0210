"""LoRA adapters for SAM's mask decoder: wrap, save, load, merge.

An adapter folder holds three files (plus a training run's ``resume_state.pt``), written
atomically with the model card last into a sibling folder that then replaces the adapter folder
as a whole (``adapter_folders``), so a reader sees one run's state, never a mix::

    adapter_model.safetensors   the LoRA tensors (peft's names), plus prompt_encoder.* when
                                the prompt encoder was trained too
    adapter_config.json         peft's LoraConfig (rank, alpha, dropout, target modules)
    model_card.json             base model + checkpoint fingerprint, data, hyper-parameters,
                                per-epoch history, base-vs-adapted scores

An adapter only fits the base model it was trained on: loading it onto another one (other
architecture, other checkpoint file) is a ValueError, and so is any tensor name or shape that
does not match (peft's ``set_peft_model_state_dict`` alone would skip those silently).
"""
from __future__ import annotations

import copy
import json
import os
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

ADAPTER_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
CARD_FILE = "model_card.json"
ADAPTER_FILES = (ADAPTER_FILE, CONFIG_FILE, CARD_FILE)
CARD_FORMAT = "samfinetune-lora-decoder/1"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "lin1", "lin2")
_PROMPT_PREFIX = "prompt_encoder."


def lora_config(rank: int = 8, alpha: float = 16.0, dropout: float = 0.0, targets: Sequence[str] = DEFAULT_TARGETS):
    from peft import LoraConfig

    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    return LoraConfig(r=int(rank), lora_alpha=alpha, lora_dropout=float(dropout), target_modules=list(targets),
                      bias="none")


def check_targets(decoder: nn.Module, targets: Sequence[str]) -> None:
    """A ValueError unless every LoRA target names Linear layers of ``decoder``."""
    names = {n.rsplit(".", 1)[-1] for n, m in decoder.named_modules() if isinstance(m, nn.Linear)}
    missing = sorted(set(targets) - names)
    if missing:
        raise ValueError(f"LoRA targets {missing} are not Linear layers of the mask decoder "
                         f"(available: {', '.join(sorted(names))})")


def wrap_decoder(decoder: nn.Module, config) -> nn.Module:
    """A LoRA-wrapped deep copy of ``decoder`` (a peft model); only the LoRA tensors train."""
    from peft import get_peft_model

    check_targets(decoder, config.target_modules)
    return get_peft_model(copy.deepcopy(decoder), config)


def inner_decoder(peft_decoder: nn.Module) -> nn.Module:
    """The MaskDecoder inside a peft wrapper (its Linear layers carry the LoRA branches)."""
    return peft_decoder.base_model.model


def lora_state(peft_decoder: nn.Module) -> Dict[str, torch.Tensor]:
    from peft import get_peft_model_state_dict

    return {k: v.detach().cpu().clone().contiguous() for k, v in get_peft_model_state_dict(peft_decoder).items()}


def load_lora_state(peft_decoder: nn.Module, state: Dict[str, torch.Tensor], source: str = "adapter") -> None:
    """Load LoRA tensors, refusing any name or shape that does not match (peft would skip them)."""
    from peft import set_peft_model_state_dict

    expected = set(lora_state(peft_decoder))
    unexpected, missing = sorted(set(state) - expected), sorted(expected - set(state))
    if unexpected or missing:
        detail = []
        if unexpected:
            detail.append(f"{len(unexpected)} unknown tensors (e.g. {unexpected[0]})")
        if missing:
            detail.append(f"{len(missing)} missing tensors (e.g. {missing[0]})")
        raise ValueError(f"{source} does not fit this LoRA configuration: " + "; ".join(detail))
    try:
        result = set_peft_model_state_dict(peft_decoder, state)
    except RuntimeError as error:  # size mismatch
        raise ValueError(f"{source} does not fit this LoRA configuration: {str(error).splitlines()[0]}") from None
    leftover = [k for k in result.unexpected_keys] + [k for k in result.missing_keys if "lora_" in k]
    if leftover:
        raise ValueError(f"{source}: peft did not load {len(leftover)} tensors (e.g. {leftover[0]})")


def save_adapter(output_dir: str, peft_decoder: nn.Module, card: Dict[str, Any],
                 prompt_encoder: Optional[nn.Module] = None) -> str:
    """Write the adapter tensors, peft config and model card (card last) into ``output_dir``."""
    from safetensors.torch import save_file

    from .files import atomic_write, write_json_atomic, write_text_atomic

    os.makedirs(output_dir, exist_ok=True)
    tensors = lora_state(peft_decoder)
    if prompt_encoder is not None:
        tensors.update({_PROMPT_PREFIX + k: v.detach().cpu().clone().contiguous()
                        for k, v in prompt_encoder.state_dict().items()})
    card_text = json.dumps(card, indent=1) + "\n"
    # The card's digest travels with the tensors: a reader checks it holds the card of these tensors.
    metadata = {"format": "pt", "card_format": CARD_FORMAT, "base_fingerprint": str(card["base_model"]["fingerprint"]),
                "card_sha256": _digest(card_text.encode("utf-8"))}
    atomic_write(os.path.join(output_dir, ADAPTER_FILE), lambda temp: save_file(tensors, temp, metadata=metadata))
    config = peft_decoder.peft_config["default"].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    config["peft_type"] = str(getattr(config["peft_type"], "value", config["peft_type"]))
    write_json_atomic(os.path.join(output_dir, CONFIG_FILE), config)
    write_text_atomic(os.path.join(output_dir, CARD_FILE), card_text)
    return output_dir


def _digest(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _card_bytes(adapter_dir: str) -> bytes:
    from .adapter_folders import settle

    settle(str(adapter_dir))  # a training killed mid-swap left the folder beside its name
    with open(os.path.join(str(adapter_dir), CARD_FILE), "rb") as handle:  # FileNotFoundError: no card
        return handle.read()


def _parse_card(data: bytes, adapter_dir: str) -> Dict[str, Any]:
    path = os.path.join(str(adapter_dir), CARD_FILE)
    try:
        card = json.loads(data.decode("utf-8"))  # UnicodeDecodeError is a ValueError too
    except ValueError as error:
        raise ValueError(f"{path} is not a readable model card ({str(error).splitlines()[0]}); train the adapter "
                         "again or choose another adapter") from None
    if not isinstance(card, dict):
        raise ValueError(f"{path} is not a model card (it holds a JSON {type(card).__name__}, not an object); "
                         "train the adapter again or choose another adapter")
    if card.get("format") != CARD_FORMAT:
        raise ValueError(f"{path}: unknown adapter format {card.get('format')!r} (expected {CARD_FORMAT})")
    return card


def _not_an_adapter(adapter_dir: str) -> ValueError:
    return ValueError(f"{adapter_dir} is not a SAMFineTune adapter: it has no {CARD_FILE}")


def read_model_card(adapter_dir: str) -> Dict[str, Any]:
    try:
        return _parse_card(_card_bytes(adapter_dir), adapter_dir)
    except FileNotFoundError:
        raise _not_an_adapter(adapter_dir) from None


def _tensor_file(path: str) -> Tuple[Optional[str], Dict[str, torch.Tensor]]:
    """(card digest recorded with the tensors, tensors) from one open of ``path``: safetensors'
    own ``safe_open`` checks the path before opening it, so a folder swapped in between fails it
    with a RuntimeError; a file opened here stays readable after its folder is renamed away."""
    import struct

    from safetensors import SafetensorError
    from safetensors.torch import load

    with open(path, "rb") as handle:  # FileNotFoundError: a swap in progress, or no tensors
        data = handle.read()
    try:
        tensors = load(data)
    except SafetensorError as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error}); train the adapter again") from None
    header_size = struct.unpack("<Q", data[:8])[0]  # the format: header length, JSON header, tensor bytes
    metadata = json.loads(data[8:8 + header_size].decode("utf-8")).get("__metadata__") or {}
    return metadata.get("card_sha256"), tensors


def read_adapter(adapter_dir: str, attempts: int = 5) -> Tuple[Dict[str, Any], Dict[str, torch.Tensor]]:
    """(model card, tensors) of one and the same write: a training may replace the folder between
    reading the card and reading the tensors, so the pair is read again until the tensors'
    record of their card's digest matches."""
    import time

    path = os.path.join(str(adapter_dir), ADAPTER_FILE)
    for attempt in range(attempts):
        try:  # a missing file may be a swap in progress (the folder renamed away): settle and read again
            data = _card_bytes(adapter_dir)
            expected, tensors = _tensor_file(path)
        except FileNotFoundError:
            if attempt < attempts - 1:
                time.sleep(0.05 * (attempt + 1))
                continue
            if not os.path.isfile(os.path.join(str(adapter_dir), CARD_FILE)):
                raise _not_an_adapter(adapter_dir) from None
            raise ValueError(f"adapter {adapter_dir} has a model card but no {ADAPTER_FILE}") from None
        if expected in (None, _digest(data)):  # None: written before cards were recorded with the tensors
            return _parse_card(data, adapter_dir), tensors
        time.sleep(0.05 * (attempt + 1))
    raise ValueError(f"adapter {adapter_dir}: its tensors and model card come from different writes and kept "
                     "changing while read; is a training still writing it?")


def check_base(model, card: Dict[str, Any], adapter_dir: str) -> None:
    base = card.get("base_model", {})
    if base.get("fingerprint") != model.fingerprint:
        raise ValueError(f"adapter {adapter_dir} was trained on base model {base.get('name')!r} "
                         f"(fingerprint {base.get('fingerprint')}), but the loaded model is {model.spec.name!r} "
                         f"(fingerprint {model.fingerprint}); load the same model and checkpoint file")


def load_adapter(model, adapter_dir: str) -> Tuple[nn.Module, Optional[nn.Module], Dict[str, Any]]:
    """(peft-wrapped copy of the model's decoder with the adapter loaded, trained prompt encoder
    or None, model card). The model itself is not modified."""
    card, tensors = read_adapter(adapter_dir)
    check_base(model, card, adapter_dir)
    lora = card["lora"]
    peft_decoder = wrap_decoder(model.mask_decoder, lora_config(lora["rank"], lora["alpha"], 0.0, lora["targets"]))
    prompt_state = {k[len(_PROMPT_PREFIX):]: v for k, v in tensors.items() if k.startswith(_PROMPT_PREFIX)}
    load_lora_state(peft_decoder, {k: v for k, v in tensors.items() if not k.startswith(_PROMPT_PREFIX)},
                    f"adapter {adapter_dir}")
    prompt_encoder = None
    if prompt_state:
        prompt_encoder = copy.deepcopy(model.prompt_encoder)
        try:
            prompt_encoder.load_state_dict(prompt_state, strict=True)
        except RuntimeError as error:
            raise ValueError(f"adapter {adapter_dir}: prompt encoder tensors do not fit: "
                             f"{str(error).splitlines()[0]}") from None
    device = model.device
    peft_decoder.to(device).eval().requires_grad_(False)
    if prompt_encoder is not None:
        prompt_encoder.to(device).eval().requires_grad_(False)
    return peft_decoder, prompt_encoder, card


def merged_decoder(model, adapter_dir: str) -> nn.Module:
    """A plain segment-anything MaskDecoder with the adapter's LoRA merged into its weights
    (no peft needed to run it); ValueError when the adapter belongs to another base model."""
    peft_decoder, _, _ = load_adapter(model, adapter_dir)
    return peft_decoder.merge_and_unload().eval().requires_grad_(False)


def adapted_prompt_encoder(model, adapter_dir: str) -> Optional[nn.Module]:
    """The adapter's trained prompt encoder, or None when it was kept frozen (the default)."""
    return load_adapter(model, adapter_dir)[1]
