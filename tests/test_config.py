"""Run configuration: bad keys and values are named, files and overrides compose."""

import pytest

from shared_models.config import ConfigError, RunConfig, load_config_file


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown config key 'num-server-round'.*did you mean 'num-server-rounds'"):
        RunConfig.from_mapping({"num-server-round": 3})


@pytest.mark.parametrize(
    "key,value,match",
    [("task", "mood", "'task'"), ("num-server-rounds", 0, "'num-server-rounds'"),
     ("fraction-train", 1.5, "'fraction-train'"), ("lr", "fast", "'lr'"), ("partition", "random", "'partition'"),
     # a misspelt class would silently turn its clips into unlabelled ones
     ("emotions", "anger,Happiness", "'emotions'.*'Happiness'"), ("emotions", "anger,happy", "'happy'.*known"),
     ("emotions", "anger,anger", "anger twice"), ("seed", -1, "'seed'"), ("model", "egemaps_mlp", "'model'")],
)
def test_bad_value_names_the_key(key, value, match):
    with pytest.raises(ConfigError, match=match):
        RunConfig.from_mapping({key: value})


def test_fold_must_be_below_folds():
    with pytest.raises(ConfigError, match="'fold'"):
        RunConfig(folds=3, fold=3)


def test_int_is_accepted_for_float_and_round_trips():
    cfg = RunConfig.from_mapping({"lr": 1, "num_server_rounds": 4})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    again = RunConfig()
    again.load_state_dict(cfg.state_dict())
    assert again == cfg


def test_experiment_file_and_bad_key_in_file(tmp_path):
    good = tmp_path / "exp.toml"
    good.write_text('model = "logmel-crnn"\nnum-server-rounds = 7\n')
    cfg = RunConfig.from_mapping(load_config_file(good))
    assert (cfg.model, cfg.num_server_rounds) == ("logmel-crnn", 7)
    bad = tmp_path / "bad.toml"
    bad.write_text("[run]\nlocal-epoch = 2\n")
    with pytest.raises(ConfigError, match="local-epoch"):
        load_config_file(bad)


def test_keys_match_the_flower_app_config():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert set(pyproject["tool"]["flwr"]["app"]["config"]) == set(RunConfig.keys())
    RunConfig.from_mapping(pyproject["tool"]["flwr"]["app"]["config"])


def test_batch_size_zero_means_the_models_own():
    from shared_models.config import MODEL_BATCH_SIZES

    assert RunConfig(model="logmel-crnn").local_batch_size == 8 == MODEL_BATCH_SIZES["wave-cnn-gru"]
    assert RunConfig(model="egemaps-mlp").local_batch_size == 32
    # resolved when used, so that changing the model changes the batch too
    assert RunConfig(model="egemaps-mlp").replace(model="logmel-crnn").local_batch_size == 8
    assert RunConfig(model="logmel-crnn", batch_size=16).local_batch_size == 16
    with pytest.raises(ConfigError, match="'batch-size'"):
        RunConfig(batch_size=-1)


def test_the_config_knows_every_model_of_the_registry():
    from shared_models.config import MODEL_NAMES
    from shared_models.models import MODELS

    assert set(MODEL_NAMES) == set(MODELS)


def test_command_line_options_override_the_file_and_set_overrides_both(tone_manifest, tmp_path):
    """SpeechBrain-style precedence: experiment file < the command's options < ``--set``."""
    import json

    from typer.testing import CliRunner

    from fedaffect.cli import app as cli

    exp = tmp_path / "exp.toml"
    exp.write_text('num-server-rounds = 7\nlocal-epochs = 3\nlr = 0.005\n')

    def run(*args):
        out = tmp_path / f"summary-{len(list(tmp_path.glob('summary-*')))}.json"
        res = CliRunner().invoke(cli, ["simulate", "--manifest", str(tone_manifest), "--config", str(exp),
                                       "--folds", "1", "--no-report", "--run-dir", str(tmp_path / "runs"),
                                       "--summary-json", str(out), "--set", f"cache-dir='{tmp_path / 'c'}'", *args])
        assert res.exit_code == 0, res.output
        return json.loads(out.read_text())["config"]

    cfg = run("--rounds", "2", "--set", "num-server-rounds=1")
    assert cfg["num-server-rounds"] == 1 and cfg["local-epochs"] == 3 and cfg["lr"] == 0.005
    cfg = run("--rounds", "1")
    assert cfg["num-server-rounds"] == 1 and cfg["local-epochs"] == 3
    res = CliRunner().invoke(cli, ["simulate", "--manifest", str(tone_manifest), "--set", "rounds"])
    assert res.exit_code == 2 and "key=value" in res.output


def test_an_option_name_used_as_a_key_points_to_its_key_and_the_source_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'rounds' \(did you mean 'num-server-rounds'\?\)$"):
        RunConfig.from_mapping({"rounds": 3})
    exp = tmp_path / "exp.toml"
    exp.write_text("local_epoch = 2\n")
    with pytest.raises(ConfigError, match=rf"^{exp}: unknown config key 'local_epoch' \(did you mean 'local-epochs'"):
        load_config_file(exp)
    from fedaffect.cli import _config_values

    with pytest.raises(ConfigError, match=r"^--set alpha=0.1: unknown config key 'alpha' \(did you mean 'dirichlet-alpha'"):
        _config_values(None, {}, ["alpha=0.1"])
    with pytest.raises(ConfigError, match="known keys: .*num-server-rounds"):  # nothing close: the list
        RunConfig.from_mapping({"zzz": 1})


def test_options_the_partition_ignores_are_refused_on_the_command_line_only(tone_manifest, tmp_path):
    """--alpha with a speaker partition is a mistake; the same key in an experiment file that
    also serves a Dirichlet run is not."""
    from typer.testing import CliRunner

    from fedaffect.cli import app as cli

    base = ["simulate", "--manifest", str(tone_manifest), "--folds", "1", "--rounds", "1", "--no-report",
            "--run-dir", str(tmp_path / "runs"), "--set", f"cache-dir='{tmp_path / 'c'}'"]
    for extra in (["--alpha", "0.3"], ["--set", "dirichlet_alpha=0.3"], ["--num-devices", "3"]):
        res = CliRunner().invoke(cli, base + extra)
        assert res.exit_code == 2 and "applies to" in res.output, (extra, res.output)
    exp = tmp_path / "exp.toml"
    exp.write_text("dirichlet-alpha = 0.3\nnum-devices = 3\n")
    res = CliRunner().invoke(cli, base + ["--config", str(exp), "--partition", "speaker"])
    assert res.exit_code == 0, res.output


def test_a_number_is_accepted_for_a_text_key():
    """One simulated rater: ``--set rater-reliability=0.9`` parses as a number."""
    cfg = RunConfig.from_mapping({"rater-reliability": 0.9, "run-name": 7})
    assert cfg.rater_reliability == "0.9" and cfg.run_name == "7"
    with pytest.raises(ConfigError, match="rater-reliability"):
        RunConfig.from_mapping({"rater-reliability": 1.5})


def test_a_key_written_with_underscores_or_hyphens_is_one_key(tmp_path):
    """A file's ``local_epochs`` and ``--set local-epochs`` are the same key: the later wins,
    and commands (train's resume check) see hyphenated keys only."""
    from fedaffect.cli import _config_values

    exp = tmp_path / "exp.toml"
    exp.write_text("local_epochs = 3\nround_timeout = 120\n")
    values = _config_values(exp, {"num-server-rounds": 2}, ["local-epochs=4", "run_name=x"])
    assert values == {"local-epochs": 4, "round-timeout": 120, "num-server-rounds": 2, "run-name": "x"}
    assert RunConfig.typed("round_timeout", 99) == 99.0 and isinstance(RunConfig.typed("round-timeout", 99), float)
    assert RunConfig.typed("run-name", 7) == "7" and RunConfig.typed("model", "x") == "x"
    with pytest.raises(ConfigError, match="did you mean 'round-timeout'"):
        RunConfig.typed("round-timout", 1)
