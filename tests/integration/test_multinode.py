"""Multi-node training on one machine: a two-node Ray cluster (`ray.cluster_utils.Cluster`) runs a 2-worker
DeepSpeed job through `raytrain train`, one worker on each node, and the checkpoint holds both ranks' state."""

from __future__ import annotations

import shutil
import tempfile

import pytest

from raytrain.cluster.local_head import free_ports
from raytrain.commands import train
from tests.conftest import compose
from tests.integration.test_train import overrides

pytestmark = pytest.mark.integration


@pytest.fixture
def two_nodes(monkeypatch):
    """A head with 3 CPUs and a second node with 2. A worker takes 2 CPUs, so no node holds both workers and the
    head keeps one CPU for Ray Data."""
    import ray
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    # Ray records the newest cluster in $RAY_TMPDIR/ray; a private directory keeps other processes' ray.init() off it
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths live in it
    monkeypatch.setenv("RAY_TMPDIR", ray_tmp)
    dashboard, agent = free_ports(2)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 3, "dashboard_port": dashboard, "dashboard_agent_listen_port": agent,
        "object_store_memory": 200 * 2**20})
    cluster.add_node(num_cpus=2, object_store_memory=200 * 2**20)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    yield cluster
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_two_workers_train_across_two_nodes(two_nodes, tmp_path, tokenizer_dir) -> None:  # noqa: F811
    from ray.util.state import list_actors

    result = train.run(compose("train", overrides(tmp_path, tokenizer_dir, "multinode", "trainer.max_steps=4",
                                                  "trainer.checkpoint_every=4", "trainer.cpus_per_worker=2")))
    assert result.return_value == {"status": "finished", "step": 4}
    workers = list_actors(filters=[("class_name", "=", "RayTrainWorker")], detail=True)
    nodes = {two_nodes.head_node.node_id, *(n.node_id for n in two_nodes.worker_nodes)}
    assert len(workers) == 2 and {w.node_id for w in workers} == nodes
    ranks = sorted(p.name for p in (tmp_path / "multinode" / "step000000004" / "rng").iterdir())
    assert ranks == ["rank00000.pt", "rank00001.pt"]
