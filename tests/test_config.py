import json

import pytest

from mmseg.config import ModelConfig, list_presets, load_preset
from mmseg.modeling.heads import build_head, list_heads


def test_presets_load_and_list():
    assert "tiny-stamp" in list_presets()
    preset = load_preset("tiny-stamp")
    assert preset.model.head_name == "stamp"
    assert preset.train.batch_size > 0


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown preset 'nope'.*tiny-stamp"):
        load_preset("nope")


def test_unknown_key_fails_loudly(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model": {"lm": {"hiden_size": 3}}}))
    with pytest.raises(ValueError, match="hiden_size"):
        load_preset(path)
    path.write_text(json.dumps({"trian": {}}))
    with pytest.raises(ValueError, match="trian"):
        load_preset(path)
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_preset(path)


def test_unknown_head_lists_valid_heads():
    with pytest.raises(ValueError, match="unknown head 'magic'.*stamp"):
        build_head({"name": "magic"}, hidden_size=8, image_size=32, grid_size=(2, 2))
    with pytest.raises(ValueError, match="upsampel"):
        build_head({"name": "stamp", "upsampel": 2}, hidden_size=8, image_size=32, grid_size=(2, 2))
    assert "stamp" in list_heads()


def test_model_config_round_trip():
    config = ModelConfig.from_dict(load_preset("tiny-stamp").model.to_dict())
    assert config == load_preset("tiny-stamp").model


def test_curriculum_phases():
    from mmseg.config import TrainConfig

    cfg = TrainConfig(curriculum=((0.0, ["attribute"]), (0.5, None)))
    assert cfg.types_at(0.0) == ["attribute"] and cfg.types_at(0.49) == ["attribute"] and cfg.types_at(0.5) is None
    assert TrainConfig().types_at(0.3) is None


def test_no_target_fraction_applies_from_its_start():
    from mmseg.config import TrainConfig

    late = TrainConfig(no_target_fraction=0.3, no_target_from=0.7)
    assert late.no_target_fraction_at(0.0) is None and late.no_target_fraction_at(0.69) is None
    assert late.no_target_fraction_at(0.7) == 0.3 and late.no_target_fraction_at(1.0) == 0.3
    assert TrainConfig(no_target_fraction=0.2).no_target_fraction_at(0.0) == 0.2  # from the start by default
    assert TrainConfig().no_target_fraction_at(0.9) is None


def test_type_weights_are_checked():
    from mmseg.config import TrainConfig

    assert load_preset("tiny-stamp", ['train.type_weights={"relational": 2}']).train.type_weights == {"relational": 2}
    for bad in ([1.0], {"relational": -1}, {"relational": "x"}, {"relational": True}):
        with pytest.raises(ValueError, match="type_weights"):
            TrainConfig(type_weights=bad)


def test_overrides_set_nested_values_parsed_as_json():
    preset = load_preset("tiny-stamp", ["train.batch_size=8", "train.max_minutes=null", "model.head.upsample=2",
                                        "model.image_attention=causal", "train.curriculum=[]"])
    assert preset.train.batch_size == 8 and preset.train.max_minutes is None and preset.train.curriculum == []
    assert preset.model.head["upsample"] == 2 and preset.model.image_attention == "causal"
    assert load_preset("tiny-stamp").train.batch_size != 8  # the shipped preset is untouched


@pytest.mark.parametrize("override, message", [
    ("train.batch_size", "expected SECTION.KEY=VALUE"),
    ("batch_size=8", "expected SECTION.KEY=VALUE"),
    ("optim.lr=1", "section must be 'model' or 'train'"),
    ("train.batch_sise=8", "batch_sise"),
    ("model.lm.hidden_size.x=1", "is a value, not a section"),
    ("train.num_workers=two", "num_workers: expected int, got 'two'"),
    ('train.batch_size="8"', "batch_size: expected int"),
    ("train.seed=1e3", "seed: expected int, got 1000.0"),
    ("train.describe_targets=1", "describe_targets: expected bool"),
    ("train.lr=NaN", "NaN"),
    ("train.num_workers=-2", "num_workers must be >= 0"),
    ("train.no_target_from=1.5", "no_target_from must be in"),
    ("train.decay_from=1.0", "decay_from must be in"),
    ("train.decision_weight=0", "decision_weight must be > 0"),
    ("train.text_weight=-1", "text_weight must be > 0"),
    ("model.lm.hidden_size=true", "hidden_size: expected int"),
])
def test_bad_overrides_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_preset("tiny-stamp", [override])


def test_saved_train_settings_read_what_training_wrote(tmp_path):
    """The settings a checkpoint was trained with (which form its answers take); {} for a folder without them,
    a clear error for a file that is not the one training writes."""
    from mmseg.config import TRAIN_CONFIG_FILE, saved_train_settings

    assert saved_train_settings(tmp_path) == {}
    (tmp_path / TRAIN_CONFIG_FILE).write_text(json.dumps({"preset": "tiny-himtok", "train": {"reason_relations": True}}))
    assert saved_train_settings(tmp_path) == {"reason_relations": True}
    # the answer form: what was saved, the fallback's for what was not
    from mmseg.config import TrainConfig, trained_answer_form

    assert trained_answer_form(tmp_path) == (True, True)
    assert trained_answer_form(tmp_path.parent, TrainConfig(describe_targets=False)) == (False, False)
    assert trained_answer_form(None) == (True, False)
    (tmp_path / TRAIN_CONFIG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="train_config.json is not valid JSON"):
        saved_train_settings(tmp_path)
