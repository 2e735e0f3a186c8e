"""SDXL: Stable Diffusion's loop with `StableDiffusionXLPipeline`'s conditioning.

Two text encoders side by side, a pooled text embedding and the size
"time ids" as added conditions; an empty negative prompt means zeros.
"""

from __future__ import annotations

from ..conditioning import Conditioning
from .stable_diffusion import StableDiffusion


class StableDiffusionXL(StableDiffusion):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")

    def encode_prompt(self, pipe, spec) -> Conditioning:
        """One image's prompt pair alone: SDXL's text projection rounds differently at other batch sizes."""
        guided = self.classifier_free(spec)
        positive, negative, pooled, negative_pooled = pipe.encode_prompt(
            prompt=spec.prompt,
            device=pipe.unet.device,
            num_images_per_prompt=1,
            do_classifier_free_guidance=guided,
            negative_prompt=spec.negative_prompt or None,
        )
        time_ids = pipe._get_add_time_ids(
            (spec.height, spec.width),
            (0, 0),
            (spec.height, spec.width),
            dtype=positive.dtype,
            text_encoder_projection_dim=pipe.text_encoder_2.config.projection_dim,
        ).to(pipe.unet.device)
        positive_rows = {"encoder_hidden_states": positive, "text_embeds": pooled, "time_ids": time_ids}
        negative_rows = {"encoder_hidden_states": negative, "text_embeds": negative_pooled, "time_ids": time_ids}
        return Conditioning(positive_rows, negative_rows if guided else None)


STABLE_DIFFUSION_XL = StableDiffusionXL()
