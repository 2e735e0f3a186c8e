"""Chroma: `ChromaPipeline.__call__` phase by phase, Flux's loop with other conditioning.

Chroma is a Flux-shaped transformer (packed 2x2 latents, image ids, the
same resolution-shifted flow matching) conditioned on T5 alone, with the
prompt's attention mask, and real classifier-free guidance from a negative
prompt. The pipeline runs the negative side as a second forward; we run it
as rows of the same forward, which rounds like any batch (see `denoise`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..conditioning import Conditioning
from .defaults import ModelDefaults
from .flux import MAX_SEQUENCE_LENGTH, Flux, position_ids

STEPS, GUIDANCE_SCALE = 35, 5.0  # ChromaPipeline's defaults


class Chroma(Flux):
    name = "chroma"
    pipeline_classes = ("ChromaPipeline",)

    def defaults(self, folder: Path) -> ModelDefaults:
        width, height = self.native_size(folder)
        return ModelDefaults(STEPS, GUIDANCE_SCALE, width, height, MAX_SEQUENCE_LENGTH)

    def classifier_free(self, spec) -> bool:
        return spec.guidance_scale > 1.0

    def encode_prompt(self, pipe, spec) -> Conditioning:
        guided = self.classifier_free(spec)
        embeds, _, mask, negative, _, negative_mask = pipe.encode_prompt(
            prompt=spec.prompt, negative_prompt=spec.negative_prompt or None, device=pipe.transformer.device,
            num_images_per_prompt=1, do_classifier_free_guidance=guided, max_sequence_length=max_sequence_length(pipe))
        return Conditioning({"encoder_hidden_states": embeds, "text_mask": mask},
                            {"encoder_hidden_states": negative, "text_mask": negative_mask} if guided else None)

    def model_input(self, pipe, cohort) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        x = torch.cat([cohort.latents] * 2) if cohort.classifier_free else cohort.latents
        timestep = cohort.timesteps[cohort.step_index].expand(x.shape[0]).to(x.dtype)
        return x, timestep, cohort.conditioning.rows()

    def forward(self, pipe, sample, timestep, rows: dict[str, torch.Tensor], spec) -> torch.Tensor:
        text = rows["encoder_hidden_states"]
        text_ids, image_ids = position_ids(pipe, spec, text)
        # the prompt's mask, then every image token attended (the pipeline's _prepare_attention_mask)
        image_tokens = torch.ones(sample.shape[0], sample.shape[1], device=text.device, dtype=torch.bool)
        mask = torch.cat([rows["text_mask"], image_tokens], dim=1)
        return pipe.transformer(hidden_states=sample, timestep=timestep / 1000, encoder_hidden_states=text,
                                txt_ids=text_ids, img_ids=image_ids, attention_mask=mask, return_dict=False)[0]


def max_sequence_length(pipe) -> int:
    """T5 tokens per prompt: the pipeline's 512, or fewer where the model's tokenizer says so."""
    return min(MAX_SEQUENCE_LENGTH, pipe.tokenizer.model_max_length)


CHROMA = Chroma()
