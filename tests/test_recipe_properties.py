"""Property tests of recipe mutations: a mutated packaged recipe either gives a valid run plan or fails with a
clear error (exit 2, an ``error:`` line naming the key, path or problem, no traceback).

Parsing (``--print_config``) runs over every packaged recipe; building and a ``fast_dev_run`` run the quickstart
on a tiny IDX dataset written once for the module.
"""

from __future__ import annotations

import contextlib
import copy
import io
from importlib import resources
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

import visionzoo
from visionzoo.cli import main

from tiny_datasets import write_idx

RECIPES = visionzoo.list_recipes()
QUICK_RUN = ["--trainer.fast_dev_run=true", "--trainer.accelerator=cpu", "--trainer.devices=1",
             "--trainer.enable_progress_bar=false", "--trainer.logger=false"]  # fmt: skip


def _recipe(name: str) -> dict:
    with resources.as_file(resources.files("visionzoo.recipes") / name) as path:
        return yaml.safe_load(Path(path).read_text())


def _leaf_paths(node, prefix=()) -> list[tuple]:
    """Key paths of every leaf value under ``model``, ``data`` and ``trainer`` (``class_path`` left alone)."""
    if isinstance(node, dict):
        return [p for key, value in node.items() if key != "class_path" for p in _leaf_paths(value, (*prefix, key))]
    return [prefix] if len(prefix) > 1 else []


def _parent(config: dict, path: tuple) -> dict:
    for key in path[:-1]:
        config = config[key]
    return config


def _run(config: dict, folder: Path, *args: str) -> tuple[int, str]:
    """``visionzoo fit --config <config> ARGS``: exit code and stderr."""
    path = folder / "mutated.yaml"
    path.write_text(yaml.safe_dump(config))
    err, out = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main(["fit", "--config", str(path), *args])
    except SystemExit as exit_:  # jsonargparse exits on parse errors and after --print_config
        code = exit_.code
    return code, err.getvalue()


def _assert_valid_or_clear(code: int, err: str, *names: str) -> None:
    """Exit 0, or exit 2 with one ``error:`` line naming one of ``names`` (when given), then only ``tip:`` lines:
    no traceback, no usage dump (warnings may come before)."""
    assert "Traceback" not in err, err
    if code == 0:
        return
    assert code == 2, f"exit {code}: {err}"
    lines = err.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error:")]
    assert len(starts) == 1, f"expected one 'error:' line in {err!r}"
    assert all(line.startswith("tip:") for line in lines[starts[0] + 1 :]), f"more than one line of error: {err!r}"
    assert "usage:" not in err, err
    assert not names or any(name in lines[starts[0]] for name in names), f"{names} not named in {lines[starts[0]]!r}"


def _mutate(config: dict, path: tuple, mutation: str) -> tuple[str, ...]:
    """Apply ``mutation`` at ``path`` in place; the names an error about it should contain (a dropped key falls
    back to its default, which may fail for another reason, e.g. the default data format against IDX files)."""
    parent, key = _parent(config, path), path[-1]
    if mutation == "drop":
        del parent[key]
        return ()
    if mutation == "rename":
        parent[f"{key}_unknown"] = parent.pop(key)
        return (f"{key}_unknown",)
    value = parent[key]  # retype: a word where a number or flag was, a list where a scalar was, and the reverse
    parent[key] = "not-a-number" if isinstance(value, bool | int | float) else ([value] if value else 7)
    return (key,)


MUTATIONS = ("drop", "rename", "retype")


@pytest.mark.parametrize("recipe", RECIPES)
@settings(max_examples=3, deadline=None, derandomize=True)
@given(data=st.data())
def test_parsing_a_mutated_recipe_gives_a_plan_or_names_the_key(recipe, data, tmp_path_factory):
    """Drop a key, rename one to an unknown name, or give one a value of another type."""
    config = _recipe(recipe)
    path = data.draw(st.sampled_from(_leaf_paths(config)), label="key")
    named = _mutate(config, path, data.draw(st.sampled_from(MUTATIONS), label="mutation"))
    code, err = _run(config, tmp_path_factory.mktemp("parse"), "--print_config")
    _assert_valid_or_clear(code, err, *named)


@pytest.fixture(scope="module")
def tiny_quickstart(tmp_path_factory) -> tuple[dict, Path]:
    """The quickstart recipe on a 40-image IDX dataset (and an empty folder beside it)."""
    folder = tmp_path_factory.mktemp("quickstart")
    config = _recipe("classification/quickstart.yaml")
    config["data"]["init_args"].update(root=str(write_idx(folder / "idx", train=40, test=8)), batch_size=4)
    config["trainer"]["default_root_dir"] = str(folder / "run")
    (folder / "empty").mkdir()
    return config, folder


# (key path, bad values, words the error must contain)
BUILD_MUTATIONS = {
    "batch_size": (("data", "init_args", "batch_size"), [0, -3], ("batch_size",)),
    "image_size": (("data", "init_args", "image_size"), [0, -32], ("image_size",)),
    "num_workers": (("data", "init_args", "num_workers"), [-1], ("num_workers",)),
    "val_fraction": (("data", "init_args", "val_fraction"), [-0.5, 1.5, 0.0], ("val_fraction",)),  # no val on disk
    "std": (("data", "init_args", "std"), [[0.0, 0.0, 0.0], [-1.0, 1.0, 1.0]], ("std",)),
    "lr": (("model", "init_args", "lr"), [0.0, -0.1], ("lr",)),
    "weight_decay": (("model", "init_args", "weight_decay"), [-1.0], ("weight_decay",)),
    "max_epochs": (("trainer", "max_epochs"), [-2], ("max_epochs",)),
    "missing root": (("data", "init_args", "root"), ["{folder}/missing"], ("does not exist", "missing")),
    "empty root": (("data", "init_args", "root"), ["{folder}/empty"], ("not found", "empty")),
    "model name": (("model", "init_args", "model_name"), ["mixvit_nonexistent"], ("mixvit_nonexistent",)),
    # num_classes is linked from the data: a recipe's own value never reaches the model
    "num_classes": (("model", "init_args", "num_classes"), [3, 1000], ()),
}


@pytest.mark.parametrize("mutation", list(BUILD_MUTATIONS))
@settings(max_examples=3, deadline=None, derandomize=True)
@given(data=st.data())
def test_building_a_mutated_quickstart_runs_or_says_why(tiny_quickstart, mutation, data):
    base, folder = tiny_quickstart
    path, values, named = BUILD_MUTATIONS[mutation]
    value = data.draw(st.sampled_from(values), label="value")
    config = copy.deepcopy(base)
    _parent(config, path)[path[-1]] = value.format(folder=folder) if isinstance(value, str) else value
    code, err = _run(config, folder, *QUICK_RUN)
    _assert_valid_or_clear(code, err, *named)
    assert code == (0 if mutation == "num_classes" else 2), err


@settings(max_examples=6, deadline=None, derandomize=True)
@given(data=st.data())
def test_building_the_quickstart_with_a_key_mutated_runs_or_says_why(tiny_quickstart, data):
    """The parse mutations carried through to a build and a fast_dev_run (a dropped required key included)."""
    base, folder = tiny_quickstart
    config = copy.deepcopy(base)
    path = data.draw(st.sampled_from(_leaf_paths(config)), label="key")
    named = _mutate(config, path, data.draw(st.sampled_from(MUTATIONS), label="mutation"))
    code, err = _run(config, folder, *QUICK_RUN)
    _assert_valid_or_clear(code, err, *named)
