"""Model families: one adapter per family, and which pipeline class belongs to which family.

Design notes (the adapter shape)
- The loop around a family (`denoise.Cohort`, `predict_noise`, `decode_pixels`,
  and above them the active set, admission, preemption, pause/resume,
  out-of-memory back-off and progress) does not know which family it drives.
  What differs between families is what their pipeline's `__call__` does in
  each phase, and an adapter mirrors exactly that, phase by phase:
  1. `encode_prompt(pipe, spec)`: one image's conditioning rows (its text
     encoders and tokenizers), prompt side and, with classifier-free
     guidance, negative side;
  2. `start(pipe, specs, generators, dtype)`: the scheduler with its
     timesteps and the initial latents (noise from each image's own
     generator; img2img's noised image latents);
  3. `model_input(pipe, cohort)`: the rows one step feeds the denoiser;
  4. `forward(pipe, sample, timestep, rows, spec)`: the denoiser's call
     with the family's argument names and timestep convention;
  5. the guidance and scheduler step are shared (`Cohort.advance`):
     `classifier_free(spec)` says whether a family doubles rows for it;
  6. `vae_latents(pipe, latents, spec)`: unpacked and unscaled for the VAE.
  Plus what a folder says without loading: `native_size(folder)` and
  `defaults(folder)` (`ModelDefaults`: the steps, guidance and T5 length a
  request that leaves them empty gets), and `denoiser(pipe)`, the module a
  forward runs (UNet or transformer).
- A family is recognised by its folder's `model_index.json` `_class_name`
  (the pipeline class), so adding one is a module with an adapter and its
  line in `_ADAPTERS` below.
"""

from __future__ import annotations

from .chroma import CHROMA
from .flux import FLUX
from .stable_diffusion import STABLE_DIFFUSION
from .stable_diffusion_3 import STABLE_DIFFUSION_3
from .stable_diffusion_xl import STABLE_DIFFUSION_XL

_ADAPTERS = (STABLE_DIFFUSION, STABLE_DIFFUSION_XL, FLUX, STABLE_DIFFUSION_3, CHROMA)
ADAPTERS = {adapter.name: adapter for adapter in _ADAPTERS}
PIPELINE_FAMILIES = {pipeline: adapter.name for adapter in _ADAPTERS for pipeline in adapter.pipeline_classes}


def adapter_for(pipe):
    """The adapter that drives a loaded pipeline, by its class (the folder's `_class_name`)."""
    return ADAPTERS[PIPELINE_FAMILIES[type(pipe).__name__]]
