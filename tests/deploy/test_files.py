"""The compose file parses and references only real files; the Dockerfile passes hadolint."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]


def test_compose_services_healthchecks_mounts_and_nginx_config():
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"prepare", "boomerang", "nginx"} <= set(services)
    server = services["boomerang"]
    assert server["deploy"]["replicas"]
    assert "ready" in " ".join(server["healthcheck"]["test"])
    assert server["depends_on"]["prepare"]["condition"] == "service_completed_successfully"
    assert services["nginx"]["depends_on"]["boomerang"]["condition"] == "service_healthy"
    assert any(v.endswith(":/app/models_store:ro") for v in server["volumes"])
    gpu = services["boomerang-gpu"]
    assert gpu["profiles"] == ["gpu"] and gpu["deploy"]["resources"]["reservations"]["devices"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"
    nginx_mounts = [v.split(":")[0] for v in services["nginx"]["volumes"]]
    assert "./deploy/nginx/nginx.conf" in nginx_mounts


def test_every_server_replica_keeps_the_api_keys_and_the_limits():
    """Read with YAML merge semantics (shallow, as compose merges): a service that redefines `environment:`
    must still carry the keys and limits, or its replicas would serve with no API key."""
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    shared = compose["x-environment"]
    assert {"BOOMERANG_API_KEYS", "BOOMERANG_MAX_CONCURRENT", "BOOMERANG_MAX_QUEUE"} <= set(shared)
    servers = {name: s for name, s in compose["services"].items() if s.get("image") == "boomerang:latest"}
    assert {"boomerang", "boomerang-gpu"} <= set(servers)
    for name, service in servers.items():
        assert {k: service["environment"].get(k) for k in shared} == shared, name
    gpu = compose["services"]["boomerang-gpu"]
    assert gpu["environment"]["BOOMERANG_DEVICE"] == "cuda"
    upstream = (REPO / "deploy/nginx/upstream.compose.conf").read_text()
    assert "server boomerang:8000" in upstream and "boomerang" in gpu["networks"]["default"]["aliases"]


def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).exists():
        pytest.skip("hadolint is not installed")
    result = subprocess.run([binary, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    text = (REPO / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "USER 10001" in text and "ARG BASE_IMAGE" in text
