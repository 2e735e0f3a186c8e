"""A transformer model folder that cannot run is refused clearly, at planning or at load, and nothing else
is affected: the session already running completes, and the next request on a good model too."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from embedded_worker.diffusion.tiny_model import ensure_tiny_model

from .conftest import session_status, wait_for


def drop(component: str):
    return lambda folder: shutil.rmtree(folder / component)


def config(component: str, **changes):
    def change(folder: Path) -> None:
        path = folder / component / "config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    return change


BREAKAGES = {  # name -> (how the folder is broken, what the error says)
    "missing-text-encoder": (drop("text_encoder_2"), "component 'text_encoder_2' (T5EncoderModel)"),
    "missing-transformer": (drop("transformer"), "component 'transformer'"),
    "wider-than-weights": (config("transformer", num_attention_heads=4), "size mismatch"),
    "deeper-than-weights": (config("transformer", num_layers=3), "'transformer' has no weights for"),
    "vae-latents-mismatch": (config("vae", latent_channels=8), "size mismatch"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_flux_folder_fails_clearly_and_other_work_runs_on(make_worker, model_cache, tmp_path, breakage):
    break_folder, says = BREAKAGES[breakage]
    folder = tmp_path / breakage
    shutil.copytree(ensure_tiny_model("builtin:tiny-flux", model_cache), folder)
    break_folder(folder)
    worker = make_worker(models={"broken": str(folder)})
    running = worker.execute_workflow(session_id="running", workflow_id="img-generation-basic", background=True,
                                      parameters={"prompt": "a fox", "steps": 6, "width": 32, "height": 32,
                                                  "model": "builtin:tiny-flux"})
    assert running["success"]

    reply = worker.execute("inference.text2img", {"prompt": "x", "model": "broken", "steps": 2, "width": 32,
                                                  "height": 32, "background": False})
    assert reply.get("status", "failed") == "failed" and reply["error_code"] in ("invalid_request", "unavailable")
    assert says in reply["error"] and str(folder) in reply["error"], reply["error"]

    wait_for(lambda: session_status(worker, "running")["status"] == "completed")
    after = worker.execute("inference.text2img", {"prompt": "x", "model": "builtin:tiny-flux", "steps": 2,
                                                  "width": 32, "height": 32, "background": False})
    assert after["status"] == "completed"
