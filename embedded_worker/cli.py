"""`python -m embedded_worker`: list workflows, run one with a progress bar, or run the demo.

    python -m embedded_worker workflows
    python -m embedded_worker run img-generation-basic --param prompt="a red fox" --param num_images=4 --out out/
    python -m embedded_worker demo --out demo_output

Images are written as PNG files (with their generation metadata) plus a
contact sheet, all through the same facade a .NET host uses.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

from .api.facade import ProcessingWorker
from .errors import WorkerError
from .outputs.postprocess import encode

BAR_WIDTH = 30


def parse_param(text: str) -> tuple[str, str]:
    """key=value, both as text: what the value means depends on the parameter (see `typed_params`)."""
    key, separator, value = text.partition("=")
    if not separator or not key.strip():
        raise argparse.ArgumentTypeError(f"expected key=value, got '{text}'")
    return key.strip(), value


def typed_params(workflow: dict, params: list[tuple[str, str]]) -> dict:
    """Values of text parameters stay text (`prompt=1984` is a prompt); the others are read as JSON when
    they are JSON (numbers, true, null), else as text, which the workflow then refuses by name."""
    text_parameters = {p["name"] for p in workflow.get("parameters", []) if p["type"] in ("string", "image")}
    typed = {}
    for key, value in params:
        if key in text_parameters:
            typed[key] = value
            continue
        try:
            typed[key] = json.loads(value)
        except json.JSONDecodeError:
            typed[key] = value
    return typed


def progress_line(status: dict) -> str:
    filled = round(BAR_WIDTH * status["progress"] / 100)
    detail = status["detailed_progress"]
    eta = detail.get("eta_seconds")
    eta_text = f" eta {eta:5.1f}s" if eta is not None else ""
    return (f"\r[{'#' * filled}{'.' * (BAR_WIDTH - filled)}] {status['progress']:3d}% "
            f"{status['status']:<9} {detail['current_operation']:<28}{eta_text}")


def follow(worker: ProcessingWorker, session_id: str, stream=None) -> dict:
    """Show progress until the session is final; return its final status. On a terminal a tqdm bar
    redraws in place; into a log (not a terminal) goes one line when the session ends, not one per poll."""
    stream = stream or sys.stderr
    interactive = bool(getattr(stream, "isatty", lambda: False)())
    with tqdm(total=100, file=stream, disable=not interactive, bar_format="{desc} {bar:30} {n:3.0f}%{postfix}",
              dynamic_ncols=True) as bar:
        while True:
            status = worker.get_session_status(session_id=session_id)
            if not status["success"]:
                return status
            detail = status["detailed_progress"]
            eta = detail.get("eta_seconds")
            bar.set_description_str(f"{status['status']:<9}", refresh=False)
            bar.set_postfix_str(detail["current_operation"] + (f" eta {eta:.1f}s" if eta is not None else ""),
                                refresh=False)
            bar.update(status["progress"] - bar.n)
            if status["status"] in ("completed", "failed", "cancelled"):
                break
            time.sleep(0.1)
    if not interactive:
        stream.write(progress_line(status).lstrip("\r").rstrip() + "\n")
        stream.flush()
    return status


def contact_sheet(images: list[np.ndarray], columns: int | None = None, cell: int = 128,
                  captions: list[str] | None = None) -> Image.Image:
    """A grid of `images`, each scaled to fit a `cell` x `cell` square (tiny ones enlarged crisply),
    with its caption, when given, written under it so a reader can check it against the picture."""
    from PIL import ImageDraw, ImageFont

    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    font = ImageFont.load_default()
    lines = [textwrap.wrap(caption, width=max(8, cell // 7)) for caption in captions or []]
    strip = 12 * max((len(wrapped) for wrapped in lines), default=0) + (4 if lines else 0)
    sheet = Image.new("RGB", (columns * cell, rows * (cell + strip)), "white")
    draw = ImageDraw.Draw(sheet)
    for index, pixels in enumerate(images):
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels[:, :, :3]).convert("RGB")
        scale = cell / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.NEAREST if scale > 1 else Image.Resampling.LANCZOS)
        x, y = (index % columns) * cell, (index // columns) * (cell + strip)
        sheet.paste(image, (x + (cell - image.width) // 2, y + (cell - image.height) // 2))
        for line_number, line in enumerate(lines[index] if lines else []):
            draw.text((x + 4, y + cell + 2 + 12 * line_number), line, fill="black", font=font)
    return sheet


def save_outputs(worker: ProcessingWorker, outputs: list[dict], folder: Path, stem: str) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = []
    for index, reference in enumerate(outputs):
        pixels = worker.get_output(reference["output_id"])
        images.append(pixels)
        info = worker.output_info(reference["output_id"])
        path = folder / f"{stem}-{index:02d}-seed{reference['seed']}.png"
        path.write_bytes(encode(pixels, "png", info["metadata"]))  # the worker's own encoder and metadata
    return images


def command_workflows(worker: ProcessingWorker, args: argparse.Namespace) -> int:
    reply = worker.get_workflows()
    for workflow in reply["workflows"]:
        steps = " -> ".join(f"{s['domain']}.{s['operation']}" for s in workflow["steps"])
        print(f"{workflow['id']:<22} {workflow['name']:<36} {steps}")
    for problem in reply["problems"]:
        print(f"skipped {problem['path']}: {problem['reason']}", file=sys.stderr)
    return 0


def command_run(worker: ProcessingWorker, args: argparse.Namespace) -> int:
    started = time.perf_counter()
    workflow = worker.get_workflow(workflow_id=args.workflow).get("workflow", {})
    reply = worker.execute_workflow(workflow_id=args.workflow, parameters=typed_params(workflow, args.param or []),
                                    priority=args.priority)
    if not reply["success"]:
        print(f"error ({reply['error_code']}): {reply['error']}", file=sys.stderr)
        return 2
    final = follow(worker, reply["session_id"])
    if final.get("status") != "completed":
        print(f"{final.get('status')}: {final.get('error')}", file=sys.stderr)
        return 1
    images = save_outputs(worker, final["outputs"], args.out, args.workflow)
    contact_sheet(images).save(args.out / f"{args.workflow}-contact-sheet.png")
    print(f"{len(images)} image(s) in {time.perf_counter() - started:.2f} s -> {args.out}")
    return 0


DEMO_PROMPTS = [
    "a red circle on a blue background",
    "a yellow triangle on a black background",
    "a white square on a green background",
    "a blue circle on a yellow background",
    "a green triangle on a white background",
    "a black square on a red background",
    "a red triangle on a white background",
    "a yellow square on a blue background",
]


def command_demo(worker: ProcessingWorker, args: argparse.Namespace) -> int:
    """The main job on the default model: one session with a progress bar, then a batch of eight prompts
    whose contact sheet shows each caption under its picture."""
    args.out.mkdir(parents=True, exist_ok=True)
    print("workflows:", ", ".join(w["id"] for w in worker.get_workflows()["workflows"]))
    started = time.perf_counter()
    session = worker.execute_workflow(workflow_id="img-upscale-enhance",
                                      parameters={"prompt": DEMO_PROMPTS[0], "seed": 42, "factor": 4})
    final = follow(worker, session["session_id"])
    if final.get("status") != "completed":
        print(f"session {final.get('status')}: {final.get('error')}", file=sys.stderr)
        return 1
    save_outputs(worker, final["outputs"], args.out, "session")
    print(f"session: {final['outputs'][0]['width']} px upscaled image in {time.perf_counter() - started:.2f} s")
    started = time.perf_counter()
    items = [{"parameters": {"prompt": prompt, "seed": 100 + i}} for i, prompt in enumerate(DEMO_PROMPTS)]
    batch = worker.execute_batch(workflow_id="img-generation-basic", background=False, items=items)
    if batch.get("status") != "completed":
        print(f"batch {batch.get('status')}: {batch.get('error')}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    in_item_order = sorted(batch["outputs"], key=lambda output: output["item_id"])  # item-0000, item-0001, ...
    images = save_outputs(worker, in_item_order, args.out, "batch")
    contact_sheet(images, columns=4, captions=DEMO_PROMPTS).save(args.out / "prompts-contact-sheet.png")
    count = len(images)
    print(f"batch: {count} prompts, {elapsed:.2f} s ({count / elapsed:.1f} img/s), "
          f"{batch['metrics']['total_batches']} denoising group(s)")
    print(f"wrote PNG files and {args.out / 'prompts-contact-sheet.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m embedded_worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="worker configuration: a JSON file or JSON text")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("workflows", help="list the workflows")
    run = commands.add_parser("run", help="run a workflow and write its images")
    run.add_argument("workflow")
    run.add_argument("--param", action="append", type=parse_param, metavar="KEY=VALUE")
    run.add_argument("--priority", type=int, default=5)
    run.add_argument("--out", type=Path, default=Path("outputs"))
    demo = commands.add_parser("demo", help="the main job on the default model")
    demo.add_argument("--out", type=Path, default=Path("demo_output"))
    args = parser.parse_args(argv)
    handlers = {"workflows": command_workflows, "run": command_run, "demo": command_demo}
    try:
        with ProcessingWorker(args.config) as worker:
            return handlers[args.command](worker, args)
    except WorkerError as error:  # a bad --config, a state file in use: said in one line, not a traceback
        print(f"error ({error.code}): {error.message}", file=sys.stderr)
    except OSError as error:  # an --out that cannot be written
        print(f"error: {error.filename or ''}: {error.strerror}", file=sys.stderr)
    return 2
