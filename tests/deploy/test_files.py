"""The compose file parses and references only real files, and each profile runs its own image and replicas;
nginx's configuration (the Dockerfiles: test_images.py)."""

import re
import shutil
import subprocess
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


def _compose() -> dict:
    """The compose file as compose reads it: PyYAML's safe loader applies `<<` merges, shallow, as compose does."""
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def _active(compose: dict, profile: str | None) -> dict:
    """The services `docker compose [--profile P] up` starts: those with no profiles, or P among theirs."""
    return {name: s for name, s in compose["services"].items()
            if not s.get("profiles") or (profile is not None and profile in s["profiles"])}


def _servers(services: dict) -> dict:
    """Services that run the image's own command (`boomerang serve`), not a one-shot like `prepare`."""
    return {name: s for name, s in services.items()
            if str(s.get("image", "")).startswith("boomerang:") and "command" not in s}


def _prepares(services: dict) -> dict:
    """The one-shots that fill the shared cache before the replicas start."""
    return {name: s for name, s in services.items() if "import-teacher" in s.get("command", [])}


def _names(name: str, service: dict) -> set[str]:
    """Every DNS name a service answers to on the default network."""
    return {name, *((service.get("networks") or {}).get("default") or {}).get("aliases", [])}


def _profiles(compose: dict) -> set[str]:
    return {p for s in compose["services"].values() for p in s.get("profiles", [])}


def test_every_server_replica_keeps_the_api_keys_and_the_limits():
    """Read with YAML merge semantics (shallow, as compose merges): a service that redefines `environment:`
    must still carry the keys and limits, or its replicas would serve with no API key."""
    compose = _compose()
    shared = compose["x-environment"]
    assert {"BOOMERANG_API_KEYS", "BOOMERANG_MAX_CONCURRENT", "BOOMERANG_MAX_QUEUE"} <= set(shared)
    assert _profiles(compose) == {"cpu", "gpu"}
    servers = {name: s for profile in _profiles(compose) for name, s in _servers(_active(compose, profile)).items()}
    assert set(servers) == {"boomerang", "boomerang-gpu"}
    for name, service in servers.items():
        assert {k: service["environment"].get(k) for k in shared} == shared, name
    gpu = compose["services"]["boomerang-gpu"]
    assert gpu["environment"]["BOOMERANG_DEVICE"] == "cuda" and gpu["environment"]["BOOMERANG_DTYPE"] == "bfloat16"
    assert "BOOMERANG_DEVICE" not in compose["services"]["boomerang"]["environment"]


@pytest.mark.parametrize("profile", ["cpu", "gpu"])
def test_each_profile_starts_one_kind_of_replica_and_nginx_reaches_exactly_those(profile):
    compose = _compose()
    active = _active(compose, profile)
    servers = _servers(active)
    assert len(servers) == 1, f"--profile {profile} starts {sorted(servers)}"
    (name, server), = servers.items()
    prepares = _prepares(active)
    assert len(prepares) == 1, f"--profile {profile} starts {sorted(prepares)}"
    (prepare_name, prepare), = prepares.items()
    assert server["deploy"]["replicas"] and server["depends_on"] == {
        prepare_name: {"condition": "service_completed_successfully"}}
    # one image per profile: its prepare converts with the replicas' own code, and nothing else is built
    assert (prepare["image"], prepare["build"]) == (server["image"], server["build"])
    balancers = {n: s for n, s in active.items() if str(s.get("image", "")).startswith("nginx:")}
    assert len(balancers) == 1, f"--profile {profile} starts {sorted(balancers)}"
    (_, nginx), = balancers.items()
    assert nginx["depends_on"] == {name: {"condition": "service_healthy"}}
    assert "./deploy/nginx/upstream.compose.conf:/etc/nginx/upstream.conf:ro" in nginx["volumes"]
    upstream = (REPO / "deploy/nginx/upstream.compose.conf").read_text()
    hosts = re.findall(r"^server ([\w.-]+):8000 ", upstream, re.M)
    assert len(hosts) == 1 and hosts[0] in _names(name, server)
    others = [n for n, s in active.items() if n != name and hosts[0] in _names(n, s)]
    assert others == [], f"{others} would also answer to nginx's upstream name"


def test_no_profile_starts_no_server():
    compose = _compose()
    assert _servers(_active(compose, None)) == {}
    assert not any(str(s.get("image", "")).startswith("nginx:") for s in _active(compose, None).values())


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.search(r"(\d+(?:\.\d+)+)", text).group(1).split("."))


def test_nginx_re_resolves_the_replicas_and_runs_a_version_that_can():
    """`resolve` keeps the upstream in step with replicas that are scaled, restarted or removed; open-source
    nginx has it in an upstream (with a shared zone) from 1.27.3 on."""
    compose = _compose()
    images = {s["image"] for s in compose["services"].values() if str(s.get("image", "")).startswith("nginx:")}
    assert images and all(_version(image) >= (1, 27, 3) for image in images)
    upstream = (REPO / "deploy/nginx/upstream.compose.conf").read_text()
    assert re.search(r"^resolver 127\.0\.0\.11 valid=\d+s", upstream, re.M)
    assert re.search(r"^server boomerang:8000 resolve\b", upstream, re.M)
    block = re.search(r"upstream boomerang \{(.*?)\}", (REPO / "deploy/nginx/nginx.conf").read_text(), re.S).group(1)
    assert re.search(r"^\s*zone boomerang \d+k;", block, re.M) and "include upstream.conf;" in block


def _local_nginx() -> str | None:
    return shutil.which("nginx") or next((p for p in ["/usr/sbin/nginx"] if Path(p).exists()), None)


def _nginx_test(binary: str, workdir: Path, upstream: str) -> subprocess.CompletedProcess:
    (workdir / "nginx.conf").write_text((REPO / "deploy/nginx/nginx.conf").read_text())
    (workdir / "upstream.conf").write_text(upstream)
    return subprocess.run([binary, "-t", "-p", str(workdir), "-c", str(workdir / "nginx.conf")],
                          capture_output=True, text=True, timeout=30)


def test_the_local_nginx_accepts_the_config(tmp_path):
    """The shipped nginx.conf (with its zone) passes `nginx -t` with the loopback upstream the tests write, and
    with the compose upstream where this nginx is new enough for `resolve`."""
    binary = _local_nginx()
    if binary is None:
        pytest.skip("nginx is not installed (make test installs it)")
    result = _nginx_test(binary, tmp_path, "server 127.0.0.1:9 max_fails=3 fail_timeout=10s;\n")
    assert result.returncode == 0, result.stderr
    version = _version(subprocess.run([binary, "-v"], capture_output=True, text=True).stderr)
    result = _nginx_test(binary, tmp_path, (REPO / "deploy/nginx/upstream.compose.conf").read_text())
    if version >= (1, 27, 3):
        assert result.returncode == 0, result.stderr
    else:
        assert "resolver" in result.stderr and result.returncode != 0, "an old nginx accepted `resolve`?"


@pytest.mark.parametrize(("profile", "dockerfile", "image"), [("cpu", "Dockerfile", "boomerang:latest"),
                                                              ("gpu", "Dockerfile.cuda", "boomerang:cuda")])
def test_each_profile_builds_its_image_from_its_dockerfile(profile, dockerfile, image):
    for name, service in _active(_compose(), profile).items():
        if "build" not in service:
            continue
        build = service["build"] if isinstance(service["build"], dict) else {"context": service["build"]}
        assert (REPO / build["context"] / build.get("dockerfile", "Dockerfile")) == REPO / dockerfile, name
        assert service["image"] == image, name


def test_every_variable_the_compose_replicas_get_is_a_setting_that_parses():
    from app.settings import Settings

    for name, service in _compose()["services"].items():
        env = service.get("environment") or {}
        unknown = [key for key in env if not key.startswith("BOOMERANG_")
                   or key.removeprefix("BOOMERANG_").lower() not in Settings.model_fields]
        assert unknown == [], f"{name}: {unknown} are not settings of the server"
        literal = {key.removeprefix("BOOMERANG_").lower(): value for key, value in env.items()
                   if "${" not in str(value)}  # values the shell fills in are checked where they are set
        Settings(**literal)
