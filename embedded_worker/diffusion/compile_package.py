"""What the compiler's child process runs: build one compiled denoiser package (`compiled_denoiser`).

The worker starts `python -m embedded_worker.diffusion.compile_package JOB` at the lowest CPU priority;
this loads the model from its folder, exports the family's forward at the job's shapes and compiles it with
AOTInductor. Its own module so the worker never imports what only the child needs, and the child nothing of
the worker's threads.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from .compiled_denoiser import INDUCTOR_OPTIONS
from .families import ADAPTERS
from .image_spec import ImageSpec
from .models import load_pipeline


class DenoiserForward(torch.nn.Module):
    """The family's forward as a module of (sample, timestep, rows), what `torch.export` traces."""

    def __init__(self, pipe, adapter, spec: ImageSpec):
        super().__init__()
        self.denoiser = adapter.denoiser(pipe)
        self._call = lambda sample, timestep, rows: adapter.forward(pipe, sample, timestep, rows, spec)

    def forward(self, sample, timestep, rows):
        return self._call(sample, timestep, rows)


def build_package(job: dict) -> None:
    """In the child process: load the model, trace its forward at the job's shapes, compile, write the package
    (to a temporary name first, so a killed child leaves no half file under the real one)."""
    import torch._inductor.config as inductor_config

    inductor_config.compile_threads = 1  # no pool of compile workers: the child is the background work
    inductor_config.cpp.threads = job["threads"]  # what each kernel's parallel loops are written for
    key = job["key"]
    device = torch.device(job["device"])
    pipe = load_pipeline(Path(job["folder"]), device, getattr(torch, job["dtype"]))
    adapter = ADAPTERS[job["family"]]
    spec = ImageSpec(model_id=key["model_id"], prompt="", height=key["height"], width=key["width"],
                     guidance_scale=job["guidance_scale"])
    example = {name: torch.zeros(shape, dtype=getattr(torch, dtype), device=device)
               for name, shape, dtype in key["inputs"]}
    sample, timestep = example.pop("sample"), example.pop("timestep")
    example = dict(sorted(example.items()))  # the rows by name: the order `package_runners` passes them in
    with torch.no_grad():
        exported = torch.export.export(DenoiserForward(pipe, adapter, spec).eval(), (sample, timestep, example),
                                       strict=False)
    path = Path(job["path"])
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial.pt2")
    torch._inductor.aoti_compile_and_package(exported, package_path=str(partial), inductor_configs=INDUCTOR_OPTIONS)
    os.replace(partial, path)


if __name__ == "__main__":
    build_package(json.loads(sys.argv[1]))
