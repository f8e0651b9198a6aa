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


def test_dockerfile_passes_hadolint():
    binary = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(binary).exists():
        pytest.skip("hadolint is not installed")
    result = subprocess.run([binary, str(REPO / "Dockerfile")], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout
    text = (REPO / "Dockerfile").read_text()
    assert "HEALTHCHECK" in text and "USER 10001" in text and "ARG BASE_IMAGE" in text
