"""docker/: the compose stack's structure and the image's install steps (no Docker engine here).

`docker compose config` validates the file where a compose client is installed; the structural
checks below run everywhere, by parsing the YAML.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
SERVICES = {"postgres", "minio", "minio-init", "mlflow", "prefect", "worker", "orthanc"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def _compose_client() -> list[str] | None:
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return None


def test_compose_client_accepts_the_file():
    client = _compose_client()
    if client is None:
        pytest.skip("no docker compose client installed; the YAML checks below still run")
    result = subprocess.run(
        [*client, "-f", str(COMPOSE), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=DOCKER,
    )
    assert result.returncode == 0, result.stderr


def test_every_service_is_there_with_healthchecks(compose):
    services = compose["services"]
    assert set(services) == SERVICES
    for name in SERVICES - {"minio-init"}:  # a one-shot job has nothing to check
        test = services[name].get("healthcheck", {}).get("test")
        assert test and test[0] in {"CMD", "CMD-SHELL"}, name


def test_dependencies_wait_for_health_and_exist(compose):
    services = compose["services"]
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, (name, dep)
            expected = (
                "service_completed_successfully" if dep == "minio-init" else "service_healthy"
            )
            assert cond["condition"] == expected, (name, dep)
            if expected == "service_healthy":
                assert "healthcheck" in services[dep], dep
    assert set(services["worker"]["depends_on"]) >= {"postgres", "mlflow", "prefect"}
    assert set(services["mlflow"]["depends_on"]) >= {"postgres", "minio-init"}


def test_state_lives_in_named_volumes(compose):
    named = set(compose["volumes"])
    for name, target in (
        ("postgres", "/var/lib/postgresql/data"),
        ("minio", "/data"),
        ("worker", "/workspace"),
    ):
        mounts = [v.split(":") for v in compose["services"][name]["volumes"]]
        assert any(src in named and dst == target for src, dst, *_ in mounts), name


def test_services_are_wired_to_each_other(compose):
    s = compose["services"]
    worker_env = s["worker"]["environment"]
    assert worker_env["PREFECT_API_URL"] == "http://prefect:4200/api"
    assert worker_env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker_env["MEDML_CATALOG_URL"].startswith("postgresql+psycopg://")
    assert worker_env["MEDML_CATALOG_URL"].endswith("@postgres:5432/catalog")
    assert s["worker"]["command"][0] == "serve"
    mlflow_args = " ".join(s["mlflow"]["command"])
    assert "--backend-store-uri=postgresql+psycopg://" in mlflow_args
    assert "/mlflow" in mlflow_args and "--artifacts-destination=s3://mlflow" in mlflow_args
    assert s["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"] == "http://minio:9000"
    prefect_db = s["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and prefect_db.endswith("/prefect")
    init_sql = (DOCKER / "postgres-init.sql").read_text()
    for db in ("mlflow", "prefect", "catalog"):
        assert f"CREATE DATABASE {db};" in init_sql
    assert "mc mb --ignore-existing local/mlflow" in " ".join(s["minio-init"]["entrypoint"])
    # The medml services build this repository's image.
    for name in ("mlflow", "worker"):
        assert s[name]["build"]["dockerfile"] == "docker/Dockerfile"
        assert (DOCKER / s[name]["build"]["context"] / "docker" / "Dockerfile").exists()


def _pip_installs(text: str) -> list[str]:
    """The `pip install` commands of a Makefile recipe or a Dockerfile RUN, in order."""
    joined = text.replace("\\\n", " ")
    return [m.group(1).strip() for m in re.finditer(r"pip install (?:-q )?([^&\n]+)", joined)]


def test_dockerfile_installs_like_the_makefile():
    makefile = (ROOT / "Makefile").read_text()
    dockerfile = (DOCKER / "Dockerfile").read_text()
    torch_pin = re.search(r"^TORCH\s*\?=\s*(\S+)", makefile, re.M).group(1)
    assert re.search(rf"^ARG TORCH={re.escape(torch_pin)}$", dockerfile, re.M), torch_pin

    make_steps, docker_steps = _pip_installs(makefile), _pip_installs(dockerfile)
    assert make_steps[0] == "$(TORCH)" and "-e '.[dev]'" in make_steps[1]
    assert docker_steps[0].startswith('"${TORCH}" --index-url')
    assert "download.pytorch.org/whl/${TORCH_VARIANT}" in docker_steps[0]
    assert docker_steps[1].startswith('".[') and len(docker_steps) == 2
    assert re.search(r"^ARG TORCH_VARIANT=cpu$", dockerfile, re.M)  # CUDA by build argument
    # What `pip install .` needs is in the image.
    for path in ("pyproject.toml", "README.md", "medml", "flows", "configs", "prefect.yaml"):
        assert re.search(rf"^COPY .*\b{re.escape(path)}\b", dockerfile, re.M), path
    assert re.search(r'^ENTRYPOINT \["medml"\]$', dockerfile, re.M)
