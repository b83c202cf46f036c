"""Packaging: the mapped namespace, package data and the console script."""

import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest

import visionzoo
from visionzoo.cli import main

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.smoke


@pytest.mark.parametrize("bare", ["kernels", "backbones", "heads", "recipes"])
def test_bare_import_is_refused(bare):
    result = subprocess.run(
        [sys.executable, "-c", f"import {bare}"], cwd=REPO, capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert f"this package is visionzoo.{bare}" in result.stderr


def test_mapped_packages_import_under_the_namespace():
    import visionzoo.backbones
    import visionzoo.heads
    import visionzoo.kernels

    assert visionzoo.kernels.dense_attention is not None
    assert visionzoo.backbones.MixVit.__module__ == "visionzoo.backbones.mixvit"


def test_recipes_ship_as_package_data():
    assert resources.files("visionzoo.recipes").joinpath("README.md").is_file()
    assert all(r.endswith(".yaml") for r in visionzoo.list_recipes())


@pytest.mark.parametrize(
    "what, expected", [("models", "nat_tiny"), ("mixers", "neighborhood"), ("ops", "dense_attention")]
)
def test_list_command(what, expected, capsys):
    assert main(["list", what]) == 0
    assert expected in capsys.readouterr().out.split()


def test_console_script_is_installed():
    script = Path(sys.executable).parent / "visionzoo"
    result = subprocess.run([str(script), "list", "mixers"], capture_output=True, text=True, check=True)
    assert "global" in result.stdout.split()
    result = subprocess.run([str(script), "list", "weights"], capture_output=True, text=True, check=False)
    assert result.returncode == 2 and "invalid choice: 'weights'" in result.stderr
