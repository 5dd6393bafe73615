"""Faults under load, against the session's real Ray: a killed replica, a burst far over
capacity, a redeploy and an app removal with requests in flight.

Each test deploys its own app (so the shared `served` app is never disturbed) and
removes it afterwards. The figures each test measures are printed as one `CHAOS {...}`
JSON line (run with `-s` to see them) for the README's reliability section.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import numpy as np
import pytest
import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from serve_app.ops import control

from .conftest import IRIS_ROWS, ServeCluster, app_config, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.chaos, pytest.mark.scenario]

SMALL = {"ray_actor_options": {"num_cpus": 0.1}}


def report(name: str, figures: dict[str, Any]) -> None:
    print(f"CHAOS {json.dumps({'test': name, **figures}, sort_keys=True)}", flush=True)


def retrying_session() -> requests.Session:
    """The client Ray's production guide recommends: 5 retries, exponential back-off,
    retry on 5xx. POST is added to the retried methods: a prediction is idempotent."""
    session = requests.Session()
    retries = Retry(total=5, backoff_factor=1, status_forcelist=[500, 501, 502, 503, 504], allowed_methods=None)
    session.mount("http://", HTTPAdapter(max_retries=retries))
    return session


def replicas(cluster: ServeCluster, app: str) -> list[dict[str, Any]]:
    info = control.details(cluster.dashboard)["applications"].get(app) or {}
    deployment = (info.get("deployments") or {}).get("ModelServer") or {}
    return list(deployment.get("replicas") or [])


def running(cluster: ServeCluster, app: str) -> list[dict[str, Any]]:
    return [r for r in replicas(cluster, app) if r.get("state") == "RUNNING"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


@pytest.fixture
def deploy(served: dict[str, Any]) -> Iterator[Callable[..., str]]:
    """Deploys a test app next to the shared one; removes it (and waits) afterwards."""
    cluster: ServeCluster = served["cluster"]
    names: list[str] = []

    def _deploy(name: str, *, num_replicas: int, deployment: dict[str, Any] | None = None, **kwargs: Any) -> str:
        cluster.apply(
            app_config(served["store"], name=name, route_prefix=f"/{name}", num_replicas=num_replicas,
                       deployment={**SMALL, **(deployment or {})}, monitoring={"enabled": False}, **kwargs)
        )
        names.append(name)
        url = f"{cluster.base_url}/{name}"
        wait_for(lambda: httpx.post(f"{url}/predict", json={"features": IRIS_ROWS[0]}, timeout=5).status_code == 200,
                 what=f"app {name} to answer")
        return url

    yield _deploy
    for name in names:
        cluster.remove(name)
    for name in names:
        wait_for(lambda: not replicas(cluster, name), timeout_s=90, what=f"app {name} to be gone")


@dataclass
class Load:
    """Client threads sending predictions until stopped; every outcome is recorded."""

    url: str
    threads: int = 4
    retry: bool = True
    body: dict[str, Any] = field(default_factory=lambda: {"features": IRIS_ROWS})
    headers: dict[str, str] = field(default_factory=dict)
    sent: int = 0
    ok: int = 0
    failures: list[str] = field(default_factory=list)
    retried_requests: int = 0
    retries: int = 0
    retry_statuses: dict[str, int] = field(default_factory=dict)
    pids: set[int] = field(default_factory=set)
    outcomes: list[tuple[float, float, str | None]] = field(default_factory=list)  # (sent, answered, problem)
    in_flight: dict[int, float] = field(default_factory=dict)  # thread -> when its request was sent

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._workers = [threading.Thread(target=self._run, daemon=True) for _ in range(self.threads)]

    def _run(self) -> None:
        session = retrying_session() if self.retry else requests.Session()
        expected = len(self.body["features"])
        while not self._stop.is_set():
            sent_at = time.monotonic()
            with self._lock:
                self.in_flight[threading.get_ident()] = sent_at
            cut_short = 0
            while True:
                try:
                    reply = session.post(f"{self.url}/predict", json=self.body, headers=self.headers, timeout=(5, 60))
                    good = reply.status_code == 200 and len(reply.json()["predictions"]) == expected
                    problem = None if good else f"{reply.status_code} {reply.text[:120]}"
                    history = reply.raw.retries.history if reply.raw is not None and reply.raw.retries else ()
                except requests.exceptions.ChunkedEncodingError:
                    # The answer's headers came, then its replica died mid-body (seen once in
                    # ~7,000 requests). urllib3's Retry covers failures before a response only;
                    # a client retries an idempotent prediction cut short just the same.
                    if self.retry and cut_short < 2:
                        cut_short += 1
                        continue
                    problem, history = "ChunkedEncodingError: the answer was cut short", ()
                except Exception as exc:  # a failure the client saw, after its retries
                    problem, history = f"{type(exc).__name__}: {exc}"[:200], ()
                break
            with self._lock:
                del self.in_flight[threading.get_ident()]
                self.outcomes.append((sent_at, time.monotonic(), problem))
                self.sent += 1
                if problem is None:
                    self.ok += 1
                else:
                    self.failures.append(problem)
                if history or cut_short:
                    self.retried_requests += 1
                    self.retries += len(history) + cut_short
                    for entry in history:
                        key = str(entry.status or type(entry.error).__name__)
                        self.retry_statuses[key] = self.retry_statuses.get(key, 0) + 1
                    if cut_short:
                        self.retry_statuses["ChunkedEncodingError"] = self.retry_statuses.get("ChunkedEncodingError", 0) + cut_short

    def __enter__(self) -> "Load":
        for worker in self._workers:
            worker.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(timeout=120)

    def spanning(self, moment: float) -> list[str | None]:
        """The outcome of every finished request that was in flight at `moment`."""
        with self._lock:
            return [problem for sent, answered, problem in self.outcomes if sent < moment < answered]

    def unfinished_since(self, moment: float) -> bool:
        with self._lock:
            return any(sent < moment for sent in self.in_flight.values())

    def ok_after(self, moment: float) -> int:
        with self._lock:
            return sum(1 for sent, _, problem in self.outcomes if sent > moment and problem is None)

    def figures(self) -> dict[str, Any]:
        return {
            "requests_sent": self.sent, "requests_ok": self.ok, "requests_failed": len(self.failures),
            "requests_retried": self.retried_requests, "retries": self.retries, "retry_causes": self.retry_statuses,
            "first_failures": self.failures[:3],
        }


def serving_pids(url: str, calls: int = 20) -> set[int]:
    """Replica pids that answer over HTTP (through HAProxy), from /admin/status."""
    found = set()
    with httpx.Client(timeout=10) as client:
        for _ in range(calls):
            reply = client.get(f"{url}/admin/status")
            if reply.status_code == 200:
                found.add(reply.json()["pid"])
    return found


def test_replica_killed_under_steady_load(served: dict[str, Any], deploy: Callable[..., str]) -> None:
    import ray

    cluster: ServeCluster = served["cluster"]
    url = deploy("chaos", num_replicas=2)
    before = running(cluster, "chaos")
    assert len(before) == 2
    victim = before[0]
    wait_for(lambda: serving_pids(url) == {r["pid"] for r in before}, timeout_s=30, what="both replicas serving")

    with Load(url, threads=4) as load:
        wait_for(lambda: load.ok >= 20, what="steady load on both replicas")
        sent_before_kill = load.sent
        killed_at = time.monotonic()
        ray.kill(ray.get_actor(victim["actor_name"], namespace="serve"), no_restart=True)

        def replaced() -> bool:
            now = running(cluster, "chaos")
            return len(now) == 2 and victim["replica_id"] not in {r["replica_id"] for r in now}

        wait_for(replaced, timeout_s=120, interval_s=0.2, what="a new replica to be RUNNING")
        running_after_s = time.monotonic() - killed_at
        new_pids = {r["pid"] for r in running(cluster, "chaos")}
        wait_for(lambda: serving_pids(url) == new_pids, timeout_s=60, what="traffic on both replicas again")
        serving_after_s = time.monotonic() - killed_at
        serving_again = time.monotonic()
        wait_for(lambda: load.ok_after(serving_again) >= 20, what="steady load again with the new replica")

    figures = {
        **load.figures(), "sent_before_kill": sent_before_kill,
        "replacement_running_s": round(running_after_s, 2), "two_replicas_serving_s": round(serving_after_s, 2),
    }
    report("replica_killed", figures)
    assert load.failures == [], figures
    assert load.sent > sent_before_kill > 0
    assert victim["pid"] not in new_pids and len(new_pids) == 2


async def _burst(url: str, connections: int, body: dict[str, Any], headers: dict[str, str]) -> list[tuple[int, float, dict[str, str], str]]:
    """`connections` simultaneous HTTP/1.1 requests on raw sockets (a full HTTP client per
    connection would make the client, not the server, the bottleneck on 2 cores).

    Latency is from the request's last byte sent to the response read, per connection.
    """
    parsed = httpx.URL(url)
    payload = json.dumps(body).encode()
    head = (
        f"POST {parsed.raw_path.decode()}/predict HTTP/1.1\r\nHost: {parsed.host}:{parsed.port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n"
        + "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    ).encode()
    go, all_open = asyncio.Event(), asyncio.Event()
    opened = 0

    async def one() -> tuple[int, float, dict[str, str], str]:
        nonlocal opened
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(parsed.host, parsed.port), 60)
        except Exception as exc:
            return -1, 0.0, {}, f"connect: {type(exc).__name__}: {exc}"[:200]
        finally:
            opened += 1
            if opened == connections:
                all_open.set()
        await go.wait()
        began = time.perf_counter()
        try:
            writer.write(head + payload)
            await writer.drain()
            raw = await asyncio.wait_for(reader.read(), 60)
            took = time.perf_counter() - began
        except Exception as exc:
            return -1, time.perf_counter() - began, {}, f"{type(exc).__name__}: {exc}"[:200]
        finally:
            writer.close()
        status_line, _, rest = raw.partition(b"\r\n")
        header_block, _, content = rest.partition(b"\r\n\r\n")
        reply_headers = {}
        for line in header_block.split(b"\r\n"):
            key, _, value = line.decode("latin-1").partition(":")
            reply_headers[key.strip().lower()] = value.strip()
        status = int(status_line.split()[1]) if len(status_line.split()) > 1 else -1
        return status, took, reply_headers, content.decode(errors="replace")[:200]

    tasks = [asyncio.create_task(one()) for _ in range(connections)]
    await asyncio.wait_for(all_open.wait(), 120)  # every connection is open before the burst
    go.set()
    return list(await asyncio.gather(*tasks))


def test_overload_burst_sheds_excess_fast(served: dict[str, Any], deploy: Callable[..., str]) -> None:
    """1,000 simultaneous connections at one busy replica that admits 2 running + 4 queued.

    In HAProxy (direct ingress) mode Ray Serve admits a request at the replica unless
    max_queued_requests requests already wait for one of the max_ongoing_requests
    slots; the rest get backpressure_config.status_code (503) with Retry-After at once.
    First both slots are held by long requests (bigger than a batch, so they predict in a
    thread and the event loop is free to admit or refuse). Then the same burst meets the
    replica idle: whether it sheds then depends on how fast it drains what HAProxy hands it
    (seen: 984 refused, p50 0.33 s; and all 1,000 answered, p50 2.5 s, in a run with
    monitoring off), so only the statuses are asserted there and the split is reported.
    All 1,000 connections are open before the burst: when they were opened with it, the
    queue was the kernel's accept backlog, which max_queued_requests cannot see, and an
    earlier version of this test saw all 1,000 answered at p50 12 s.
    """
    cluster: ServeCluster = served["cluster"]
    url = deploy(
        "overload", num_replicas=1, user_config={"version": "2"},  # the 100-tree forest: ~ms per request
        deployment={"max_ongoing_requests": 2, "max_queued_requests": 4, "backpressure_config": {"status_code": 503, "retry_after_s": 1}},
    )
    (replica,) = running(cluster, "overload")
    rss_before = rss_mib(replica["pid"])
    body, headers = {"features": IRIS_ROWS}, {}

    slow_body = json.dumps({"features": _slow_rows(20)}).encode()  # 60,000 rows: seconds of forest
    stop, hog_statuses = threading.Event(), []

    def hog() -> None:
        with httpx.Client(timeout=120) as client:
            while not stop.is_set():
                reply = client.post(f"{url}/predict", content=slow_body, headers={"content-type": "application/json"})
                hog_statuses.append(reply.status_code)

    hogs = [threading.Thread(target=hog, daemon=True) for _ in range(2)]
    cpu_before = cpu_seconds(replica["pid"])
    for thread in hogs:
        thread.start()
    # Both slots busy: the replica is predicting (seconds of forest per long request).
    wait_for(lambda: cpu_seconds(replica["pid"]) - cpu_before > 1.0, interval_s=0.1, what="the long requests running")
    try:
        results = asyncio.run(_burst(url, 1000, body, headers))
    finally:
        stop.set()
        for thread in hogs:
            thread.join(120)
    idle_results = asyncio.run(_burst(url, 1000, body, headers))
    rss_after = rss_mib(replica["pid"])

    statuses: dict[int, int] = {}
    for status, *_ in results:
        statuses[status] = statuses.get(status, 0) + 1
    rejected = [r for r in results if r[0] == 503]
    accepted = [r for r in results if r[0] == 200]
    others = [r for r in results if r[0] not in (200, 503)]
    reject_latency = sorted(r[1] for r in rejected) or [0.0]
    accept_latency = sorted(r[1] for r in accepted) or [0.0]
    # Serves normally right after, on the same replica.
    after = httpx.post(f"{url}/predict", json={"features": IRIS_ROWS}, timeout=10)
    (still,) = running(cluster, "overload")
    figures = {
        "connections": len(results), "statuses": {str(k): v for k, v in statuses.items()},
        "rejected_p50_ms": round(1000 * reject_latency[len(reject_latency) // 2], 1),
        "rejected_max_ms": round(1000 * reject_latency[-1], 1),
        "accepted_p50_ms": round(1000 * accept_latency[len(accept_latency) // 2], 1),
        "accepted_max_ms": round(1000 * accept_latency[-1], 1),
        "replica_rss_mib_before": round(rss_before, 1), "replica_rss_mib_after": round(rss_after, 1),
        "retry_after": rejected[0][2].get("retry-after") if rejected else None,
        "other_examples": [r[3] for r in others[:3]],
        "long_requests": {str(k): hog_statuses.count(k) for k in sorted(set(hog_statuses))},
        "idle_burst": _burst_figures(idle_results),
    }
    report("overload", figures)
    assert not others, figures
    assert accepted and rejected, figures
    assert hog_statuses and set(hog_statuses) <= {200, 503}, figures  # a resent long one may be refused too
    assert all(r[2].get("retry-after") == "1" for r in rejected), figures
    assert all('"predictions"' in text for *_, text in accepted), figures
    # Refused with a 503 at once rather than queued: a request queued past the client's 60 s
    # timeout would be a -1 (timeout) above, never a 503. How fast is reported, not asserted.
    assert after.status_code == 200 and len(after.json()["predictions"]) == len(IRIS_ROWS)
    assert still["pid"] == replica["pid"], "the replica was restarted by the burst"
    assert rss_after - rss_before < 200, figures  # bounded: no per-request state kept
    idle = figures["idle_burst"]
    assert set(idle["statuses"]) <= {"200", "503"} and idle["statuses"].get("200", 0) > 0, figures


def _burst_figures(results: list[tuple[int, float, dict[str, str], str]]) -> dict[str, Any]:
    statuses: dict[str, int] = {}
    for status, *_ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    latency = sorted(r[1] for r in results) or [0.0]
    return {"statuses": statuses, "p50_ms": round(1000 * latency[len(latency) // 2], 1),
            "max_ms": round(1000 * latency[-1], 1)}


def _slow_rows(thousands: int = 1) -> list[list[float]]:
    """Rows that keep the 100-tree forest busy for a while (a request in flight)."""
    rng = np.random.default_rng(0)
    n = 3000 * thousands
    return (np.asarray(IRIS_ROWS * 1000 * thousands) + rng.normal(0, 0.1, size=(n, 4))).round(3).tolist()


def test_requests_in_flight_survive_redeploy_and_removal(served: dict[str, Any], deploy: Callable[..., str]) -> None:
    """A code change (new `args`) replaces every replica; requests in flight complete, and
    so do those in flight when the app is removed. The client does not retry here."""
    cluster: ServeCluster = served["cluster"]
    store = served["store"]
    name = "redeploy"
    url = deploy(name, num_replicas=2, user_config={"version": "2"})
    old = {r["replica_id"] for r in running(cluster, name)}
    slow = {"features": _slow_rows()}

    with Load(url, threads=3, retry=False, body=slow) as load:
        wait_for(lambda: load.ok >= 1 and load.in_flight, interval_s=0.05, what="slow requests in flight")
        started = time.monotonic()
        cluster.apply(
            app_config(store, name=name, route_prefix=f"/{name}", num_replicas=2, user_config={"version": "2"},
                       deployment=SMALL, max_rows=100_001, monitoring={"enabled": False}),
            wait=False,
        )

        def replaced() -> bool:
            now = running(cluster, name)
            return len(now) == 2 and not old & {r["replica_id"] for r in now} and len(replicas(cluster, name)) == 2

        wait_for(replaced, timeout_s=180, interval_s=0.5, what="every replica replaced")
        redeploy_s = time.monotonic() - started
        replaced_at = time.monotonic()
        wait_for(lambda: load.ok_after(replaced_at) >= 3, what="the new replicas answering")
        wait_for(lambda: not load.unfinished_since(started), timeout_s=120, what="requests sent before the redeploy to finish")
    redeploy = load.figures()
    in_flight_at_redeploy = load.spanning(started)

    # Removal: requests in flight when the app is deleted still complete.
    with Load(url, threads=3, retry=False, body=slow) as removal:
        wait_for(lambda: removal.ok >= 1 and removal.in_flight, interval_s=0.05, what="slow requests in flight")
        in_flight_at_removal = removal.sent
        removed_at = time.monotonic()
        cluster.remove(name)
        wait_for(lambda: not removal.unfinished_since(removed_at), timeout_s=120, what="requests sent before removal to finish")
    removal_figures = removal.figures()
    in_flight_at_delete = removal.spanning(removed_at)
    wait_for(lambda: not replicas(cluster, name), timeout_s=90, what="removed app's replicas to stop")
    stopped_s = time.monotonic() - removed_at

    report("redeploy", {**redeploy, "redeploy_s": round(redeploy_s, 2)})
    report("removal", {**removal_figures, "sent_before_removal": in_flight_at_removal, "app_gone_from_status_s": round(stopped_s, 2)})
    assert redeploy["requests_failed"] == 0, redeploy
    # Requests in flight when the redeploy was sent, and when the app was deleted, finished with 200.
    assert in_flight_at_redeploy and all(problem is None for problem in in_flight_at_redeploy), in_flight_at_redeploy
    assert in_flight_at_delete and all(problem is None for problem in in_flight_at_delete), in_flight_at_delete
    # After removal the route is gone: new requests get 404; none may fail any other way.
    unexpected = [f for f in removal.failures if not f.startswith("404")]
    assert unexpected == [], removal_figures
