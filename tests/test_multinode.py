"""configs/cluster.yaml on a real three-node Ray cluster on this machine.

A head (no CPUs for replicas, as in production) and two worker nodes, each its own
`ray start` with the HAProxy fast path, then `serve deploy` of configs/cluster.yaml with
exactly two values substituted, both asserted:

* `http_options.port`: 8000 belongs to whatever else runs on this machine; a test takes a
  free port. (Worker nodes' proxies get theirs from RAY_SERVE_WORKER_PROXY_HTTP_PORT, set in
  each node's environment, because three proxies share one IP address here.)
* paths under /mnt/ (`args.store` /mnt/models, and any other shared mount the config names,
  such as a log directory): the cluster's shared mounts. The test maps each to the same path
  under tmp_path (and trains the store there) rather than writing to /mnt on a shared machine.

The cluster is separate from the pytest session's Ray: own temp dir, own ports, own HAProxy
files; it is driven through the `serve` CLI (a subprocess) and the dashboard's REST API, and
every process it had is ended by pid at the end (asserted).
"""

from __future__ import annotations

import asyncio
import collections
import copy
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Iterator

import httpx
import numpy as np
import pytest
import yaml

from serve_app.protocol.json import dumps

from serve_app.ops import control

from serve_app.model import signing
from serve_app.model.predictor import Predictor
from serve_app.model.store import ModelStore
from serve_app.model.training import train

from .conftest import IRIS_ROWS, wait_for
from .localcluster import LocalCluster

pytestmark = [pytest.mark.ray, pytest.mark.chaos]

CLUSTER_YAML = Path(__file__).resolve().parents[1] / "configs" / "cluster.yaml"
SHARED_MOUNT = "/mnt/"
# Only for the autoscaling test, applied later: shorter delays and a target a 2-core test
# client can exceed (64 ongoing requests per replica needs hundreds of concurrent clients).
AUTOSCALING_FOR_TEST = {
    "target_ongoing_requests": 2,
    "upscale_delay_s": 3,
    # Above the 15-25 s a new replica takes to start on this loaded 2-core machine: a
    # shorter delay scales down while the new replicas are still starting.
    "downscale_delay_s": 20,
    "look_back_period_s": 5,
    # Replicas push their ongoing-request counts this often; Ray's default of 10 s would
    # let the controller see a 10 s load step at most once.
    "metrics_interval_s": 1,
}


def leaf_paths(value: Any, prefix: tuple[Any, ...] = ()) -> dict[tuple[Any, ...], Any]:
    if isinstance(value, dict):
        return {p: v for k, item in value.items() for p, v in leaf_paths(item, prefix + (k,)).items()}
    if isinstance(value, list):
        return {p: v for i, item in enumerate(value) for p, v in leaf_paths(item, prefix + (i,)).items()}
    return {prefix: value}


def changed_paths(a: Any, b: Any) -> set[tuple[Any, ...]]:
    left, right = leaf_paths(a), leaf_paths(b)
    return {p for p in left.keys() | right.keys() if left.get(p, object()) != right.get(p, object())}


def remount(value: Any, root: Path) -> Any:
    """Every string naming a path under /mnt/ moved under `root` (same relative path)."""
    if isinstance(value, dict):
        return {k: remount(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [remount(v, root) for v in value]
    if isinstance(value, str) and value.startswith(SHARED_MOUNT):
        return str(root / value.lstrip("/"))
    return value


def cluster_config(port: int, root: Path) -> dict[str, Any]:
    config = remount(yaml.safe_load(CLUSTER_YAML.read_text()), root)
    config["http_options"]["port"] = port
    return config


def test_only_the_port_and_shared_mounts_differ_from_cluster_yaml(tmp_path: Path) -> None:
    original = yaml.safe_load(CLUSTER_YAML.read_text())
    changed = changed_paths(original, cluster_config(12345, tmp_path))
    mounts = {p for p, v in leaf_paths(original).items() if isinstance(v, str) and v.startswith(SHARED_MOUNT)}
    assert ("applications", 0, "args", "store") in mounts
    assert changed == {("http_options", "port")} | mounts
    assert original["proxy_location"] == "EveryNode"
    assert original["http_options"]["host"] == "0.0.0.0"


# ---- the cluster ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    mounts = tmp_path_factory.mktemp("multinode")
    local = LocalCluster(worker_cpus=4, head_cpus=0)
    config = cluster_config(local.head_http_port, mounts)
    store = ModelStore(config["applications"][0]["args"]["store"])
    train(store)  # signed with this run's publisher key (tests/conftest.py)
    # The nodes' environments carry no SERVE_APP_* variable: replicas trust the key the
    # config names, on its own (here remounted) read-only mount.
    for trusted in config["applications"][0]["args"]["trusted_keys"]:
        Path(trusted).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(signing.signing_dir() / signing.PUBLIC_KEY_FILENAME, trusted)
    session_ray_before = _session_ray_alive()
    try:
        local.start(workers=2)
        path = local.root / "cluster.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        deployed = local.serve("deploy", str(path))
        assert deployed.returncode == 0, deployed.stderr[-3000:]
        control.wait_until_running("serve_app", local.dashboard, timeout_s=240)
        yield {"local": local, "config": config, "store": store, "path": path}
    finally:
        ended = local.stop()
        # A worker the raylet forked in the last moments (not yet sampled) exits by itself
        # once its raylet is gone; give such stragglers a few seconds before calling them leaks.
        deadline = time.monotonic() + 15
        while (leftovers := local.leftovers() + _processes_mentioning(str(local.root))) and time.monotonic() < deadline:
            time.sleep(0.5)
        print(f"\nmultinode: ended {len(ended)} processes by pid; left over: {leftovers}")
        shutil.rmtree(local.root, ignore_errors=True)
        assert not leftovers, f"processes of the test cluster still alive: {leftovers}"
        assert _session_ray_alive() == session_ray_before, "the pytest session's Ray was disturbed"


def _session_ray_alive() -> bool:
    import ray

    if not ray.is_initialized():
        return False
    return any(node["Alive"] for node in ray.nodes())


def _processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line names this cluster's own temp dir (HAProxy's config,
    Ray's session dir): the final check that none outlived the test."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    found.append(int(entry.name))
            except OSError:
                pass
    return found


def replicas(local: LocalCluster) -> list[dict[str, Any]]:
    app = control.details(local.dashboard)["applications"]["serve_app"]
    return [r for r in app["deployments"]["ModelServer"]["replicas"] if r["state"] == "RUNNING"]


def expected_labels(store: ModelStore) -> list[Any]:
    return Predictor.load(store, "iris").model.predict(np.array(IRIS_ROWS)).tolist()


@pytest.mark.scenario
def test_replicas_placed_on_more_than_one_node(cluster: dict[str, Any]) -> None:
    local: LocalCluster = cluster["local"]
    nodes = {n["node_id"]: n for n in local.alive_nodes()}
    head = next(node_id for node_id, n in nodes.items() if n["is_head_node"])
    running = wait_for(lambda: replicas(local) if len(replicas(local)) >= 2 else None, 120, what="2 replicas")
    placed = {r["node_id"] for r in running}
    print(f"\nreplicas by node: {sorted((r['node_id'][:8], r['pid']) for r in running)}; head {head[:8]}")
    assert len(placed) >= 2, f"all replicas on one node: {placed}"
    assert head not in placed  # the head has num-cpus 0: it runs the controller, not the model
    assert placed <= set(nodes)


@pytest.mark.scenario
def test_every_nodes_ingress_answers(cluster: dict[str, Any]) -> None:
    local: LocalCluster = cluster["local"]

    def healthy() -> dict[str, Any] | None:
        proxies = control.details(local.dashboard)["proxies"]
        return proxies if len(proxies) == 3 and all(p["status"] == "HEALTHY" for p in proxies.values()) else None

    proxies = wait_for(healthy, 120, what="a HEALTHY proxy on each of the 3 nodes")
    assert len({p["node_id"] for p in proxies.values()}) == 3
    expected = expected_labels(cluster["store"])
    for node in local.nodes:
        url = f"http://127.0.0.1:{node.http_port}/predict"

        def answers() -> httpx.Response | None:
            reply = httpx.post(url, json={"features": IRIS_ROWS}, timeout=5)
            return reply if reply.status_code == 200 else None

        reply = wait_for(answers, 60, what=f"{node.name}'s ingress on :{node.http_port}")
        assert reply.json()["predictions"] == expected, node.name
        assert reply.headers["x-model-version"] == "1"


# ---- autoscaling ---------------------------------------------------------------------------


class Load:
    """`concurrency` asyncio clients in a thread, posting one body to one URL; counts answers."""

    def __init__(self, url: str, rows: list[list[float]] | None = None) -> None:
        self.url = url
        self.rows = rows or [IRIS_ROWS[0]]
        self.body = dumps({"features": self.rows})  # encoded once: the client stays cheap
        self.concurrency = 0
        self.done = 0
        self.failed = 0
        self.retries = 0
        self.causes: collections.Counter[str] = collections.Counter()  # why requests were retried or failed
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    async def _client(self, index: int, http: httpx.AsyncClient) -> None:
        while not self.stop.is_set():
            if index >= self.concurrency:
                await asyncio.sleep(0.05)
                continue
            if await post_with_retries(http, self, self.url):
                self.done += 1
            else:
                self.failed += 1

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        async with httpx.AsyncClient(limits=limits, timeout=30) as http:
            await asyncio.gather(*(self._client(i, http) for i in range(128)))

    def __enter__(self) -> "Load":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop.set()
        self.thread.join(60)


# 500 too: Ray Serve's HAProxy config answers 502/503/504 as 500 (its errorfile), so a
# request cut off with its node can arrive as a 500 from the ingress; the app itself never
# answers a valid request with 500. The same 5xx policy as tests/test_chaos.py's client.
RETRYABLE_STATUS = {500, 502, 503, 504}


async def post_with_retries(http: httpx.AsyncClient, load: Load, url: str, deadline_s: float = 60.0) -> bool:
    """Ray Serve's guidance for node and replica failures: the client retries requests that
    failed in transit (connection errors, 5xx from the ingress) with backoff; the predict
    call is idempotent, so a retry is always safe. Every retry's cause is recorded."""
    started = time.monotonic()
    delay = 0.05
    while True:
        try:
            reply = await http.post(url, content=load.body, headers={"content-type": "application/json"})
            if reply.status_code == 200:
                return len(reply.json()["predictions"]) == len(load.rows)
            load.causes[f"HTTP {reply.status_code}: {reply.text[:80]}"] += 1
            if reply.status_code not in RETRYABLE_STATUS:
                return False
        except httpx.TransportError as exc:
            load.causes[type(exc).__name__] += 1
        if time.monotonic() - started > deadline_s:
            load.causes["gave up after 60 s"] += 1
            return False
        load.retries += 1
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


# ---- a worker node dies under load ---------------------------------------------------------


@pytest.mark.scenario
def test_worker_node_killed_under_load_without_failed_requests(cluster: dict[str, Any]) -> None:
    local: LocalCluster = cluster["local"]
    # Back to the config as written (min 2 replicas), so both workers hold replicas.
    assert local.serve("deploy", str(cluster["path"])).returncode == 0
    control.wait_until_running("serve_app", local.dashboard, timeout_s=120)
    wait_for(lambda: len({r["node_id"] for r in replicas(local)}) >= 2, 120, what="replicas on both workers")
    by_node = {r["node_id"] for r in replicas(local)}
    victim = local.nodes[-1]  # worker2
    url = f"http://127.0.0.1:{local.head_http_port}/predict"
    with Load(url) as load:
        load.concurrency = 8
        wait_for(lambda: load.done > 200, 60, what="load to flow")
        before = load.done
        killed = local.kill_node(victim.name)
        print(f"\nkilled {victim.name}: {len(killed)} processes (raylet, workers, HAProxy) by SIGKILL")
        wait_for(lambda: len(local.alive_nodes()) == 2, 120, what="the GCS to mark the node dead")
        wait_for(lambda: load.done > before + 2000, 120, what="2000 more requests after the kill")
    print(f"requests: {load.done} ok, {load.failed} failed, {load.retries} retries; causes: {dict(load.causes)}")
    assert load.failed == 0, dict(load.causes)
    assert load.done > before + 2000
    alive = {n["node_id"] for n in local.alive_nodes()}

    def replaced() -> list[dict[str, Any]] | None:
        # Serve lists the dead node's replica as RUNNING until its health check fails (up to
        # health_check_period_s + health_check_timeout_s later); then it starts a new one.
        now = replicas(local)
        return now if len(now) >= 2 and {r["node_id"] for r in now} <= alive else None

    survivors = wait_for(replaced, 120, what="2 replicas again, all on live nodes")
    assert {r["node_id"] for r in survivors} <= alive
    assert len(by_node) >= 2


# Last: it leaves replicas wherever scaling down put them (possibly all on one worker).
@pytest.mark.scenario
def test_autoscaling_up_under_load_and_back_down(cluster: dict[str, Any], tmp_path: Path) -> None:
    local: LocalCluster = cluster["local"]
    config = copy.deepcopy(cluster["config"])
    deployment = config["applications"][0]["deployments"][0]
    scaling = deployment["autoscaling_config"]
    scaling.update(AUTOSCALING_FOR_TEST)
    # The 100-tree forest: ~10x the model work of the default per row, so requests pile up
    # at the replicas (what the autoscaler counts) rather than in this Python client.
    forest = train(cluster["store"], estimator="random_forest")
    deployment["user_config"] = {**deployment.get("user_config", {}), "version": forest.version}
    path = local.root / "cluster-autoscaling.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    assert local.serve("deploy", str(path)).returncode == 0
    control.wait_until_running("serve_app", local.dashboard, timeout_s=120)
    low, high = scaling["min_replicas"], scaling["max_replicas"]

    record: list[tuple[float, int, int, int, float]] = []  # t, clients, target, running, req/s
    url = f"http://127.0.0.1:{local.head_http_port}/predict"
    start = time.monotonic()

    def sample(load: Load, last_done: int, last_t: float) -> tuple[int, float]:
        deployment = control.details(local.dashboard)["applications"]["serve_app"]["deployments"]["ModelServer"]
        running = sum(r["state"] == "RUNNING" for r in deployment["replicas"])
        now = time.monotonic()
        rate = (load.done - last_done) / max(now - last_t, 1e-6)
        record.append((now - start, load.concurrency, deployment["target_num_replicas"], running, rate))
        return load.done, now

    # Heavy requests (2000 rows each): the replicas, not this test's client, are the bottleneck,
    # so requests queue at the replicas, which is what the autoscaler measures.
    heavy = np.random.default_rng(0).uniform(0.1, 7.0, size=(2000, 4)).round(2).tolist()
    with Load(url, heavy) as load:
        done, t = 0, time.monotonic()
        for clients in (2, 8, 24, 64):  # rising load
            load.concurrency = clients
            for _ in range(10):
                time.sleep(1)
                done, t = sample(load, done, t)
        # New replicas take 30-50 s to start on a 2-core machine running three Ray nodes:
        # the top load stays on until they run (or a bound).
        deadline = time.monotonic() + 120
        while record[-1][3] <= low and time.monotonic() < deadline:
            time.sleep(1)
            done, t = sample(load, done, t)
        peak = max(r[3] for r in record)
        load.concurrency = 0  # load stops
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            time.sleep(1)
            done, t = sample(load, done, t)
            if record[-1][3] == low and record[-1][2] == low and record[-2][3] == low:
                break
    print("\n   t(s)  clients  target  running   req/s")
    for row in record:
        print(f"{row[0]:7.1f}  {row[1]:7d}  {row[2]:6d}  {row[3]:7d}  {row[4]:6.0f}")
    _plot(record, tmp_path / "autoscaling.png")
    print(f"plot: {tmp_path / 'autoscaling.png'}; failed requests {load.failed}, retries {load.retries}")
    assert record[0][3] == low
    assert peak > low, f"never scaled above min_replicas={low}"
    assert max(r[2] for r in record) <= high
    assert record[-1][3] == low, f"did not scale back down to {low}: {record[-1]}"
    assert load.failed == 0, dict(load.causes)


def _plot(record: list[tuple[float, int, int, int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r[0] for r in record]
    fig, left = plt.subplots(figsize=(8, 4))
    left.step(t, [r[3] for r in record], where="post", label="running replicas", color="tab:blue")
    left.step(t, [r[2] for r in record], where="post", label="target replicas", color="tab:blue", linestyle=":")
    left.set_xlabel("seconds")
    left.set_ylabel("replicas")
    right = left.twinx()
    right.plot(t, [r[4] for r in record], label="requests/s", color="tab:orange")
    right.set_ylabel("requests/s")
    fig.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

