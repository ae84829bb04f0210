"""The tracking margin an adapter segments with: chosen on its validation cases from one ROI at
the end of training, written into its card, and honoured by the Segmenter (training/tracking_choice.py)."""
import json

import pytest
import torch

from SAMFineTuneLib import adapters, tracking
from SAMFineTuneLib.catalogue import (ADAPTER_ROI_TRACKING, ADAPTER_TRACKING_MARGINS_PX,
                                     TRACKING_DEFAULTS, VALIDATION_ROI_MARGIN)
from SAMFineTuneLib.dataset import export_dataset, load_case, read_dataset
from SAMFineTuneLib.phantom_lowcontrast import make_cases
from SAMFineTuneLib.progress import Cancelled
from SAMFineTuneLib.segmenter import Segmenter
from SAMFineTuneLib.training import TrainConfig, cache_dir_for, train
from SAMFineTuneLib.training.tracking_choice import choose_tracking

FAST = dict(batch_size=4, lr=3e-3, lora_dropout=0.0, patience=0, select_best=False, final_scores=False,
            min_epoch_steps=0)


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """Two training and two validation phantoms of 6 slices: structures tracking can follow."""
    root = str(tmp_path_factory.mktemp("tracking_choice") / "phantom3d")
    cases = make_cases(2, first_seed=0, slices=6, size=64) + make_cases(2, first_seed=100, slices=6, size=64)
    export_dataset(cases, root, splits={c[0]: "train" if c[0] < "phantom100" else "val" for c in cases},
                   label_names={1: "organ"})
    return root


def smoothing_kept(choice):
    """The smoothing a choice must keep: the adapters' own unless it scored below no smoothing."""
    px = str(choice["min_margin_px"])
    return ADAPTER_ROI_TRACKING["smooth_mm"] if choice["dice"][px] >= choice["dice_unsmoothed"][px] else 0.0


@pytest.fixture(scope="module")
def adapted(litemedsam, volumes, tmp_path_factory):
    output = str(tmp_path_factory.mktemp("adapter"))
    logs = []
    card = train(TrainConfig(dataset=volumes, output=output, epochs=1, **FAST), model=litemedsam, log=logs.append)
    return {"card": card, "output": output, "logs": logs}


def test_training_chooses_the_best_margin_on_the_validation_cases_and_the_card_carries_it(adapted):
    choice = adapted["card"]["tracking_choice"]
    assert set(choice["dice"]) == {str(px) for px in ADAPTER_TRACKING_MARGINS_PX}
    assert choice["structures"] == 2 and choice["roi_margin"] == VALIDATION_ROI_MARGIN
    best = max(choice["dice"].values())
    assert choice["dice"][str(choice["min_margin_px"])] == best
    chosen = {"min_margin_px": choice["min_margin_px"], **ADAPTER_ROI_TRACKING, "smooth_mm": smoothing_kept(choice)}
    assert adapted["card"]["inference"]["tracking"] == chosen
    with open(f"{adapted['output']}/model_card.json") as handle:
        assert json.load(handle)["inference"]["tracking"] == chosen
    assert any("tracking margin for this adapter" in line for line in adapted["logs"])


def test_compare_adapters_weighs_adapters_of_tracked_structures_from_one_roi(litemedsam, volumes, adapted):
    """The candidate's card decides the prompt (``catalogue.comparison_roi_margin``, as "keep
    learning" weighs them): its run chose a tracking margin, so both are scored from one ROI, as
    ``evaluate`` scores them with that margin."""
    from SAMFineTuneLib.evaluate import compare_adapters, evaluate

    compared = compare_adapters(volumes, candidate=adapted["output"], model=litemedsam)
    assert compared["prompt"] == "roi" and compared["cases"] == adapted["card"]["dataset"]["val_cases"]
    report = evaluate(volumes, model=litemedsam, adapter=adapted["output"], roi_margin=VALIDATION_ROI_MARGIN)
    assert compared["candidate"]["dice"] == pytest.approx(report["mean"]["adapted"]["dice"], abs=1e-9)
    assert compared["current"]["dice"] == pytest.approx(report["mean"]["base"]["dice"], abs=1e-9)


def test_the_best_margin_wins_the_default_wins_ties_and_the_model_is_left_as_it_was(litemedsam, volumes):
    """Whatever the scores, the choice is the best margin, the default among equals; the model's
    own decoder is back afterwards, also when the user cancels."""
    info = read_dataset(volumes)
    config = TrainConfig(dataset=volumes, output="unused", window_margin=4)
    own = litemedsam.mask_decoder, litemedsam.prompt_encoder
    choice = choose_tracking(litemedsam, litemedsam.mask_decoder, None, info, ["phantom100"], config,
                             cache_dir_for(volumes))
    scores = choice["dice"]
    best = max(scores.values())
    first_best = next(int(px) for px in scores if scores[px] == best)
    expected = TRACKING_DEFAULTS["min_margin_px"] if scores[str(TRACKING_DEFAULTS["min_margin_px"])] == best \
        else first_best
    assert choice["min_margin_px"] == expected
    assert {key: choice[key] for key in ADAPTER_ROI_TRACKING} == dict(ADAPTER_ROI_TRACKING,  # trained on loose ROIs
                                                                      smooth_mm=smoothing_kept(choice))
    no_roi = choose_tracking(litemedsam, litemedsam.mask_decoder, None, info, ["phantom100"],
                             TrainConfig(dataset=volumes, output="unused", window_margin=4, roi_prompts=0.0), None)
    assert no_roi["seed_area_weight"] == TRACKING_DEFAULTS["seed_area_weight"] == 0.0
    assert no_roi["fixed_fallback"] == TRACKING_DEFAULTS["fixed_fallback"] == 0.0
    assert no_roi["own_box_px"] == TRACKING_DEFAULTS["own_box_px"] == 0
    assert no_roi["smooth_mm"] == TRACKING_DEFAULTS["smooth_mm"] == 0.0
    with pytest.raises(Cancelled):
        choose_tracking(litemedsam, litemedsam.mask_decoder, None, info, ["phantom100"], config, None,
                        cancel=lambda: True)
    assert (litemedsam.mask_decoder, litemedsam.prompt_encoder) == own


def test_two_dimensional_validation_cases_have_nothing_to_track(litemedsam, tmp_path):
    root = str(tmp_path / "flat")
    cases = make_cases(2, first_seed=0, slices=1, size=64)
    export_dataset(cases, root, splits={cases[0][0]: "train", cases[1][0]: "val"}, label_names={1: "organ"})
    config = TrainConfig(dataset=root, output="unused")
    assert choose_tracking(litemedsam, litemedsam.mask_decoder, None, read_dataset(root), [cases[1][0]], config,
                           None) is None


def adapter_asking(model, adapter_dir, folder, asked):
    """A copy of the adapter whose card asks for ``asked`` as its tracking options."""
    peft_decoder, prompt_encoder, card = adapters.load_adapter(model, adapter_dir)
    card["inference"]["tracking"] = asked
    return adapters.save_adapter(str(folder), peft_decoder, card, prompt_encoder)


def test_the_segmenter_tracks_with_the_adapters_margin_and_the_base_with_its_own(litemedsam, volumes, adapted,
                                                                                 tmp_path, monkeypatch):
    folder = adapter_asking(litemedsam, adapted["output"], tmp_path / "adapter", {"min_margin_px": 5})
    used = []
    real_track = tracking.track
    monkeypatch.setattr(tracking, "track", lambda job, slices, roi, options: used.append(options.min_margin_px)
                        or real_track(job, slices, roi, options))
    segmenter = Segmenter(litemedsam)
    image, _ = load_case(read_dataset(volumes).case("phantom100"))
    box = (10, 10, 0, 50, 50, 5)
    segmenter.set_adapter(folder)
    assert segmenter.tracking_in_use.min_margin_px == 5 and segmenter.tracking.min_margin_px == 2
    segmenter.segment(image, box, box_mode="tracked")
    segmenter.set_adapter(None)
    segmenter.segment(image, box, box_mode="tracked")
    assert used == [5, TRACKING_DEFAULTS["min_margin_px"]]


@pytest.mark.parametrize("asked", [{"min_margin_px": True}, {"min_margin_px": 2.5}, {"no_such_option": 1},
                                   {"seed_span": [0.1, 0.9]}])
def test_a_card_asking_for_what_tracking_does_not_take_is_refused_and_the_adapter_in_use_stays(
        litemedsam, adapted, tmp_path, asked):
    folder = adapter_asking(litemedsam, adapted["output"], tmp_path / "adapter", asked)
    segmenter = Segmenter(litemedsam)
    segmenter.set_adapter(adapted["output"])
    in_use = segmenter.tracking_in_use
    with pytest.raises(ValueError, match=f"adapter {folder}.*tracking option {next(iter(asked))}"):
        segmenter.set_adapter(folder)
    assert segmenter.adapter == adapted["output"] and segmenter.tracking_in_use == in_use
    segmenter.set_adapter(None)


def test_scoring_from_one_roi_segments_in_the_box_mode_asked(litemedsam, volumes, adapted):
    """evaluate.score_from_roi scores what the Segmenter gives from that ROI in each box mode, and
    by default what a user gets from each model: crossed boxes from the base model, tracked boxes
    from an adapter (so "keep learning" and the evaluation weigh an adapter against the base
    model's default, not against a mode the user does not run)."""
    import numpy as np

    from SAMFineTuneLib.evaluate import roi_box, score_from_roi
    from SAMFineTuneLib.metrics import dice_score

    info = read_dataset(volumes)
    image, label = load_case(info.case("phantom100"))
    mask = np.asarray(label.array) == 1
    box = roi_box(mask, VALIDATION_ROI_MARGIN)
    scores = {}
    for adapter, mode in ((None, "tracked"), (None, "fixed"), (None, "crossed"), (adapted["output"], "tracked")):
        chosen = {"base": None, "adapted": adapter}
        run = score_from_roi(litemedsam, info, ["phantom100"], chosen, "axial", "auto", None, 2.0, 4, box_mode=mode)
        default = score_from_roi(litemedsam, info, ["phantom100"], chosen, "axial", "auto", None, 2.0, 4)
        segmenter = Segmenter(litemedsam, window_margin=4)
        segmenter.set_adapter(adapter)
        try:
            segmented = segmenter.segment(image, box, axis="axial", window="auto", box_mode=mode)
        finally:
            segmenter.set_adapter(None)  # the session's model keeps its own decoder for the tests after this one
        name = "adapted" if adapter else "base"
        scores[name, mode] = run[name]["cases"][0]["dice"]
        assert scores[name, mode] == pytest.approx(dice_score(segmented.mask > 0, mask), abs=1e-6)
        scores[name, "default"] = default[name]["cases"][0]["dice"]
    assert len({scores["base", mode] for mode in ("tracked", "fixed", "crossed")}) == 3
    assert scores["base", "default"] == scores["base", "crossed"]
    assert scores["adapted", "default"] == scores["adapted", "tracked"] != scores["base", "tracked"]


def test_smoothing_that_lowers_the_validation_dice_is_not_kept(litemedsam, volumes, monkeypatch):
    """The adapters' 3D smoothing is weighed on the validation cases with the same runs: one that
    takes the structure away scores lower there and the card keeps none."""
    from SAMFineTuneLib import postprocess
    from SAMFineTuneLib.training.tracking_choice import smoothing_text

    info = read_dataset(volumes)
    config = TrainConfig(dataset=volumes, output="unused", window_margin=4)
    kept = choose_tracking(litemedsam, litemedsam.mask_decoder, None, info, ["phantom100"], config, None)
    monkeypatch.setattr(postprocess, "smooth", lambda mask, sigma_mm, spacing: mask * 0)
    choice = choose_tracking(litemedsam, litemedsam.mask_decoder, None, info, ["phantom100"], config, None)
    assert choice["dice_unsmoothed"] == kept["dice_unsmoothed"] and max(choice["dice"].values()) == 0.0
    assert choice["smooth_mm"] == 0.0 and "not smoothed" in smoothing_text(choice)


def test_validation_and_roi_scores_segment_each_case_along_the_axis_it_was_segmented_along(litemedsam, tmp_path,
                                                                                            monkeypatch):
    import types

    import numpy as np

    from SAMFineTuneLib.evaluate import score_from_roi

    cases = make_cases(2, first_seed=0, slices=6, size=64)
    root = str(tmp_path / "mixed")
    export_dataset(cases, root, splits={cases[0][0]: "train", cases[1][0]: "val"}, label_names={1: "organ"},
                   slice_axes={cases[1][0]: "coronal"})
    asked = []

    def segment(self, image, box, axis="axial", **options):
        asked.append(axis)
        return types.SimpleNamespace(mask=np.zeros(np.asarray(image.array).shape, np.uint8))

    monkeypatch.setattr(Segmenter, "segment", segment)
    info = read_dataset(root)
    choose_tracking(litemedsam, litemedsam.mask_decoder, None, info, [cases[1][0]],
                    TrainConfig(dataset=root, output="unused"), None)
    assert set(asked) == {"coronal"} and len(asked) == len(ADAPTER_TRACKING_MARGINS_PX)
    asked.clear()
    rows = score_from_roi(litemedsam, info, [c[0] for c in cases], {"base": None}, None, "auto", None, 2.0,
                          4)["base"]["cases"]
    assert asked == ["axial", "coronal"]
    label = np.asarray(cases[1][2].array) == 1
    assert rows[1]["slices"] == int(label.any(axis=(0, 2)).sum()) != int(label.any(axis=(1, 2)).sum())
    asked.clear()
    score_from_roi(litemedsam, info, [c[0] for c in cases], {"base": None}, "sagittal", "auto", None, 2.0, 4)
    assert asked == ["sagittal", "sagittal"]


@pytest.mark.parametrize("lifted", [0, 1])
def test_of_the_epoch_kept_and_the_last_the_better_tracker_is_kept(litemedsam, volumes, tmp_path, monkeypatch, lifted):
    """Epoch 1 leads on the validation Dice with reference boxes (scripted: base 0.5, epochs 0.9
    and 0.8), so it is kept through training; at the end both it and the last epoch are segmented
    from one ROI on the validation cases, and the one tracking better (``lifted``: its scores
    raised by 0.5 here) is written, with its own tracking choice and the record of both."""
    from safetensors.torch import load_file

    from SAMFineTuneLib.training import kept_adapter, trainer as trainer_module

    scripted = iter([0.5, 0.9, 0.8])
    monkeypatch.setattr(trainer_module, "mean_dice", lambda samples, masks: next(scripted))
    real, calls = kept_adapter.choose_tracking, []

    def choose_lifting_one(*args, **kwargs):
        choice = real(*args, **kwargs)
        if len(calls) == lifted:
            choice["dice"] = {px: dice + 0.5 for px, dice in choice["dice"].items()}
        calls.append(choice)
        return choice

    monkeypatch.setattr(kept_adapter, "choose_tracking", choose_lifting_one)
    logs = []
    card = train(TrainConfig(dataset=volumes, output=str(tmp_path), epochs=2, **dict(FAST, select_best=True)),
                 model=litemedsam, log=logs.append)
    kept = 1 + lifted
    assert len(calls) == 2 and card["best_epoch"] == kept and card["best_val_dice"] == [0.9, 0.8][lifted]
    tracked = {str(epoch): choice["dice"][str(choice["min_margin_px"])] for epoch, choice in zip((1, 2), calls)}
    assert card["epoch_choice"] == {"tracked_dice": tracked, "by_validation_dice": 1, "kept": kept}
    assert card["tracking_choice"] is calls[lifted]
    assert any(line.startswith(f"epoch {kept} kept: it tracks the validation cases") for line in logs)
    saved = torch.load(tmp_path / "resume_state.pt", weights_only=True)
    assert saved["best_epoch"] == 1  # what training kept, before the end
    written = load_file(str(tmp_path / adapters.ADAPTER_FILE))
    for state, expected in ((saved["lora"], lifted == 1), (saved["best_lora"], lifted == 0)):
        assert all(torch.equal(written[key], value) for key, value in state.items()) == expected


@pytest.mark.parametrize("harmful", [1, 2])
def test_a_better_tracker_that_harms_a_validation_case_gives_way_to_the_other_epoch_weighed(
        litemedsam, volumes, tmp_path, monkeypatch, harmful):
    """The last epoch tracks better (its tracked scores raised by 0.5) and is chosen, but its
    scores per validation case lower the first case by 0.2 (scripted; no other case lower than the
    base model's): the harm check refuses it, and the epoch the validation Dice kept (epoch 1,
    scripted) is scored and written with its own tracking choice when it passes (``harmful`` = 1);
    when it is refused too (2), the base model is. The base model is scored once: the other epoch's
    scores take its rows from the first scoring."""
    from safetensors.torch import load_file

    from SAMFineTuneLib.training import card as card_module, kept_adapter, trainer as trainer_module
    from SAMFineTuneLib.training.card import kept_text

    scripted = iter([0.5, 0.9, 0.8])
    monkeypatch.setattr(trainer_module, "mean_dice", lambda samples, masks: next(scripted))
    real_choice, choices = kept_adapter.choose_tracking, []

    def choose_lifting_the_last(*args, **kwargs):
        choice = real_choice(*args, **kwargs)
        if choices:
            choice["dice"] = {px: dice + 0.5 for px, dice in choice["dice"].items()}
        choices.append(choice)
        return choice

    real_scores, scored = kept_adapter.per_case_scores, []

    def harming_the_first_case(*args, **kwargs):
        scores = real_scores(*args, **kwargs)
        for row in scores["per_case"]:  # harmless, unless scripted otherwise
            row["adapted"]["dice"] = max(row["adapted"]["dice"], row["base"]["dice"])
        if len(scored) < harmful:
            scores["per_case"][0]["adapted"]["dice"] = scores["per_case"][0]["base"]["dice"] - 0.2
        scored.append(scores)
        return scores

    monkeypatch.setattr(kept_adapter, "choose_tracking", choose_lifting_the_last)
    monkeypatch.setattr(kept_adapter, "per_case_scores", harming_the_first_case)
    real_run, steps = card_module.score_prepared, []
    monkeypatch.setattr(card_module, "score_prepared",
                        lambda *args, **kwargs: steps.append(args[2:3]) or real_run(*args, **kwargs))
    logs = []
    card = train(TrainConfig(dataset=volumes, output=str(tmp_path), epochs=2,
                             **dict(FAST, select_best=True, final_scores=True)), model=litemedsam, log=logs.append)
    assert len(choices) == 2 and len(scored) == 2
    assert len(steps) == 3 and steps.count(()) == 1  # the base model's run: no decoder step given
    assert [row["base"] for row in scored[1]["per_case"]] == [row["base"] for row in scored[0]["per_case"]]
    refused = card["harm_check"]
    assert refused["epoch_refused"] == 2 and refused["base_dice"] - refused["adapted_dice"] == pytest.approx(0.2)
    written = load_file(str(tmp_path / adapters.ADAPTER_FILE))
    saved = torch.load(tmp_path / "resume_state.pt", weights_only=True)
    if harmful == 1:
        assert refused["written"] == 1 and card["best_epoch"] == 1 and card["best_val_dice"] == 0.9
        assert card["epoch_choice"]["kept"] == 1 and card["tracking_choice"] is choices[0]
        assert card["scores"]["per_case"] == scored[1]["per_case"]
        assert all(torch.equal(written[key], value) for key, value in saved["best_lora"].items())
        assert any("epoch 1's adapter, which does not, is written instead" in line for line in logs)
        assert kept_text(card).startswith("epoch 1 (epoch 2 lowered validation case")
    else:
        assert "written" not in refused and card["best_epoch"] == 0 and "tracking_choice" not in card
        assert all(not v.any() for k, v in written.items() if "lora_B" in k)
        assert kept_text(card).startswith("the base model (epoch 2 lowered")


def test_the_last_epoch_is_weighed_only_when_it_is_another_that_beats_the_base_model(tmp_path):
    from SAMFineTuneLib.training import epoch_choice

    config = TrainConfig(dataset=str(tmp_path), output=str(tmp_path / "out"))
    kept, last = {"epoch": 2, "dice": 0.8, "lora": "kept"}, {"lora": "last"}
    history = [{"epoch": 1, "val_dice": 0.7}, {"epoch": 2, "val_dice": 0.8}, {"epoch": 3, "val_dice": 0.78}]
    assert epoch_choice.candidates(history, kept, last, 0.6, config) == [kept, {"lora": "last", "epoch": 3,
                                                                             "dice": 0.78}]
    assert epoch_choice.candidates(history[:2], kept, last, 0.6, config) == [kept]  # the last is the one kept
    assert epoch_choice.candidates(history, kept, last, 0.78, config) == [kept]  # the last does not beat the base
    choice = {"min_margin_px": 3, "dice": {"2": 0.9, "3": 0.7}}
    assert epoch_choice.tracked_dice(choice) == 0.7
    lower = {"min_margin_px": 3, "dice": {"3": 0.695}}
    # the later is kept within 0.01 of the earlier, as the validation Dice keeps epochs
    assert epoch_choice.better_tracker([choice, lower], 0.01) == 1
    assert epoch_choice.better_tracker([choice, lower], 0.0) == 0
    assert epoch_choice.better_tracker([lower, choice], 0.0) == 1
    assert epoch_choice.better_tracker([None, None], 0.01) == 0


def test_the_epochs_after_the_first_are_not_weighed_when_there_is_nothing_to_track():
    from SAMFineTuneLib.training import epoch_choice

    asked = []

    def track(weights):
        asked.append(weights["epoch"])
        return None if weights.get("flat") else {"min_margin_px": 2, "dice": {"2": weights["tracks"]}}

    weighed = [{"epoch": 3, "tracks": 0.70}, {"epoch": 6, "tracks": 0.78}]
    assert epoch_choice.weigh(weighed, track, 0.01) == (1, [{"min_margin_px": 2, "dice": {"2": 0.70}},
                                                             {"min_margin_px": 2, "dice": {"2": 0.78}}])
    assert asked == [3, 6]
    asked.clear()
    assert epoch_choice.weigh([dict(w, flat=True) for w in weighed], track, 0.01) == (0, [None])
    assert asked == [3]  # a 2D run's last epoch is not segmented again for nothing
