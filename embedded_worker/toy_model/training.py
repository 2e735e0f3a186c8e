"""Training the shapes pipeline on CPU: the autoencoder first, then the UNet and text encoder.

Design notes
- Two phases, as Stable Diffusion was made: the VAE learns to reconstruct
  scenes (MSE plus a tiny KL term), then its latents are computed once and
  the UNet learns to predict the noise added to them, conditioned on the
  caption. Encoding the scenes once keeps the VAE out of the UNet's steps.
- The VAE's `scaling_factor` is set from the latents' spread, so the
  diffusion sees latents of unit variance, as SD's samplers assume.
- Caption dropout (empty caption, what the pipeline encodes for "no
  prompt") teaches the unconditional prediction that classifier-free
  guidance subtracts; captions that name only the shape's colour or only
  the background teach partial prompts, so a negative prompt such as
  "a red circle" means something.
- Offset noise (a small per-channel constant added to the noise) lets the
  model move an image's overall colour; without it SD-style schedules
  struggle with flat backgrounds.
- Min-SNR weighting (Hang et al., 2023): each sample's loss is weighted by
  min(SNR, gamma) / SNR, so the nearly clean timesteps, which only polish
  detail, stop dominating the gradient. What a caption decides here, the
  colours and the shape, is decided at the noisy timesteps.
- An exponential moving average of the weights is what gets saved: after a
  short run it samples more cleanly than the last step's weights.
- Weights are saved in float16 (half the bytes); the worker loads them in
  its own dtype.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .dataset import make_scenes, render_all
from .recipe import assemble, build_components


@dataclass(frozen=True)
class TrainingPlan:
    seed: int = 0
    images: int = 20_000
    vae_steps: int = 500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    unet_steps: int = 5000
    unet_batch: int = 24
    unet_lr: float = 1e-3
    warmup_steps: int = 100
    caption_dropout: float = 0.1
    partial_captions: float = 0.3  # half name only the shape's colour, half only the background
    offset_noise: float = 0.1
    min_snr_gamma: float = 5.0  # 0: plain MSE over all timesteps
    ema_decay: float = 0.995
    threads: int = 2  # two idle cores; on a busy machine two threads that wait on each other lost 3x, use 1
    log_every: int = 25


def training_caption(scene, rng: random.Random, plan: TrainingPlan) -> str:
    draw = rng.random()
    if draw < plan.caption_dropout:
        return ""
    if draw < plan.caption_dropout + plan.partial_captions / 2:
        return f"a {scene.colour} {scene.shape}"
    if draw < plan.caption_dropout + plan.partial_captions:
        return f"a {scene.shape} on a {scene.background} background"
    return scene.caption


def _schedule(optimizer, plan: TrainingPlan, steps: int):
    """Linear warm-up, then a cosine decay to a tenth of the rate."""
    def factor(step: int) -> float:
        if step < plan.warmup_steps:
            return (step + 1) / plan.warmup_steps
        progress = (step - plan.warmup_steps) / max(1, steps - plan.warmup_steps)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class LossLog:
    """Losses averaged over `every` steps, printed as they come and kept for the plot."""

    def __init__(self, every: int):
        self.every = every
        self.rows: list[tuple[str, int, float]] = []
        self._pending: list[float] = []
        self._started = time.perf_counter()

    def add(self, phase: str, step: int, total: int, loss: float) -> None:
        self._pending.append(loss)
        if len(self._pending) == self.every or step == total:
            mean = sum(self._pending) / len(self._pending)
            self._pending.clear()
            self.rows.append((phase, step, mean))
            print(f"{phase:<4} step {step:5d}/{total} loss {mean:.5f} ({time.perf_counter() - self._started:6.1f} s)",
                  flush=True)

    def last(self, phase: str) -> float:
        return [loss for p, _, loss in self.rows if p == phase][-1]

    def write(self, folder: Path) -> None:
        with open(folder / "loss.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["phase", "step", "loss"])
            writer.writerows(self.rows)
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axes = plt.subplots(1, 2, figsize=(9, 3.2))
        for axis, phase, title in zip(axes, ("vae", "unet"), ("VAE reconstruction (MSE + KL)", "UNet noise (MSE)")):
            steps = [s for p, s, _ in self.rows if p == phase]
            losses = [v for p, _, v in self.rows if p == phase]
            axis.plot(steps, losses)
            axis.set_yscale("log")
            axis.set_title(title)
            axis.set_xlabel("step")
            axis.grid(alpha=0.3)
        figure.tight_layout()
        figure.savefig(folder / "loss.png", dpi=100)
        plt.close(figure)


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], as the pipeline's image processor makes them."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(vae, images: np.ndarray, plan: TrainingPlan, log: LossLog, generator: torch.Generator) -> None:
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)
    schedule = _schedule(optimizer, plan, plan.vae_steps)
    for step in range(1, plan.vae_steps + 1):
        index = torch.randint(0, len(images), (plan.vae_batch,), generator=generator)
        batch = _to_tensor(images[index.numpy()])
        posterior = vae.encode(batch).latent_dist
        latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator)
        reconstruction = vae.decode(latents).sample
        loss = F.mse_loss(reconstruction, batch) + plan.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        log.add("vae", step, plan.vae_steps, loss.item())
    vae.eval().requires_grad_(False)


@torch.no_grad()
def encode_latents(vae, images: np.ndarray, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and standard deviations of every image, scaled to unit variance."""
    means, stds = [], []
    for start in range(0, len(images), chunk):
        posterior = vae.encode(_to_tensor(images[start : start + chunk])).latent_dist
        means.append(posterior.mean)
        stds.append(posterior.std)
    mean, std = torch.cat(means), torch.cat(stds)
    scaling_factor = float(1.0 / mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    return mean * scaling_factor, std * scaling_factor


class TokenCache:
    """Token ids of each distinct caption, padded as the pipeline pads prompts."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for text in set(captions) - set(self._ids):
            self._ids[text] = self._tokenizer(text, padding="max_length", max_length=self._tokenizer.model_max_length,
                                              truncation=True, return_tensors="pt").input_ids[0]
        return torch.stack([self._ids[text] for text in captions])


def _min_snr_weights(noise_schedule, gamma: float) -> torch.Tensor:
    """Per-timestep loss weights min(SNR, gamma) / SNR for noise prediction; all ones when gamma is 0."""
    alphas = noise_schedule.alphas_cumprod
    snr = alphas / (1 - alphas)
    return torch.clamp(snr, max=gamma) / snr if gamma > 0 else torch.ones_like(snr)


def train_denoiser(components: dict, latents: tuple[torch.Tensor, torch.Tensor], scenes, plan: TrainingPlan,
                   log: LossLog, generator: torch.Generator, rng: random.Random) -> None:
    """The UNet and the text encoder together; their moving averages replace them at the end."""
    unet, text_encoder, noise_schedule = components["unet"], components["text_encoder"], components["noise_schedule"]
    tokens = TokenCache(components["tokenizer"])
    mean, std = latents
    trained = [unet.train(), text_encoder.train()]
    averaged = [copy.deepcopy(module).requires_grad_(False) for module in trained]
    parameters = [p for module in trained for p in module.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=plan.unet_lr, weight_decay=1e-2)
    schedule = _schedule(optimizer, plan, plan.unet_steps)
    steps = noise_schedule.config.num_train_timesteps
    weights = _min_snr_weights(noise_schedule, plan.min_snr_gamma)
    for step in range(1, plan.unet_steps + 1):
        index = torch.randint(0, len(mean), (plan.unet_batch,), generator=generator)
        clean = mean[index] + std[index] * torch.randn(mean[index].shape, generator=generator)
        captions = [training_caption(scenes[i], rng, plan) for i in index.tolist()]
        noise = torch.randn(clean.shape, generator=generator)
        noise += plan.offset_noise * torch.randn((*clean.shape[:2], 1, 1), generator=generator)
        timesteps = torch.randint(0, steps, (plan.unet_batch,), generator=generator)
        noisy = noise_schedule.add_noise(clean, noise, timesteps)
        conditioning = text_encoder(tokens(captions))[0]
        error = F.mse_loss(unet(noisy, timesteps, conditioning).sample, noise, reduction="none")
        per_sample = error.mean(dim=(1, 2, 3))
        loss = (per_sample * weights[timesteps]).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        decay = min(plan.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for average, module in zip(averaged, trained):
                torch._foreach_lerp_(list(average.parameters()), list(module.parameters()), 1 - decay)
        log.add("unet", step, plan.unet_steps, per_sample.mean().item())  # plain MSE: runs stay comparable
    components["unet"], components["text_encoder"] = (module.eval() for module in averaged)


def train(out: Path, plan: TrainingPlan = TrainingPlan()) -> dict:
    """Train every component, save the pipeline to `out/model`, the loss curve beside it; a summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(plan.threads)
    generator = torch.Generator().manual_seed(plan.seed)
    rng = random.Random(plan.seed)
    started = time.perf_counter()
    scenes = make_scenes(plan.images, plan.seed)
    images = render_all(scenes)
    components = build_components(plan.seed)
    log = LossLog(plan.log_every)
    train_vae(components["vae"], images, plan, log, generator)
    vae_seconds = time.perf_counter() - started
    latents = encode_latents(components["vae"], images)
    train_denoiser(components, latents, scenes, plan, log, generator, rng)
    seconds = time.perf_counter() - started
    pipe = assemble(components).to(torch.float16)
    pipe.save_pretrained(out / "model", safe_serialization=True)
    log.write(out)
    summary = {
        "plan": asdict(plan),
        "torch_threads": torch.get_num_threads(),
        "seconds": round(seconds, 1),
        "vae_seconds": round(vae_seconds, 1),
        "final_vae_loss": log.last("vae"),
        "final_unet_loss": log.last("unet"),
        "scaling_factor": components["vae"].config.scaling_factor,
    }
    (out / "training.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    print(f"trained in {seconds / 60:.1f} min on {summary['torch_threads']} threads: "
          f"final VAE loss {summary['final_vae_loss']:.5f}, UNet loss {summary['final_unet_loss']:.5f} -> {out}")
    return summary
