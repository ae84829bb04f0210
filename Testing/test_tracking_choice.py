"""The tracking margin and the box mode an adapter segments with: chosen on its validation cases
from one ROI at the end of training, written into its card, and honoured by the Segmenter
(training/tracking_choice.py, training/box_mode_choice.py)."""
import json

import pytest

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
    assert adapted["card"]["inference"]["box_mode"] == choice["box_mode"] in ("tracked", "crossed")
    assert any(line.startswith(f"box mode for this adapter, chosen from one ROI on the validation cases: "
                               f"{choice['box_mode']}") for line in adapted["logs"])


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
    by default what a user gets from each model: crossed boxes from the base model, the box mode
    its card names from an adapter (so "keep learning" and the evaluation weigh an adapter against
    the base model's default, not against a mode the user does not run)."""
    import numpy as np

    from SAMFineTuneLib.evaluate import roi_box, score_from_roi
    from SAMFineTuneLib.metrics import dice_score

    info = read_dataset(volumes)
    image, label = load_case(info.case("phantom100"))
    mask = np.asarray(label.array) == 1
    box = roi_box(mask, VALIDATION_ROI_MARGIN)
    scores = {}
    chosen_mode = adapted["card"]["inference"]["box_mode"]
    segmenter = Segmenter(litemedsam, window_margin=4)  # one embedding cache: each slice is encoded once
    for adapter, mode in ((None, "tracked"), (None, "fixed"), (None, "crossed"), (adapted["output"], chosen_mode)):
        chosen = {"base": None, "adapted": adapter}
        run = score_from_roi(litemedsam, info, ["phantom100"], chosen, "axial", "auto", None, 2.0, 4, box_mode=mode,
                             segmenter=segmenter)
        default = score_from_roi(litemedsam, info, ["phantom100"], chosen, "axial", "auto", None, 2.0, 4,
                                 segmenter=segmenter)
        assert segmenter.adapter is None  # score_from_roi puts back the adapter it found
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
    assert scores["adapted", "default"] == scores["adapted", chosen_mode] != scores["base", chosen_mode]


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


def test_crossed_boxes_are_weighed_as_a_user_of_the_adapter_gets_them(litemedsam, volumes, adapted):
    """The box-mode choice scores crossed boxes as the Segmenter gives them with the adapter in
    place (planes decoded by the base model, slices by the adapter, smoothed as its card says),
    keeps them only where they beat the chosen tracking, and leaves the model as it was, also on a
    cancel."""
    import numpy as np

    from SAMFineTuneLib.evaluate import roi_box
    from SAMFineTuneLib.metrics import dice_score
    from SAMFineTuneLib.training.box_mode_choice import choose_box_mode

    info, cases = read_dataset(volumes), adapted["card"]["dataset"]["val_cases"]
    config = TrainConfig(dataset=volumes, output="unused", window_margin=4)
    peft_decoder, prompt_encoder, card = adapters.load_adapter(litemedsam, adapted["output"])
    decoder = peft_decoder.merge_and_unload().eval()
    own = litemedsam.mask_decoder, litemedsam.prompt_encoder
    added = ("box_mode", "dice_crossed", "dice_tracked")
    tracked = {key: value for key, value in card["tracking_choice"].items() if key not in added}
    choice = choose_box_mode(litemedsam, decoder, prompt_encoder, info, cases, config, tracked, None)
    assert (litemedsam.mask_decoder, litemedsam.prompt_encoder) == own
    px = str(tracked["min_margin_px"])
    assert choice["dice_tracked"] == (tracked["dice"] if tracked["smooth_mm"] else tracked["dice_unsmoothed"])[px]
    assert choice["box_mode"] == ("crossed" if choice["dice_crossed"] > choice["dice_tracked"] else "tracked")
    segmenter = Segmenter(litemedsam, window_margin=4)
    segmenter.set_adapter(adapted["output"])
    try:
        scores = []
        for case in cases:
            image, label = load_case(info.case(case))
            mask = np.asarray(label.array) == 1
            result = segmenter.segment(image, roi_box(mask, VALIDATION_ROI_MARGIN), box_mode="crossed")
            scores.append(dice_score(result.mask > 0, mask))
    finally:
        segmenter.set_adapter(None)
    assert choice["dice_crossed"] == pytest.approx(float(np.mean(scores)), abs=1e-6)
    assert choice["dice_crossed"] == pytest.approx(card["tracking_choice"]["dice_crossed"], abs=0.02)  # training's
    for tracked_dice, expected in ((1.0, "tracked"), (0.0, "crossed")):
        scripted = dict(tracked, dice={px: tracked_dice for px in tracked["dice"]},
                        dice_unsmoothed={px: tracked_dice for px in tracked["dice"]})
        # the embeddings training kept (as training weighs them): only the rule is asked here
        chosen = choose_box_mode(litemedsam, decoder, prompt_encoder, info, cases, config, scripted,
                                 cache_dir_for(volumes))
        assert chosen["box_mode"] == expected
    with pytest.raises(Cancelled):
        choose_box_mode(litemedsam, decoder, prompt_encoder, info, cases, config, tracked, None, cancel=lambda: True)
    assert (litemedsam.mask_decoder, litemedsam.prompt_encoder) == own


@pytest.mark.parametrize("named", [None, "tracked", "crossed"])
def test_auto_runs_the_box_mode_the_adapters_card_names(litemedsam, volumes, adapted, tmp_path, monkeypatch, named):
    """tracked where the card names none (adapters trained before the choice)."""
    from SAMFineTuneLib import crossing

    peft_decoder, prompt_encoder, card = adapters.load_adapter(litemedsam, adapted["output"])
    card["inference"].pop("box_mode", None)
    if named:
        card["inference"]["box_mode"] = named
    folder = adapters.save_adapter(str(tmp_path / "adapter"), peft_decoder, card, prompt_encoder)
    modes = []
    for module, name, mode in ((crossing, "crossed_mode", "crossed"), (tracking, "tracked_mode", "tracked")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *args, _real=real, _mode=mode: modes.append(_mode) or _real(*args))
    image, _ = load_case(read_dataset(volumes).case("phantom100"))
    segmenter = Segmenter(litemedsam)
    segmenter.set_adapter(folder)
    try:
        adapted = segmenter.segment(image, (10, 10, 0, 50, 50, 5))
    finally:
        segmenter.set_adapter(None)
    base = segmenter.segment(image, (10, 10, 0, 50, 50, 5))
    assert modes == [named or "tracked", "crossed"]
    assert (adapted.stats["box_mode"], base.stats["box_mode"]) == (named or "tracked", "crossed")  # what ran


@pytest.mark.parametrize("named", ["fixed", "auto", 3])
def test_a_card_naming_a_box_mode_training_does_not_choose_is_refused_and_the_adapter_in_use_stays(
        litemedsam, adapted, tmp_path, named):
    peft_decoder, prompt_encoder, card = adapters.load_adapter(litemedsam, adapted["output"])
    card["inference"]["box_mode"] = named
    folder = adapters.save_adapter(str(tmp_path / "adapter"), peft_decoder, card, prompt_encoder)
    segmenter = Segmenter(litemedsam)
    segmenter.set_adapter(adapted["output"])
    with pytest.raises(ValueError, match=f"adapter {folder}: its model card sets box mode {named!r}"):
        segmenter.set_adapter(folder)
    assert segmenter.adapter == adapted["output"]
    segmenter.set_adapter(None)
