"""The command line: workflows, run with a progress bar, PNG files and a contact sheet."""

from __future__ import annotations

import json

from PIL import Image

from embedded_worker.cli import main, parse_param


def test_param_values_are_json_when_they_can_be():
    assert parse_param("steps=4") == ("steps", 4)
    assert parse_param("prompt=a red fox") == ("prompt", "a red fox")
    assert parse_param("seed=null") == ("seed", None)


def test_workflows_lists_the_builtins(model_cache, capsys):
    assert main(["--config", json.dumps({"model_cache_dir": str(model_cache), "state_path": ":memory:"}), "workflows"]) == 0
    assert "img-generation-basic" in capsys.readouterr().out


def test_run_writes_pngs_and_a_contact_sheet(model_cache, tmp_path, capsys):
    code = main(["--config", json.dumps({"model_cache_dir": str(model_cache), "state_path": ":memory:"}), "run", "img-generation-basic",
                 "--param", "prompt=a red fox", "--param", "num_images=3", "--param", "steps=4",
                 "--param", "seed=9", "--out", str(tmp_path)])
    assert code == 0
    files = sorted(p.name for p in tmp_path.glob("*.png"))
    assert files == ["img-generation-basic-00-seed9.png", "img-generation-basic-01-seed10.png",
                     "img-generation-basic-02-seed11.png", "img-generation-basic-contact-sheet.png"]
    assert Image.open(tmp_path / files[0]).text["prompt"] == "a red fox"
    assert "100%" in capsys.readouterr().err


def test_run_reports_bad_parameters_and_fails(model_cache, tmp_path, capsys):
    code = main(["--config", json.dumps({"model_cache_dir": str(model_cache), "state_path": ":memory:"}), "run", "img-generation-basic",
                 "--param", "steps=9999", "--out", str(tmp_path)])
    assert code == 2 and "parameters.steps" in capsys.readouterr().err
