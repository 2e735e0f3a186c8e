"""A whole node lost mid-batch, for real: Ray's own multi-node test cluster on this machine (a head that runs
nothing and two worker nodes of one CPU each, all on 127.0.0.1), one actor per node, and one node removed
while its actor holds images. Every item completes once, and the lost node's images continue from the last
state the head holds (their actors send it back every few steps), not from step 0."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from embedded_worker import testing  # noqa: E402
from embedded_worker.cluster.ray_environment import prepare_driver  # noqa: E402

from .conftest import assert_same_up_to_batch_rounding, wait_for  # noqa: E402

pytestmark = pytest.mark.own_processes
LOOPBACK = {"node_ip_address": "127.0.0.1", "include_dashboard": False}


@pytest.fixture
def two_node_cluster():
    prepare_driver(loopback=True)  # the nodes started from here inherit it: they stay on loopback
    cluster = Cluster(initialize_head=True, head_node_args={**LOOPBACK, "num_cpus": 0})
    try:
        nodes = [cluster.add_node(**LOOPBACK, num_cpus=1) for _ in range(2)]
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:
        cluster.shutdown()


def test_a_node_removed_mid_batch_loses_no_image_and_its_images_continue_from_the_heads_state(
        two_node_cluster, make_worker):  # in this order: the worker closes before the cluster stops
    cluster, nodes = two_node_cluster
    worker = make_worker(cluster={"address": cluster.address, "actors": 2, "cpus_per_actor": 1,
                                  "local_devices": False, "in_flight_per_actor": 2},
                         checkpoints={"every_steps": 2})
    actors = [w for w in testing.device_workers(worker) if str(w.device).startswith("ray:")]
    for remote in actors:
        wait_for(lambda remote=remote: remote.status()["loaded_models"], timeout=240)
    worker.execute_batch(batch_id="nodes", workflow_id="img-generation-basic", background=True,
                         parameters={"prompt": "a lighthouse at dusk", "steps": 50, "width": 64, "height": 64,
                                     "seed": 700, "total_images": 6})
    victim = next(w for w in actors if w.node_id == nodes[0].node_id)
    held = wait_for(lambda: {r: s for r, s in testing.held_states(victim).items() if s >= 4} or None, timeout=240)
    cluster.remove_node(nodes[0], allow_graceful=False)

    wait_for(lambda: worker.get_batch_status(batch_id="nodes")["status"] in ("completed", "failed"), timeout=300,
             interval=0.1)
    final = worker.get_batch_status(batch_id="nodes", include_items=True)
    assert (final["processed_items"], final["failed_items"]) == (6, 0)
    assert sorted(o["seed"] for o in final["outputs"]) == list(range(700, 706))  # each once
    assert victim.actor_deaths >= 1
    for record_id, step in held.items():
        task = testing.run_of(worker, record_id).all_tasks[0]
        assert task.resumed_from_step is not None and task.resumed_from_step >= step, (record_id, step)
    local = make_worker()
    for item in final["items"]:
        if f"nodes/{item['item_id']}" in held:
            solo = local.execute_workflow(workflow_id="img-generation-basic", background=False, parameters={
                "prompt": "a lighthouse at dusk", "steps": 50, "width": 64, "height": 64, "seed": item["seed"]})
            assert_same_up_to_batch_rounding(worker.get_output(item["outputs"][0]["output_id"]),
                                             local.get_output(solo["outputs"][0]["output_id"]))
