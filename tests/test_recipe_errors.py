"""`sharedctx train` with a bad recipe (issue 24): one line naming the file and the field, exit code 2, never a
traceback. Each case here was a traceback (exit 1) or a message naming neither file nor field before."""

from __future__ import annotations

import pytest

from sharedctx.cli import main
from sharedctx.errors import RecipeError
from sharedctx.training.recipe import TrainConfig, load_recipe


def run(capsys, *argv: str) -> str:
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sharedctx: error: ") and "Traceback" not in err
    return err


@pytest.mark.parametrize("body, field", [
    ("context_chunks = 3\n", "context_chunks"),
    ('steps = "ten"\n', "steps"),
    ("steps = -5\n", "steps"),
    ("log_every = 0\n", "log_every"),
    ("window = [64, 32, 16]\n", "window"),
    ("tasks = { lm = \"much\" }\n", "tasks"),
    ("progress = 3\n", "progress"),
])
def test_wrong_values_name_the_file_and_the_field(tmp_path, capsys, body, field):
    recipe = tmp_path / "r.toml"
    recipe.write_text(body)
    err = run(capsys, "--config", str(recipe))
    assert str(recipe) in err and f"TrainConfig.{field}" in err


def test_files_that_are_no_recipe(tmp_path, capsys):
    assert "does not exist" in run(capsys, "--config", str(tmp_path / "missing.toml"))
    assert "is a directory" in run(capsys, "--config", str(tmp_path))
    bad = tmp_path / "bad.toml"
    bad.write_text("steps = = 3\n")
    err = run(capsys, "--config", str(bad))
    assert str(bad) in err and "not valid TOML" in err and "line 1" in err
    broken = tmp_path / "bad.json"
    broken.write_text("{\"steps\": ")
    assert "not valid JSON" in run(capsys, "--config", str(broken))
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    assert "must hold a table" in run(capsys, "--config", str(listed))


def test_yaml_syntax_errors(tmp_path, capsys):
    pytest.importorskip("yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1, 2\nwindow: 3\n")
    err = run(capsys, "--config", str(bad))
    assert str(bad) in err and "not valid YAML" in err


def test_eval_every_below_zero_and_missing_sources(tmp_path, capsys):
    recipe = tmp_path / "r.toml"
    recipe.write_text(f'data = "{tmp_path / "none"}"\nsources = ["{tmp_path / "no-corpus"}"]\n')
    err = run(capsys, "--config", str(recipe), "--eval-every", "-1")
    assert "TrainConfig.eval_every must be >= 0" in err and "eval_text" not in err
    err = run(capsys, "--config", str(recipe))  # before loading any model
    assert str(recipe) in err and "no-corpus" in err and "do not exist" in err and "--sources" in err


def test_train_config_checks_types_itself():
    with pytest.raises(RecipeError, match="TrainConfig.steps must be an integer"):
        TrainConfig(steps=2.5)
    with pytest.raises(ValueError, match="TrainConfig.context_chunks"):  # still a ValueError for code that catches it
        TrainConfig(context_chunks=[1, 2, 3])
    assert TrainConfig(window=[64, 128], lr=1, max_time_s=3).window_range == (64, 128)  # ints where floats go are fine


def test_shipped_recipes_still_load():
    from pathlib import Path

    for recipe in sorted((Path(__file__).parents[1] / "recipes").glob("*.toml")):
        load_recipe(recipe)
