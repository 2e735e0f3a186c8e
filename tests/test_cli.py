"""The command line: workflows, run with a progress bar, PNG files and a contact sheet."""

from __future__ import annotations

import json

from PIL import Image

from embedded_worker.cli import main, parse_param, typed_params

WORKFLOW = {"parameters": [{"name": "prompt", "type": "string"}, {"name": "steps", "type": "integer"},
                           {"name": "seed", "type": "integer"}]}


def test_param_values_are_json_when_they_can_be_and_text_parameters_stay_text():
    params = [parse_param(text) for text in ("steps=4", "prompt=a red fox", "seed=null")]
    assert typed_params(WORKFLOW, params) == {"steps": 4, "prompt": "a red fox", "seed": None}
    assert typed_params(WORKFLOW, [parse_param("prompt=1984")]) == {"prompt": "1984"}


def test_a_bad_config_or_an_unwritable_out_is_one_line_not_a_traceback(model_cache, tmp_path, capsys):
    assert main(["--config", '{"device": "warp9"}', "workflows"]) == 2
    err = capsys.readouterr().err
    assert "error (invalid_request): invalid worker configuration" in err and "Traceback" not in err
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    config = json.dumps({"model_cache_dir": str(model_cache), "state_path": ":memory:"})
    assert main(["--config", config, "run", "img-generation-basic", "--param", "steps=2",
                 "--param", "model=builtin:tiny-sd", "--out", str(blocked / "out")]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err


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
