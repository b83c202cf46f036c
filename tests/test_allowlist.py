"""Recipes, command-line overrides and checkpoint hyper-parameters cannot make the CLI import code outside the
allowed namespaces: a module that records being imported proves that it never is, for every path a value can
take to an import."""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import jsonargparse
import pytest
import torch
import yaml

from visionzoo.allowlist import check_imports, import_policy, is_allowed
from visionzoo.cli import main

FOREIGN = "foreign_code"
LAMBDA = "lightning.pytorch.callbacks.LambdaCallback"


@pytest.fixture
def foreign(tmp_path, monkeypatch):
    """An importable module outside the allowed namespaces that touches ``imported`` when imported; returns
    a check that it was not."""
    marker = tmp_path / "imported"
    (tmp_path / f"{FOREIGN}.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n\n"
        "from lightning.pytorch import Callback\n\n\nclass Payload(Callback):\n    pass\n\n\n"
        "def hook(*args):\n    pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))

    def never_imported():
        assert not marker.exists() and FOREIGN not in sys.modules, f"{FOREIGN} was imported"

    return never_imported


def quickstart() -> dict:
    with resources.as_file(resources.files("visionzoo.recipes") / "classification/quickstart.yaml") as path:
        return yaml.safe_load(Path(path).read_text())


def _recipe_with_callback(tmp_path: Path, callback: dict) -> list[str]:
    config = quickstart()
    config["trainer"]["callbacks"] = [callback]
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(config))
    return ["fit", "--config", str(path)]


def _quickstart_args(tmp_path: Path) -> list[str]:
    path = tmp_path / "quickstart.yaml"
    path.write_text(yaml.safe_dump(quickstart()))
    return ["fit", "--config", str(path)]


def _checkpoint_naming(tmp_path: Path, class_path: str) -> list[str]:
    """A checkpoint that loads under ``weights_only=True`` and names a foreign task class."""
    path = tmp_path / "foreign.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {"_class_path": class_path, "model_name": "x"}}, path)
    return [*_quickstart_args(tmp_path), f"--ckpt_path={path}"]


HOOK = {"class_path": LAMBDA, "init_args": {"on_fit_start": f"{FOREIGN}.hook"}}
# how the value reaches the CLI -> (arguments, the value and where the refusal says it came from)
PATHS: dict[str, Callable[[Path], list[str]]] = {
    "class_path in a recipe": lambda tmp: _recipe_with_callback(tmp, {"class_path": f"{FOREIGN}.Payload"}),
    "Callable in a recipe's nested init_args": lambda tmp: _recipe_with_callback(tmp, HOOK),
    "--trainer.callbacks+= a class": lambda tmp: [*_quickstart_args(tmp), f"--trainer.callbacks+={FOREIGN}.Payload"],
    "--trainer.callbacks+= inline JSON with a Callable": lambda tmp: [
        *_quickstart_args(tmp),
        f"--trainer.callbacks+={json.dumps(HOOK)}",
    ],
    "--key value, space separated": lambda tmp: [*_quickstart_args(tmp), "--trainer.callbacks", json.dumps([HOOK])],
    "inline --config": lambda tmp: ["fit", "--config", json.dumps({"trainer": {"callbacks": [HOOK]}})],
    "checkpoint hyper_parameters._class_path": lambda tmp: _checkpoint_naming(tmp, f"{FOREIGN}.Task"),
}
EXPECTED = {
    "class_path in a recipe": r"recipe\.yaml: trainer\.callbacks\[0\]\.class_path: 'foreign_code\.Payload'",
    "Callable in a recipe's nested init_args": (
        r"recipe\.yaml: trainer\.callbacks\[0\]\.init_args\.on_fit_start: 'foreign_code\.hook'"
    ),
    "--trainer.callbacks+= a class": r"the command line \(--trainer\.callbacks\+\): trainer\.callbacks: 'foreign_code",
    "--trainer.callbacks+= inline JSON with a Callable": (
        r"the command line \(--trainer\.callbacks\+\): trainer\.callbacks\.init_args\.on_fit_start: 'foreign_code"
    ),
    "--key value, space separated": r"trainer\.callbacks\[0\]\.init_args\.on_fit_start: 'foreign_code\.hook'",
    "inline --config": r"the command line \(--config\): trainer\.callbacks\[0\]\.init_args\.on_fit_start",
    "checkpoint hyper_parameters._class_path": r"--ckpt_path .*foreign\.ckpt: _class_path: 'foreign_code\.Task'",
}


@pytest.mark.parametrize("path", PATHS)
def test_no_value_imports_foreign_code(path, foreign, tmp_path, capsys):
    assert main(PATHS[path](tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert re.search(EXPECTED[path], err), err
    assert "is outside the namespaces a recipe may import" in err and "--allow_any_class_path" in err
    foreign()


@pytest.mark.parametrize(
    "annotation, allowed, elsewhere",
    [(Callable, torch.flatten, json.dumps), (type, torch.nn.Identity, json.JSONDecoder)],
)
def test_jsonargparse_policy_refuses_what_the_data_check_cannot_see(annotation, allowed, elsewhere, foreign):
    """The second guard alone: jsonargparse's import-path policy refuses a value typed ``Callable`` or
    ``type`` before importing it, and is lifted again after the run."""
    parser = jsonargparse.ArgumentParser(exit_on_error=False)
    parser.add_argument("--hook", type=annotation)
    with import_policy(), pytest.raises(jsonargparse.ArgumentError, match=r"Importing 'foreign_code\.hook' is not"):
        parser.parse_args([f"--hook={FOREIGN}.hook"])
    foreign()
    with import_policy():
        assert parser.parse_args([f"--hook={allowed.__module__}.{allowed.__name__}"]).hook is allowed
    assert parser.parse_args([f"--hook={elsewhere.__module__}.{elsewhere.__name__}"]).hook is elsewhere


def test_allowed_namespaces_and_the_modules_denied_within_them():
    assert is_allowed("lightning.pytorch.callbacks.LambdaCallback") and is_allowed("torch.nn.Identity")
    assert not is_allowed("torch.hub.load") and not is_allowed("torch.utils.cpp_extension.load_inline")
    assert not is_allowed("torchx.Thing") and not is_allowed("os.system")
    check_imports({"root": "data/train.csv", "name": "train.csv", "lr": "1e-3"}, "recipe")  # not module paths
    with pytest.raises(ValueError, match=r"recipe: optimizer: 'torch\.hub\.load'"):
        check_imports({"optimizer": "torch.hub.load"}, "recipe")


def test_allow_any_class_path_lets_a_trusted_recipe_through(tmp_path, foreign, capsys):
    args = _recipe_with_callback(tmp_path, {"class_path": f"{FOREIGN}.Payload"})
    with pytest.raises(SystemExit) as printed:
        main([*args, "--allow_any_class_path", "--print_config"])
    assert printed.value.code == 0 and f"{FOREIGN}.Payload" in capsys.readouterr().out
