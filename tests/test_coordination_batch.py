"""A coordination's inference.batch_process step is a real batch: a child of the session, seen by every batch
command, steered with its session, made again by a restart or a recovered session."""

from __future__ import annotations

import threading

from embedded_worker import testing
from embedded_worker.lifecycle.state import WorkState

from .conftest import run_of


def batch_step(batch_id: str | None = "child", images: int = 2, steps: int = 4, seed: int = 11, **config) -> dict:
    parameters = {"batch_config": {"total_images": images, **config},
                  "generation_params": {"prompt": "a harbour at dawn", "seed": seed, "steps": steps}}
    if batch_id is not None:
        parameters["batch_id"] = batch_id
    return {"domain": "inference", "operation": "batch_process", "parameters": parameters}


ENHANCE = {"domain": "postprocessing", "operation": "enhance", "parameters": {"sharpness": 1.5}}


def final(worker, session_id: str) -> dict:
    assert testing.wait_until(worker, lambda: worker.get_session_status(session_id=session_id)["status"]
                              in ("completed", "failed", "cancelled"), 300)
    return worker.get_session_status(session_id=session_id)


class DeviceHold:
    """Holds the device after its first forward until released: the batch is joined and on the device."""

    def __init__(self, worker):
        self.reached, self.release = threading.Event(), threading.Event()
        self.remove = testing.on_step(worker, self._hook)

    def _hook(self, _device) -> None:
        self.reached.set()
        self.release.wait(300)

    def __enter__(self) -> "DeviceHold":
        return self

    def __exit__(self, *exc_info) -> None:
        self.release.set()
        self.remove()


def test_the_batch_step_is_a_batch_every_batch_command_sees(make_worker):
    worker = make_worker(scheduling={"max_batch_size": 2, "coalesce_wait_ms": 0})
    reply = worker.execute_workflow(coordination_id="coord", background=False, domains=[
        batch_step(images=3, parallel_processing=True, max_parallel_batches=2), ENHANCE])
    assert reply["status"] == "completed", reply
    batch = worker.get_batch_status(batch_id="child", include_items=True)
    assert batch["success"] and (batch["status"], batch["total_items"], batch["session_id"]) == \
        ("completed", 3, "coord")
    assert [i["seed"] for i in batch["items"]] == [11, 12, 13] and batch["board_slot"] >= 0  # on the board too
    assert batch["parallel"]["added"] == ["ew-device-cpu0-1"]  # parallel_processing was ignored in a step
    assert [o["seed"] for o in reply["outputs"]] == [11, 12, 13]  # the batch's images, enhanced
    step = reply["step_results"][0]
    assert (step["status"], step["images"], step["result"]) == ("completed", 3, {"batch_id": "child"})
    assert worker.execute("inference.get_metrics", {"batch_id": "child"})["metrics"]["total_images_generated"] == 3
    assert worker.get_status()["processing"]["batches"]["completed"] == 1
    # the session's own inference part counts its child batch's images (the C# demo aggregates it so)
    inference = worker.execute("inference.status", {"session_id": "coord"})
    assert inference["counts"]["done"] == 3 and sorted(i["seed"] for i in inference["images"]) == [11, 12, 13]

    generated = worker.execute_workflow(coordination_id="no-id", background=False, domains=[batch_step(None)])
    batch_id = generated["step_results"][0]["result"]["batch_id"]
    assert generated["status"] == "completed" and batch_id.startswith("coordination-batch-")
    assert worker.get_batch_status(batch_id=batch_id)["session_id"] == "no-id"
    assert worker.delete_batch(batch_id=batch_id)["deleted"]


def test_the_batch_follows_its_session_through_pause_resume_and_cancel(worker):
    with DeviceHold(worker) as hold:
        assert worker.execute_workflow(coordination_id="steered", domains=[batch_step(steps=20)])["success"]
        assert hold.reached.wait(300)
        replies: list[dict] = []
        pausing = threading.Thread(target=lambda: replies.append(
            worker.control_session(session_id="steered", action="pause")))
        pausing.start()
        assert testing.wait_until(worker, lambda: run_of(worker, "steered").state is WorkState.PAUSING, 60)
        hold.release.set()
        pausing.join(300)
    assert replies[0]["status"] == "paused", replies
    assert worker.get_batch_status(batch_id="child")["status"] == "paused"
    worker.control_session(session_id="steered", action="resume")
    assert worker.get_batch_status(batch_id="child")["status"] in ("pending", "running")
    worker.control_session(session_id="steered", action="cancel")
    assert worker.get_batch_status(batch_id="child")["status"] == "cancelled"
    assert final(worker, "steered")["status"] == "cancelled"


def test_a_user_cancel_of_the_batch_ends_the_session_step_with_it(worker):
    with DeviceHold(worker) as hold:
        assert worker.execute_workflow(coordination_id="cut", domains=[batch_step(steps=20), ENHANCE])["success"]
        assert hold.reached.wait(300)
        assert worker.control_batch(batch_id="child", action="cancel")["status"] == "cancelled"
    reply = final(worker, "cut")
    assert reply["status"] == "cancelled" and reply["outputs"] == []
    batch, enhance = reply["step_results"]
    assert batch["status"] == "cancelled" and "batch 'child' was cancelled" in batch["error"]
    assert enhance["status"] == "cancelled"


def test_a_restarted_session_makes_its_batch_again(worker):
    with DeviceHold(worker) as hold:
        assert worker.execute_workflow(coordination_id="again", domains=[batch_step(steps=6)])["success"]
        assert hold.reached.wait(300)
        worker.control_session(session_id="again", action="cancel")
    assert worker.get_batch_status(batch_id="child")["status"] == "cancelled"
    assert worker.control_session(session_id="again", action="restart")["success"]
    reply = final(worker, "again")
    assert reply["status"] == "completed" and [o["seed"] for o in reply["outputs"]] == [11, 12]
    batch = worker.get_batch_status(batch_id="child")
    assert (batch["status"], batch["processed_items"], batch["session_id"]) == ("completed", 2, "again")


def test_batch_ids_another_request_holds_are_refused(worker):
    assert worker.execute_batch(batch_id="taken", workflow_id="img-generation-basic",
                                parameters={"steps": 1, "total_images": 1})["success"]
    taken = worker.execute_workflow(coordination_id="clash", domains=[batch_step("taken")])
    assert taken["error_code"] == "invalid_request" and "'taken' is already the id of" in taken["error"], taken
    twice = worker.execute_workflow(coordination_id="twice", domains=[batch_step("b"), batch_step("b")])
    assert twice["error_code"] == "invalid_request" and "names two batches" in twice["error"], twice
    own = worker.execute_workflow(coordination_id="same", domains=[batch_step("same")])
    assert own["error_code"] == "invalid_request" and "session's own id" in own["error"], own
    assert worker.list_sessions()["total"] == 0 and worker.get_batch_status(batch_id="b")["error_code"] == "not_found"


def test_a_session_recovered_after_a_restart_makes_its_batch_again_and_leaves_none_unfinished(durable):
    first = durable()
    with DeviceHold(first) as hold:
        assert first.execute_workflow(coordination_id="survivor", domains=[batch_step(steps=6)])["success"]
        assert hold.reached.wait(300)
        closing = threading.Thread(target=lambda: first.close(timeout=30, pending="suspend"))
        closing.start()
        hold.release.set()
        closing.join(300)

    second = durable()
    recovery = second.get_status()["recovery"]
    assert recovery["sessions"] == {"requeued": 1}
    assert recovery["batches"]["requeued_items"] == 0  # cancelled: they would run for nobody, then be deleted
    reply = final(second, "survivor")
    assert reply["status"] == "completed" and [o["seed"] for o in reply["outputs"]] == [11, 12], reply
    batch = second.get_batch_status(batch_id="child", include_items=True)
    assert (batch["status"], batch["session_id"]) == ("completed", "survivor")
    assert [i["status"] for i in batch["items"]] == ["completed", "completed"]
