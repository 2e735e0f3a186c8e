"""WorkerConfig from a dict, a JSON file and the environment; bad configuration is refused clearly."""

from __future__ import annotations

import json

import pytest

from embedded_worker import WorkerConfig
from embedded_worker.config import CONFIG_ENV_VAR
from embedded_worker.diffusion.devices import resolve_devices, resolve_dtype
from embedded_worker.errors import InvalidRequest


def test_defaults_run_on_this_machine():
    config = WorkerConfig()
    assert config.device == "auto" and config.default_model == "builtin:shapes"
    [device] = resolve_devices(config.device)
    assert device.type == "cpu" and str(resolve_dtype(config.dtype, device)) == "torch.float32"


def test_from_dict_file_and_environment(tmp_path, monkeypatch):
    settings = {"device": "cpu", "limits": {"max_steps": 20}, "scheduling": {"max_batch_size": 2}}
    assert WorkerConfig.load(settings).limits.max_steps == 20
    path = tmp_path / "worker.json"
    path.write_text(json.dumps(settings))
    assert WorkerConfig.load(str(path)).scheduling.max_batch_size == 2
    monkeypatch.setenv(CONFIG_ENV_VAR, json.dumps(settings))
    assert WorkerConfig.load().device == "cpu"
    monkeypatch.setenv(CONFIG_ENV_VAR, str(path))
    assert WorkerConfig.load().limits.max_steps == 20


@pytest.mark.parametrize("bad", [
    {"device": "tpu"}, {"dtype": "float8"}, {"limits": {"max_steps": 0}}, {"unknown": 1},
    {"default_model": "not-configured"}, "{broken", "/no/such/file.json", {"compile": {"lanes": 0}},
])
def test_bad_configuration_is_refused_with_the_reason(bad):
    with pytest.raises(InvalidRequest, match="configuration"):
        WorkerConfig.load(bad)


def test_the_worker_passes_a_bad_config_as_an_exception_at_construction_only(model_cache):
    from embedded_worker import ProcessingWorker

    with pytest.raises(InvalidRequest):
        ProcessingWorker({"device": "quantum"})


@pytest.mark.parametrize("bad", [{"board_slots": True}, {"scheduling": {"max_batch_size": True}},
                                 {"retention": {"max_age_hours": float("nan")}}, {"gc_freeze": "yes"},
                                 {"limits": {"max_items": 2.5}}, {"compile": {"lanes": True}}])
def test_config_integers_booleans_and_numbers_are_exactly_that(bad):
    with pytest.raises(InvalidRequest, match="invalid worker configuration"):
        WorkerConfig.load(bad)
