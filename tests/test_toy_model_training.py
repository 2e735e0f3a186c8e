"""The shapes model's making: a dataset drawn by code, a training script that runs, the weights the README names."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np

from embedded_worker.diffusion.models import check_model_folder, load_pipeline, native_size
from embedded_worker.toy_model import SHAPES_FOLDER
from embedded_worker.toy_model.dataset import COLOURS, Scene, all_captions, make_scenes, render, render_all
from embedded_worker.toy_model.recipe import WORDS, word_tokenizer
from embedded_worker.toy_model.training import TrainingPlan, train

README = Path(__file__).resolve().parents[1] / "README.md"


def test_scenes_are_the_same_from_the_same_seed_and_differ_from_another():
    first, again, other = make_scenes(50, seed=3), make_scenes(50, seed=3), make_scenes(50, seed=4)
    assert first == again and first != other
    assert np.array_equal(render_all(first), render_all(again))


def test_a_render_shows_its_caption():
    pixels = render(Scene("triangle", "red", "blue", dx=3, dy=-3, radius=12))
    assert pixels.shape == (64, 64, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[32, 32]) == COLOURS["red"]  # the centre lies inside the smallest, most shifted shape
    assert all(tuple(pixels[y, x]) == COLOURS["blue"] for y in (0, 63) for x in (0, 63))
    assert Scene("triangle", "red", "blue").caption == "a red triangle on a blue background"
    assert len(all_captions()) == 3 * 6 * 5


def test_every_caption_word_is_one_token_and_other_text_still_encodes():
    tokenizer, _ = word_tokenizer()
    tokens = tokenizer.convert_ids_to_tokens(tokenizer("a green triangle on a yellow background").input_ids)
    assert tokens[1:-1] == ["a</w>", "green</w>", "triangle</w>", "on</w>", "a</w>", "yellow</w>", "background</w>"]
    assert all(len(tokenizer(word).input_ids) == 3 for word in WORDS)
    assert len(tokenizer("a lighthouse at dusk").input_ids) > 6


def test_a_few_training_steps_make_a_loadable_pipeline(tmp_path, capsys):
    plan = TrainingPlan(images=16, vae_steps=2, vae_batch=2, unet_steps=2, unet_batch=2, warmup_steps=1,
                        log_every=1, threads=1)
    summary = train(tmp_path, plan)
    assert "unet step     2/2 loss" in capsys.readouterr().out
    assert (tmp_path / "loss.png").stat().st_size > 0 and summary["torch_threads"] == 1
    assert json.loads((tmp_path / "training.json").read_text())["plan"]["unet_steps"] == 2
    folder = tmp_path / "model"
    check_model_folder(folder)
    assert native_size(folder) == (64, 64)
    import torch

    pipe = load_pipeline(folder, torch.device("cpu"), torch.float32)
    image = pipe("a red circle on a blue background", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()


def test_shipped_weights_are_the_ones_the_readme_names():
    stated = dict((path, digest) for digest, path in
                  re.findall(r"^([0-9a-f]{64})  (embedded_worker/toy_model/shapes/\S+)$", README.read_text(), re.M))
    root = README.parent
    shipped = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
               for p in sorted(SHAPES_FOLDER.rglob("*.safetensors"))}
    assert len(shipped) == 3 and shipped == stated
