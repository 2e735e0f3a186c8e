"""An out-of-process JSON-lines worker: the architecture ServiceProcessing used before.

For comparison only (the .NET host benchmark measures it beside the
in-process worker). One JSON request per stdin line, `{"id", "command",
"request"}`, one JSON reply per stdout line, `{"id", "reply"}`. `get_output`
sends the pixels base64-encoded, as a JSON transport must.
"""

from __future__ import annotations

import base64
import json
import sys

from embedded_worker import ProcessingWorker


def serve(worker: ProcessingWorker, lines, out) -> None:
    for line in lines:
        message = json.loads(line)
        command, request = message["command"], message.get("request") or {}
        if command == "get_output":
            pixels = worker.get_output(request["output_id"])
            reply = {"success": True, "shape": list(pixels.shape), "dtype": "uint8",
                     "pixels": base64.b64encode(pixels.tobytes()).decode("ascii")}
        else:
            reply = worker.execute(command, request)
        out.write(json.dumps({"id": message.get("id"), "reply": reply}) + "\n")
        out.flush()


def main() -> int:
    # the host's configuration (EMBEDDED_WORKER_CONFIG, inherited: the same model), state in memory beside it
    with ProcessingWorker(None, state_path=":memory:") as worker:
        sys.stdout.write(json.dumps({"ready": True}) + "\n")
        sys.stdout.flush()
        serve(worker, sys.stdin, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
