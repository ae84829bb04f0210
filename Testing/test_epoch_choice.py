"""Which epoch's adapter a run keeps: of the epoch the validation Dice kept and the last, the one
that tracks the validation cases better from one ROI, unless it harms a case
(training/epoch_choice.py, training/kept_adapter.py)."""
import pytest
import torch

from SAMFineTuneLib import adapters
from SAMFineTuneLib.training import TrainConfig, train

from test_tracking_choice import FAST, volumes  # noqa: F401 (a fixture)

#: What the box-mode choice adds to the tracking choice of the adapter kept (training/box_mode_choice.py).
ADDED = ("box_mode", "dice_crossed", "dice_tracked")


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
    assert card["tracking_choice"] == dict(calls[lifted], **{key: card["tracking_choice"][key]
                                                            for key in ADDED})
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
        assert card["epoch_choice"]["kept"] == 1
        assert card["tracking_choice"] == dict(choices[0], **{key: card["tracking_choice"][key]
                                                              for key in ADDED})
        assert card["scores"]["per_case"] == scored[1]["per_case"]
        assert all(torch.equal(written[key], value) for key, value in saved["best_lora"].items())
        assert any("epoch 1's adapter, which does not, is written instead" in line for line in logs)
        assert kept_text(card).startswith("epoch 1 (epoch 2 lowered validation case")
    else:
        assert "written" not in refused and card["best_epoch"] == 0 and "tracking_choice" not in card
        assert card["inference"]["box_mode"] == "crossed"
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
