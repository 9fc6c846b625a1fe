"""`orchestration.run` on a simulated two-node cluster (`ray.cluster_utils.Cluster`): custom resources pin
the generator actors to one node and two Train workers (DDP) to the other, so every synthetic batch crosses
nodes through the object store."""

from __future__ import annotations

import shutil
import tempfile

import pytest
import ray
from mlflow.tracking import MlflowClient
from ray.cluster_utils import Cluster
from ray.util.state import list_actors

from muse.teacher import ensure_teacher
from orchestration.runner import run

from conftest import fast_digits_config

pytestmark = pytest.mark.slow

PLACEMENT = [
    "ray.generators.count=2", "ray.generators.num_cpus=0.5", "ray.generators.resources={generator_node: 0.5}",
    "ray.train.count=2", "ray.train.cpus_per_worker=0.5", "ray.train.resources={trainer_node: 0.5}",
]
# Loops divisible by the worker count: each worker runs ceil(loops / workers) synthesis episodes an epoch.
TINY = ["synthesis.warmup=1", "synthesis.gwp_loops=2", "synthesis.g_loops=2", "distill.epochs=1",
        "distill.kd_steps=10"]


@pytest.fixture(scope="module")
def two_nodes():
    """The cluster, the head's node id (trainer_node) and the second node's (generator_node)."""
    # A RAY_TMPDIR of our own (short: socket paths): Cluster records its address in
    # $RAY_TMPDIR/ray/ray_current_cluster, where Ray Train's placement-group cleaner looks for its
    # cluster; in the default /tmp it would mislead other clusters on this machine (and be deleted
    # under them by `Cluster.shutdown`).
    ray_tmp = tempfile.mkdtemp(prefix="muse-ray-", dir="/tmp")
    with pytest.MonkeyPatch.context() as env:
        env.setenv("RAY_USAGE_STATS_ENABLED", "0")
        env.setenv("RAY_TMPDIR", ray_tmp)
        env.setenv("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        env.setenv("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
        # Both nodes listen on loopback only. Ray rewrites a 127.0.0.1 address to the machine's IP
        # (where nothing listens then) unless multi-node clusters are "disabled": the variable for the
        # processes Ray starts, the constant for this one, which imported Ray already.
        env.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        env.setattr(ray._private.ray_constants, "ENABLE_RAY_CLUSTER", False)
        # The head serves the dashboard: Ray Train's placement-group cleaner polls its state API.
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 1, "resources": {"trainer_node": 1}, "node_ip_address": "127.0.0.1",
            "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": None})
        generator_node = cluster.add_node(num_cpus=1, resources={"generator_node": 1},
                                          node_ip_address="127.0.0.1")
        try:
            ray.init(address=cluster.address)
            yield cluster, cluster.head_node.node_id, generator_node.node_id
        finally:
            ray.shutdown()
            cluster.shutdown()
    shutil.rmtree(ray_tmp, ignore_errors=True)


def test_generators_and_train_workers_run_on_different_nodes(two_nodes, tmp_path, teacher_dir, digits_splits):
    cluster, trainer_node, generator_node = two_nodes
    cfg = fast_digits_config(tmp_path / "two-nodes", teacher_dir, *PLACEMENT, *TINY, "tracking.enabled=true")
    ensure_teacher(cfg, digits_splits)  # on the shared file system: every node reads the same file

    summary = run(cfg)

    assert summary["epochs_done"] == cfg.synthesis.warmup + cfg.distill.epochs
    assert summary["kd_steps"] == cfg.distill.epochs * cfg.distill.kd_steps
    episodes = cfg.synthesis.warmup * cfg.synthesis.gwp_loops + cfg.distill.epochs * cfg.synthesis.g_loops
    assert summary["synthesis_episodes"] == episodes
    assert summary["synthesis"]["total_images"] == episodes * cfg.synthesis.batch_size
    assert (cfg.output_dir / "summary.json").is_file()

    # The driver opened the MLflow run (params) and closed it (files); the Train worker on the other node
    # logged every evaluation while it ran: accuracy, staleness, image grids and CAM overlays.
    client = MlflowClient(f"sqlite:///{cfg.output_dir / 'mlflow.db'}")
    [tracked] = client.search_runs([client.get_experiment_by_name("muse").experiment_id])
    assert tracked.info.status == "FINISHED"
    assert tracked.data.params["ray.generators.count"] == str(cfg.ray.generators.count)
    history = client.get_metric_history(tracked.info.run_id, "student_acc")
    assert [m.value for m in history] == pytest.approx([h["student_acc"] for h in summary["history"]])
    assert len(client.get_metric_history(tracked.info.run_id, "staleness_mean_staleness")) == len(summary["history"])
    # Rank 0 logs the images synthesised by both workers, not only its own share.
    for resolution, images in summary["synthesis"]["images"].items():
        assert client.get_metric_history(tracked.info.run_id, f"images_{resolution}px")[-1].value == images
    for folder in ("images", "cam"):
        pictures = {a.path for a in client.list_artifacts(tracked.info.run_id, folder)}
        assert {f"{folder}/epoch{h['epoch']:04d}-{r}px.png"
                for h in summary["history"] for r in summary["synthesis"]["images"]} <= pictures
    assert {"summary.json", "student.pt", "accuracy_curve.png"} <= {a.path for a in client.list_artifacts(tracked.info.run_id)}

    # The state API keeps finished actors with the node they ran on.
    def nodes_of(class_name: str) -> list[str]:
        return [a.node_id for a in list_actors(address=cluster.address, filters=[("class_name", "=", class_name)])]

    assert nodes_of("GeneratorActor") == [generator_node] * cfg.ray.generators.count
    assert nodes_of("RayTrainWorker") == [trainer_node] * cfg.ray.train.count
    assert trainer_node != generator_node
