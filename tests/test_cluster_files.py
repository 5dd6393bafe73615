"""cluster/: the launcher file and the RayService agree with configs/cluster.yaml and with Ray."""

from __future__ import annotations

import json
import shlex
from pathlib import Path

import yaml

from cluster import kuberay
from serve_app.app import settings_from_args

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "configs" / "cluster.yaml"
FAST_PATH = ("RAY_SERVE_THROUGHPUT_OPTIMIZED=1", "RAY_SERVE_ENABLE_HA_PROXY=1")


def test_rayservice_serve_config_is_cluster_yaml_verbatim() -> None:
    manifest = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    assert manifest["kind"] == "RayService"
    assert manifest["spec"]["serveConfigV2"] == CLUSTER_YAML.read_text()


def test_rayservice_is_generated_from_the_current_config() -> None:
    assert (ROOT / "cluster" / "rayservice.yaml").read_text() == kuberay.render()
    assert kuberay.main(["--check"]) == 0


def test_rayservice_generator_follows_the_config() -> None:
    changed = CLUSTER_YAML.read_text().replace("max_replicas: 8", "max_replicas: 9")
    assert yaml.safe_load(kuberay.render(changed))["spec"]["serveConfigV2"] == changed


def test_rayservice_nodes_have_the_fast_path_the_store_and_token_auth() -> None:
    spec = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())["spec"]["rayClusterConfig"]
    store = yaml.safe_load(CLUSTER_YAML.read_text())["applications"][0]["args"]["store"]
    pods = [spec["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in spec["workerGroupSpecs"]]
    for pod in pods:
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1" and env["RAY_SERVE_ENABLE_HA_PROXY"] == "1"
        assert env["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN" in env
        keys = {str(Path(k).parent) for k in yaml.safe_load(CLUSTER_YAML.read_text())["applications"][0]["args"]["trusted_keys"]}
        assert [m["mountPath"] for m in container["volumeMounts"]] == [store, *sorted(keys)]
        assert all(m["readOnly"] for m in container["volumeMounts"])
    assert spec["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    assert spec["rayVersion"] == kuberay.RAY_VERSION


def test_launcher_file_is_valid_for_ray_up() -> None:
    import jsonschema
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    assert config["available_node_types"][config["head_node_type"]]["resources"] == {"CPU": 0}


def test_launcher_starts_every_node_with_the_fast_path_and_token_auth() -> None:
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[key] if "ray start" in c)
        words = shlex.split(start)
        assert all(flag in words for flag in FAST_PATH) and "RAY_AUTH_MODE=token" in words, key
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]


def test_launcher_mounts_the_store_the_config_names() -> None:
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    serve = yaml.safe_load(CLUSTER_YAML.read_text())
    store = settings_from_args({"store": serve["applications"][0]["args"]["store"]}).store
    assert any(f" {store}" in command and "mount" in command for command in config["initialization_commands"])


def test_cluster_yaml_is_a_real_cluster_config() -> None:
    config = yaml.safe_load(CLUSTER_YAML.read_text())
    assert config["proxy_location"] == "EveryNode"
    assert config["http_options"]["host"] == "0.0.0.0"
    deployment = config["applications"][0]["deployments"][0]
    assert deployment["autoscaling_config"]["min_replicas"] >= 2
    assert config["applications"][0]["args"]["store"].startswith("/")  # a shared mount, not ./models
