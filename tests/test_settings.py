"""csr.toml: its tables as pydantic models, written with tomli_w and read back
as written, and the one Preset enum that engine, cli and the store share."""

from __future__ import annotations

import json
import tomllib

import pytest

from csr.cli import vocabulary
from csr.engine import rewards
from csr.engine.errors import CsrError, SettingsError
from csr.engine.search.config import PRESET_SEARCH_DEFAULTS, SearchConfig
from csr.engine.settings import Settings, load_settings
from csr.engine.train.config import TrainConfig, TrainConfigError
from csr.storage import curation


def test_written_settings_read_back_as_written(tmp_path):
    path = tmp_path / "csr.toml"
    written = Settings(
        path=path,
        store_url='sqlite:///a "quoted" \\ path.db',
        model="org/model",
        clip="hf-hub:org/clip",
        clip_pretrained=None,
        models_dir="weights",
        generate={"preset": rewards.Preset.reference_code, "lam": 1, "num_beams": 3},
        train={"learning_rate": 1e-7, "bf16": False, "lora_target": "q_proj,v_proj"},
    )
    written.write()
    raw = tomllib.loads(path.read_text())
    assert "clip_pretrained" not in raw["model"]  # TOML has no null: unset is left out
    assert raw["generate"] == {"preset": "reference-code", "lam": 1, "num_beams": 3}
    assert isinstance(raw["generate"]["lam"], int)
    read = load_settings(path)
    assert (read.store_url, read.model, read.clip, read.models_dir) == (
        'sqlite:///a "quoted" \\ path.db', "org/model", "hf-hub:org/clip", "weights")
    assert read.generate == written.generate and read.train == written.train


@pytest.mark.parametrize(("toml", "message"), [
    ('[store]\nulr = "x.db"\n', "[store] in {path}: unknown setting(s): ulr (known: url)"),
    ("[store]\nurl = 5\n", "[store] in {path}: setting url must be a string, got 5"),
    ('[model]\nbse = "org/m"\n', "[model] in {path}: unknown setting(s): bse (known: base, clip, clip_pretrained)"),
    ("[model]\nclip_pretrained = false\n", "[model] in {path}: setting clip_pretrained must be a string, got False"),
    ("[paths]\nmodels = 'm'\n", "[paths] in {path}: unknown setting(s): models (known: models_dir)"),
    ('store = "x.db"\n', "{path}: [store] must be a table, got 'x.db'"),
    ("[generate]\npreset = 'released'\n",
     "[generate] in {path}: search setting preset must be one of paper, reference-code, got 'released'"),
    ("[train]\nbeta = 0\nepochs = '2'\n",
     "[train] in {path}: training option beta must be > 0, got 0; training option epochs must be an integer, got '2'"),
])
def test_a_bad_table_is_one_line_naming_the_key_and_the_file(tmp_path, toml, message):
    path = tmp_path / "csr.toml"
    path.write_text(toml)
    with pytest.raises(CsrError) as refused:
        load_settings(path)
    assert str(refused.value) == message.format(path=path.resolve())


def test_settings_that_would_not_read_back_are_not_written(tmp_path):
    settings = Settings(path=tmp_path / "csr.toml", train={"epochs": 1.5})
    with pytest.raises(CsrError, match=r"\[train\] in .*epochs must be an integer, got 1.5"):
        settings.write()
    assert not settings.path.exists()


def test_the_recorded_form_of_the_settings_is_unchanged():
    # Iterations and training runs store to_dict() and compare hashes over it:
    # its keys, their order and their JSON types must stay as they were.
    assert json.dumps(SearchConfig(lam=1).to_dict()) == (
        '{"num_token_beams": 5, "num_beam_groups": 5, "diversity_penalty": 3.0, "max_new_tokens": 74, '
        '"max_length": 1024, "num_beams": 5, "preset": "paper", "lam": 1, "select_by": "reward", '
        '"keep_rule": "paper", "degenerate_rules": "csr"}'
    )
    recorded = SearchConfig(preset="reference-code").to_dict()
    assert type(recorded["preset"]) is str and type(recorded["keep_rule"]) is str
    assert json.dumps(TrainConfig(beta=1, bf16=True).to_dict()) == (
        '{"beta": 1, "sft_weight": 0.0, "lora_r": 128, "lora_alpha": 256, "lora_dropout": 0.05, '
        '"lora_target": "language_model", "learning_rate": 1e-07, "projector_learning_rate": 2e-05, '
        '"lr_scheduler": "cosine", "warmup_ratio": 0.03, "epochs": 1, "batch_size": 1, "grad_accum": 1, '
        '"seed": 42, "max_response_tokens": 1024, "too_long": "skip", "unencodable": "skip", "reference": "auto", '
        '"report_to": "none", "logging_steps": 1, "save_steps": 50, "save_total_limit": 2, "bf16": true, '
        '"gradient_checkpointing": true, "forward": "auto", "save_dtype": "float32"}'
    )


def test_tables_are_frozen_and_replace_validates():
    config = TrainConfig()
    with pytest.raises(ValueError):
        config.beta = 0.5
    assert config.replace(beta=0.5).beta == 0.5 and config.beta == 0.1
    with pytest.raises(TrainConfigError, match="lora_target is empty"):
        config.replace(lora_target=" , ")
    with pytest.raises(SettingsError, match="multiple of num_beam_groups"):
        SearchConfig().replace(num_beam_groups=2)


def test_one_preset_enum_for_engine_cli_and_store():
    assert vocabulary.Preset is rewards.Preset
    assert [p.value for p in rewards.Preset] == ["paper", "reference-code"]
    assert set(PRESET_SEARCH_DEFAULTS) == set(rewards.Preset)
    # storage cannot import the engine; its own list must name the same presets
    assert tuple(curation.PRESETS) == tuple(rewards.Preset)
    assert SearchConfig(preset=rewards.Preset.reference_code) == SearchConfig(preset="reference-code")
