"""The Kubernetes manifests, checked without a cluster: every rendered object validates against one Kubernetes
version's schemas, and what they say about the server (routes, port, settings, metrics, drain, memory) is true
of this server. Overlays render with `kubectl kustomize` where kubectl is installed, and by a small strategic
merge here everywhere (checked against kubectl's rendering when both exist)."""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import yaml

from app.main import create_app
from app.settings import Settings

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "deploy" / "k8s"
BASE = K8S / "base"
OVERLAYS = ["cpu", "gpu"]
KUBERNETES_VERSION = "1.31.0"
READY_PROCESS_BYTES = int(1.15 * 2 ** 30)  # the default pair's server once loaded (docs/performance.md)
SMOLLM2_135M = SimpleNamespace(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                               num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192)
GIB_UNITS = {"Gi": 2 ** 30, "Mi": 2 ** 20, "G": 10 ** 9, "M": 10 ** 6}


def _load(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _kustomization(folder: Path) -> dict:
    return yaml.safe_load((folder / "kustomization.yaml").read_text())


def _merge(base, patch):
    """Strategic merge as Kubernetes does it for these manifests: maps merge, lists of named items merge by name
    (containers, env, volumes), other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            merged[key] = _merge(base[key], value) if key in base else copy.deepcopy(value)
        return merged
    named = (isinstance(base, list) and isinstance(patch, list) and patch
             and all(isinstance(item, dict) and "name" in item for item in base + patch))
    if named:
        merged = {item["name"]: item for item in base}
        for item in patch:
            merged[item["name"]] = _merge(merged[item["name"]], item) if item["name"] in merged else item
        return list(merged.values())
    return copy.deepcopy(patch)


def _render(folder: Path) -> list[dict]:
    """A kustomization's objects: its resources (files or folders) with its patches applied."""
    kustomization, docs = _kustomization(folder), []
    for resource in kustomization["resources"]:
        path = (folder / resource).resolve()
        docs += _render(path) if path.is_dir() else _load(path)
    for entry in kustomization.get("patches", []):
        for patch in _load(folder / entry["path"]):
            key = (patch["kind"], patch["metadata"]["name"])
            index = next(i for i, doc in enumerate(docs) if (doc["kind"], doc["metadata"]["name"]) == key)
            docs[index] = _merge(docs[index], patch)
    for image in kustomization.get("images", []):
        for container in (c for doc in docs for c in _containers(doc)):
            if container["image"].split(":")[0] == image["name"]:
                container["image"] = f"{image.get('newName', image['name'])}:{image['newTag']}"
    return docs


def _containers(doc: dict) -> list[dict]:
    pod = doc.get("spec", {}).get("template", {}).get("spec", {})
    return [*pod.get("initContainers", []), *pod.get("containers", [])]


def _kubectl_render(folder: Path) -> list[dict] | None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        return None
    result = subprocess.run([kubectl, "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def _one(docs: list[dict], kind: str) -> dict:
    (found,) = [doc for doc in docs if doc["kind"] == kind]
    return found


def _server(docs: list[dict]) -> dict:
    (container,) = _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict:
    return {item["name"]: item.get("value", item.get("valueFrom")) for item in container.get("env", [])}


def _bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity)).groups()
    return int(number) * GIB_UNITS.get(unit, 1)


RENDERED = {name: _render(K8S / "overlays" / name) for name in OVERLAYS}


def test_the_kustomizations_list_every_manifest_and_only_files_that_exist():
    for folder in [BASE, *(K8S / "overlays" / name for name in OVERLAYS)]:
        kustomization = _kustomization(folder)
        listed = {*kustomization["resources"], *(p["path"] for p in kustomization.get("patches", []))}
        files = {p.name for p in folder.glob("*.yaml")} - {"kustomization.yaml"}
        assert {name for name in listed if not name.startswith("..")} == files, folder
    assert _kustomization(K8S / "overlays" / "cpu")["resources"] == ["../../base"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_validates_against_the_kubernetes_schemas(overlay):
    docs = RENDERED[overlay]
    assert {doc["kind"] for doc in docs} == {"Deployment", "Service", "PodDisruptionBudget",
                                             "HorizontalPodAutoscaler"}
    rendered_by_kubectl = _kubectl_render(K8S / "overlays" / overlay) or []
    for doc in [*docs, *rendered_by_kubectl, *(d for f in sorted(BASE.glob("[!k]*.yaml")) for d in _load(f))]:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_merge_here_renders_as_kubectl_kustomize_does(overlay):
    by_kubectl = _kubectl_render(K8S / "overlays" / overlay)
    if by_kubectl is None:
        pytest.skip("kubectl is not installed")

    def normal(docs):  # kustomize puts a patch's new env entries first; order of env carries no meaning
        docs = copy.deepcopy(docs)
        for doc in docs:
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                container["env"] = sorted(container.get("env", []), key=lambda item: item["name"])
        return sorted(docs, key=lambda doc: doc["kind"])

    assert normal(by_kubectl) == normal(RENDERED[overlay])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_port_and_settings_are_the_servers(overlay):
    docs = RENDERED[overlay]
    container, env = _server(docs), _env(_server(docs))
    paths = {path for path, methods in create_app().openapi()["paths"].items() if "get" in methods}
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready" and "/ready" in paths
    assert container["livenessProbe"]["httpGet"]["path"] == "/health" and "/health" in paths
    (port,) = container["ports"]
    assert port["containerPort"] == int(env.get("BOOMERANG_PORT", Settings.model_fields["port"].default))
    assert {container["readinessProbe"]["httpGet"]["port"], _one(docs, "Service")["spec"]["ports"][0][
        "targetPort"]} == {port["name"]}
    unknown = [name for name in env if not name.startswith("BOOMERANG_")
               or name.removeprefix("BOOMERANG_").lower() not in Settings.model_fields]
    assert unknown == []
    literal = {name.removeprefix("BOOMERANG_").lower(): value for name, value in env.items() if isinstance(value, str)}
    Settings(**literal)  # every value parses as its setting
    secret = env["BOOMERANG_API_KEYS"]["secretKeyRef"]
    assert secret["name"] == "boomerang-api-keys" and secret.get("optional") is not True


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_a_pod_drains_before_it_is_killed(overlay):
    docs = RENDERED[overlay]
    pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
    env = _env(_server(docs))
    graceful = float(env.get("BOOMERANG_GRACEFUL_TIMEOUT_S", Settings.model_fields["graceful_timeout_s"].default))
    command = _server(docs)["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    assert pod["terminationGracePeriodSeconds"] > graceful + float(command[1])
    assert _one(docs, "PodDisruptionBudget")["spec"]["minAvailable"] >= 1
    assert _one(docs, "Deployment")["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_reach_the_pods(overlay):
    docs = RENDERED[overlay]
    labels = _one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    for selector in (_one(docs, "Service")["spec"]["selector"],
                     _one(docs, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
                     _one(docs, "Deployment")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    target = _one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", _one(docs, "Deployment")["metadata"]["name"])


def test_the_autoscaler_scales_on_a_metric_the_server_exports_and_the_adapter_serves():
    from app.metrics import Metrics

    exported = {family.name for family in Metrics().registry.collect()}
    hpa = _one(RENDERED["cpu"], "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    pods = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [p["metric"]["name"] for p in pods] == ["boomerang_queue_depth"] and "boomerang_queue_depth" in exported
    cpu = [m["resource"] for m in hpa["spec"]["metrics"] if m["type"] == "Resource"]
    assert cpu and cpu[0]["name"] == "cpu" and cpu[0]["target"]["type"] == "Utilization"
    assert "cpu" in _server(RENDERED["cpu"])["resources"]["requests"]  # utilisation is a share of the request
    (rule,) = yaml.safe_load((K8S / "prometheus-adapter-rules.yaml").read_text())["rules"]
    assert rule["seriesQuery"].startswith("boomerang_queue_depth{") and rule["name"]["as"] == "boomerang_queue_depth"
    assert rule["resources"]["overrides"]["pod"] == {"resource": "pod"}
    assert "<<.Series>>{<<.LabelMatchers>>}" in rule["metricsQuery"]
    annotations = _one(RENDERED["cpu"], "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == _server(RENDERED["cpu"])["ports"][0]["containerPort"]


def test_the_init_container_prepares_the_cache_the_server_reads():
    pod = _one(RENDERED["cpu"], "Deployment")["spec"]["template"]["spec"]
    (prepare,) = pod["initContainers"]
    server = _server(RENDERED["cpu"])
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    assert prepare["command"] == compose["services"]["prepare"]["command"]
    pair = prepare["command"][prepare["command"].index("--pair") + 1]
    assert pair in server["command"] and (REPO / "models_store" / Path(pair).name / "manifest.json").exists()
    cache_dir = re.search(r"BOOMERANG_CACHE_DIR=(\S+)", (REPO / "Dockerfile").read_text()).group(1)
    mounts = {c["name"]: {m["name"]: m["mountPath"] for m in c["volumeMounts"]} for c in (prepare, server)}
    assert mounts["prepare"]["cache"] == mounts["boomerang"]["cache"] == cache_dir
    assert mounts["prepare"]["models"] == mounts["boomerang"]["models"] == "/app/models_store"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert "emptyDir" in volumes["cache"] and volumes["models"]["persistentVolumeClaim"]["readOnly"] is True


@pytest.mark.parametrize(("overlay", "item_bytes", "mixed"), [("cpu", 4, True), ("gpu", 2, False)])
def test_the_memory_limit_holds_what_the_limits_allow(overlay, item_bytes, mixed):
    """The server refuses to start when its limits could need more than the cgroup's room."""
    from services.engine.memory import memory_bound

    container = _server(RENDERED[overlay])
    env = _env(container)
    settings = Settings(**{n.removeprefix("BOOMERANG_").lower(): v for n, v in env.items() if isinstance(v, str)})
    context = min(settings.max_total_tokens, SMOLLM2_135M.max_position_embeddings)
    bound = memory_bound(SMOLLM2_135M, item_bytes, 0, context, settings.max_batch_size, settings.max_concurrent,
                         mixed)
    assert _bytes(container["resources"]["limits"]["memory"]) >= READY_PROCESS_BYTES + bound.total_bytes
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"]


def test_the_gpu_overlay_asks_for_one_gpu_and_the_cpu_overlay_for_none():
    gpu, cpu = _server(RENDERED["gpu"]), _server(RENDERED["cpu"])
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert _env(gpu)["BOOMERANG_DEVICE"] == "cuda" and _env(gpu)["BOOMERANG_DTYPE"] == "bfloat16"
    tolerations = _one(RENDERED["gpu"], "Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in tolerations
    assert "nvidia.com/gpu" not in cpu["resources"]["limits"] and _env(cpu)["BOOMERANG_DEVICE"] == "cpu"
    assert "tolerations" not in _one(RENDERED["cpu"], "Deployment")["spec"]["template"]["spec"]
    assert gpu["resources"]["limits"]["cpu"] == cpu["resources"]["limits"]["cpu"]  # the base's, kept by the merge


@pytest.mark.parametrize(("overlay", "profile"), [("cpu", "cpu"), ("gpu", "gpu")])
def test_each_overlay_runs_the_image_its_compose_profile_builds(overlay, profile):
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    built = {s["image"] for s in compose["services"].values() if profile in s.get("profiles", []) and "build" in s}
    images = {c["image"] for doc in RENDERED[overlay] for c in _containers(doc)}
    assert len(built) == 1 and images == built
