"""The deployment files agree with the code: every setting in .env.example, compose and the Dockerfile consistent.

Docker is not needed: these read the files. What they cannot check (an image builds, a GPU is reserved) is for a
machine with Docker; see deploy/compose.yaml.
"""

from __future__ import annotations

import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest

from bot.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
SETTING_LINE = re.compile(r"^(?:# )?([A-Z][A-Z0-9_]*)=(.*)$")


def env_example() -> dict[str, list[str]]:
    """NAME -> the values written for it (one per occurrence) in .env.example."""
    found: dict[str, list[str]] = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if match := SETTING_LINE.match(line):
            found.setdefault(match[1], []).append(match[2])
    return found


def default_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    return yaml.safe_load((DEPLOY / "compose.yaml").read_text())


def test_env_example_lists_exactly_the_settings_with_their_defaults() -> None:
    listed = env_example()
    settings = {name.upper(): field for name, field in Settings.model_fields.items()}
    assert sorted(set(settings) - set(listed)) == [], "settings missing from .env.example"
    assert sorted(set(listed) - set(settings)) == [], ".env.example names settings that do not exist"
    assert {name: len(values) for name, values in listed.items() if len(values) > 1} == {}
    wrong = {name: (values[0], default_text(settings[name].default)) for name, values in listed.items()
             if values[0] != default_text(settings[name].default)}
    assert wrong == {}, "values in .env.example that are not the defaults: (written, default)"


def test_env_example_loads_as_the_defaults() -> None:
    # Every line is commented: copied to .env unchanged, it must change nothing.
    assert Settings(_env_file=ROOT / ".env.example") == Settings(_env_file=None)  # type: ignore[call-arg]


def test_compose_parses_and_names_existing_files() -> None:
    services = compose()["services"]
    assert set(services) >= {"postgres", "bot", "bot-tgi", "tgi"}
    for name in ("bot", "bot-tgi"):
        bot = services[name]
        context = (DEPLOY / bot["build"]["context"]).resolve()
        assert context == ROOT
        assert (context / bot["build"]["dockerfile"]).is_file()
        env_file = (DEPLOY / bot["env_file"]).resolve()
        assert env_file == ROOT / ".env"  # not in the repository: made from its template
        assert env_file.with_name(".env.example").is_file()
        url = bot["environment"]["DATABASE_URL"]
        assert url.startswith("postgresql+asyncpg://") and "@postgres:5432/" in url
        assert bot["depends_on"]["postgres"]["condition"] == "service_healthy"
        for volume in bot["volumes"]:
            assert volume.split(":")[0] in compose()["volumes"]


def test_compose_postgres_has_a_healthcheck_and_a_volume() -> None:
    postgres = compose()["services"]["postgres"]
    assert "pg_isready" in " ".join(postgres["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in postgres["volumes"])


def test_compose_local_bot_reserves_a_gpu_and_the_tgi_profile_uses_tgi() -> None:
    services = compose()["services"]
    [device] = services["bot"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["capabilities"] == ["gpu"]
    assert services["bot"]["profiles"] == ["local"]
    assert services["bot"]["environment"]["GENERATION_BACKEND"] == "local"
    bot, tgi = services["bot-tgi"], services["tgi"]
    assert bot["profiles"] == tgi["profiles"] == ["tgi"]
    assert bot["environment"]["GENERATION_BACKEND"] == "tgi"
    assert bot["environment"]["TGI_URL"] == "http://tgi:80"
    assert tgi["image"].startswith("ghcr.io/huggingface/text-generation-inference:")
    command = tgi["command"]
    assert command[command.index("--model-id") + 1] == bot["environment"]["IDEFICS_MODEL"]
    assert command[command.index("--dtype") + 1] == "bfloat16"
    assert tgi["shm_size"]
    assert any(v.endswith(":/data") for v in tgi["volumes"])
    assert tgi["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_compose_vllm_profile_uses_the_openai_backend_on_the_served_model() -> None:
    services = compose()["services"]
    bot, vllm = services["bot-vllm"], services["vllm"]
    assert bot["profiles"] == vllm["profiles"] == ["vllm"]
    assert bot["environment"]["GENERATION_BACKEND"] == "openai"
    assert bot["environment"]["OPENAI_BASE_URL"] == "http://vllm:8000/v1"
    assert vllm["image"].startswith("vllm/vllm-openai:")
    command = vllm["command"]
    assert command[command.index("--model") + 1] == bot["environment"]["OPENAI_MODEL"]
    assert bot["depends_on"]["vllm"]["condition"] == "service_healthy"
    assert vllm["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_dockerfile_installs_this_project_with_its_extras_and_runs_the_bot() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "idefics-bot" in project["scripts"]
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-\S+$", dockerfile, re.M)
    [extras] = re.findall(r'pip install "\.\[([a-z,]+)\]"', dockerfile)
    assert set(extras.split(",")) == {"postgres", "quant"}
    assert set(extras.split(",")) <= set(project["optional-dependencies"])
    for source in re.findall(r"^COPY (.+) \S+$", dockerfile, re.M):
        for path in source.split():
            assert (ROOT / path).exists(), path
    user = re.findall(r"^USER (\S+)$", dockerfile, re.M)
    assert user and user[-1] not in {"root", "0"}
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "idefics-bot"]' in dockerfile
    assert 'CMD ["run"]' in dockerfile
    assert "/app/data" in dockerfile and "HF_HOME" in dockerfile


def test_systemd_unit_restarts_on_failure_and_reads_the_environment_file() -> None:
    unit = (DEPLOY / "idefics-bot.service").read_text()
    lines = {line.partition("=")[0]: line.partition("=")[2] for line in unit.splitlines() if "=" in line}
    assert lines["Restart"] == "on-failure"
    assert lines["EnvironmentFile"].endswith("/.env")
    assert lines["ExecStart"].endswith("idefics-bot run")
    assert lines["KillSignal"] == "SIGTERM"


@pytest.mark.parametrize("script", [".ci/run", "tests/fakes/postgres/with-postgres.sh"])
def test_shell_scripts_parse(script: str) -> None:
    subprocess.run(["bash", "-n", str(ROOT / script)], check=True)
