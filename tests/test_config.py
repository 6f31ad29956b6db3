"""Every gin file parses; every user mistake gets one clear error before compute."""

import pytest
import torch

from harness import config, models
from harness.distributed import DistInfo
from harness.errors import ConfigError
from harness.plan import differing_bindings, validate
from harness.planner import plan_run
from harness.run import main
from tests.conftest import REPO

GIN_FILES = sorted(str(p.relative_to(REPO)) for p in (REPO / "configs").rglob("*.gin"))


def with_includes(path):
    """The text of a gin file and of every file it includes."""
    return "\n".join([path.read_text(), *(with_includes(p) for p in config._includes(path))])


@pytest.mark.parametrize("path", GIN_FILES)
def test_every_gin_file_parses_and_resolves(path, tiny_data):
    if "%gin.REQUIRED" in with_includes(REPO / path):  # e.g. the GPU config needs DATA
        with pytest.raises(ConfigError, match="requires DATA"):
            config.parse([REPO / path])
        config.parse([REPO / path], [f"DATA='{tiny_data}'"])
    else:
        config.parse([REPO / path])
    spec = config.resolve()
    models.model_config(spec.run.model)
    import methods

    methods.method_class(spec.run.method)


def test_parsing_needs_no_prior_imports():
    """config.parse alone must know every configurable (a fresh interpreter proves it)."""
    import subprocess
    import sys

    code = "from harness import config; config.parse(['configs/base.gin']); config.resolve()"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-1500:]


def test_macros_are_overridable_from_the_command_line():
    config.parse([REPO / "configs/smoke.gin"], ["METHOD='clip'", "BATCH_SIZE=48", "SEED=7"])
    spec = config.resolve()
    assert (spec.train.batch_size, spec.train.seed, spec.run.method) == (48, 7, "clip")


def test_derived_budget_is_computed_in_code():
    config.parse(
        [REPO / "configs/base.gin"],
        ["BATCH_SIZE=256", "TRAIN_SAMPLES=1000", "TrainConfig.lr_rule='linear'"],
    )
    train = config.resolve().train
    assert train.total_steps == 4  # ceil(1000 / 256)
    assert train.scaled_lr == pytest.approx(1e-3 * 256 / 64)


def run_main(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    return exit_info.value.code, capsys.readouterr().err


def test_missing_config_file(capsys):
    code, err = run_main(capsys, "configs/nope.gin")
    assert code == 2 and "config file not found: configs/nope.gin" in err


def test_malformed_gin_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "bad.gin"
    bad.write_text("include 'configs/base.gin'\nTrainConfig.lr = [1e-3,\nTrainConfig.seed = 1\n")
    code, err = run_main(capsys, str(bad))
    assert code == 2 and str(bad) in err and "line 3" in err and "malformed" in err


@pytest.mark.parametrize("binding", ["METHOD=clipp", "DataConfig.num_workers=two"])
def test_an_unquoted_string_binding_says_to_quote_it(binding, capsys):
    """The shell eats the quotes of --gin_param METHOD='clip'; say so, not what Python's
    literal parser says (an AST node and its address)."""
    code, err = run_main(capsys, "configs/smoke.gin", "--gin_param", binding)
    name, word = binding.split("=")
    assert code == 2 and f"{name}='{word}'" in err and "needs quotes" in err
    assert "object at 0x" not in err


def test_unclosed_bracket_names_file(tmp_path, capsys):
    bad = tmp_path / "eof.gin"
    bad.write_text("TrainConfig.lr = (1e-3,\n")
    code, err = run_main(capsys, str(bad))
    assert code == 2 and str(bad) in err


def test_unknown_binding_names_file_and_line(tmp_path, capsys):
    bad = tmp_path / "typo.gin"
    bad.write_text("include 'configs/base.gin'\nTrainConfig.batchsize = 32\n")
    code, err = run_main(capsys, str(bad))
    assert code == 2 and "batchsize" in err and "line 2" in err and str(bad) in err


def test_a_misspelt_macro_is_refused(capsys):
    code, err = run_main(capsys, "configs/smoke.gin", "--gin_param", "SEEDS=1")
    assert code == 2 and "macro SEEDS is bound but nothing uses it" in err and "SEED" in err


def test_a_probe_fitted_on_the_test_split_is_refused(capsys):
    code, err = run_main(
        capsys, "configs/smoke.gin", "--gin_param", "EvalConfig.probe_split='test'"
    )
    assert code == 2 and "EvalConfig.probe_split='test' is the evaluation split" in err


def test_unknown_method_lists_registered(capsys):
    code, err = run_main(capsys, "configs/smoke.gin", "--gin_param", "METHOD='clipp'")
    assert code == 2 and "unknown method 'clipp'" in err and "clip" in err


def test_unknown_model_is_named(capsys):
    code, err = run_main(capsys, "configs/smoke.gin", "--gin_param", "MODEL='ViT-Q-99'")
    assert code == 2 and "unknown model 'ViT-Q-99'" in err


def test_missing_data_path(capsys, tmp_path):
    code, err = run_main(capsys, "configs/smoke.gin", "--gin_param", f"DATA='{tmp_path}/none'")
    assert code == 2 and "manifest not found" in err and str(tmp_path) in err


def test_bad_value_is_named(capsys):
    code, err = run_main(capsys, "configs/smoke.gin", "--gin_param", "TrainConfig.lr_rule='cubic'")
    assert code == 2 and "lr_rule='cubic'" in err


def test_batch_not_divisible_by_processes(tiny_data, tmp_path):
    cell = plan_run(
        [REPO / "configs/smoke.gin"], [f"DATA='{tiny_data}'", "BATCH_SIZE=33"], out=tmp_path / "r"
    )
    fake = DistInfo(rank=0, world_size=2, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="not divisible by the number of processes"):
        validate([cell], fake)


def test_batch_larger_than_dataset(tiny_data, tmp_path):
    cell = plan_run(
        [REPO / "configs/smoke.gin"], [f"DATA='{tiny_data}'", "BATCH_SIZE=512"], out=tmp_path / "r"
    )
    fake = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="larger than the training split"):
        validate([cell], fake)


def test_config_hash_changes_with_bindings():
    config.parse([REPO / "configs/smoke.gin"], ["SEED=1"])
    a = config.config_hash()
    config.parse([REPO / "configs/smoke.gin"], ["SEED=2"])
    assert a != config.config_hash()


def test_the_sweep_layout_is_neither_hashed_nor_compared_even_over_several_lines():
    smoke = [REPO / "configs/smoke.gin"]
    small = "Grid.axes = {'SEED': [0]}"
    large = (
        "Grid.axes = {'METHOD': ['clip', 'superclip', 'superclass', 'neuclip', 'siclip'], "
        "'BATCH_SIZE': [32, 64, 128, 256, 512], 'SEED': [0, 1, 2]}"
    )
    config.parse(smoke, [small])
    saved, a = config.full_config(), config.config_hash()
    config.parse(smoke, [large, "Grid.report = False"])
    assert "\n    " in config.full_config()  # gin writes this axes dict over several lines
    assert config.config_hash() == a
    assert differing_bindings(saved, config.full_config()) == []
    config.parse(smoke, [large, "SEED = 5"])
    assert config.config_hash() != a
    assert differing_bindings(saved, config.full_config()) == ["- SEED = 0", "+ SEED = 5"]
