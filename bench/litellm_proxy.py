"""LiteLLM's proxy for ``bench/rest.py``'s ``litellm`` path: its venv, config and process.

LiteLLM is what many users would deploy instead of the relay for the REST side. It is
never installed into the project's environment: :func:`ensure_installed` makes a venv of
its own, ``bench/.litellm-venv`` (not committed), from the pinned
``bench/litellm/requirements.txt`` (``litellm[proxy]`` and every package it resolved to),
the first time the path is run and again whenever that file changes (a digest of it is
kept in the venv).

The proxy is configured (:func:`config_yaml`) with one model, the bench's model name,
routed to the bench's upstream as an OpenAI-compatible ``api_base`` with the upstream's
key; a master key, which the load sends as its bearer token (as the relay's client key);
no database, so no spend logs or key tables; error-level logging; one worker, LiteLLM's
default (uvicorn on uvloop, in the one process: its own production guide runs one uvicorn
worker per pod and scales out). See :data:`ENV` for the environment.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Final, TextIO

from harness import REPO

LITELLM_DIR: Final = REPO / "bench/litellm"
REQUIREMENTS: Final = LITELLM_DIR / "requirements.txt"
VENV: Final = REPO / "bench/.litellm-venv"
#: The digest of the requirements the venv was made from, inside the venv.
STAMP_NAME: Final = "bench-requirements.sha256"
#: The proxy's master key: the bearer token the load sends (LiteLLM wants ``sk-``).
MASTER_KEY: Final = "sk-bench-litellm-master-key"
#: LiteLLM's startup (importing the proxy, reading the config) takes 10-20 s here.
STARTUP_TIMEOUT_S: Final = 180.0
INSTALL_TIMEOUT_S: Final = 1800.0
#: The proxy's environment, on top of the bench's (less ``PYTHONPATH``).
ENV: Final = {
    # LiteLLM's own production advice: errors only, and no .env loading.
    "LITELLM_LOG": "ERROR",
    "LITELLM_MODE": "PRODUCTION",
    # The model cost map bundled in the package instead of a download at startup.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
}


class LiteLLMUnavailable(RuntimeError):
    """LiteLLM could not be installed or started; the message says why."""


@dataclass(frozen=True)
class Installed:
    """A ready venv: the ``litellm`` command and the version it holds."""

    command: Path
    version: str


def requirements_digest(requirements: Path = REQUIREMENTS) -> str:
    return hashlib.sha256(requirements.read_bytes()).hexdigest()


def ensure_installed(
    *,
    venv: Path = VENV,
    requirements: Path = REQUIREMENTS,
    python: str = sys.executable,
    log: TextIO = sys.stderr,
) -> Installed:
    """The venv at ``venv``, made from ``requirements`` unless it already was (same
    digest); :class:`LiteLLMUnavailable` with pip's last words when that fails."""
    if not requirements.exists():
        raise LiteLLMUnavailable(f"{requirements} is missing")
    digest = requirements_digest(requirements)
    stamp = venv / STAMP_NAME
    command = venv / "bin" / "litellm"
    fresh = stamp.exists() and stamp.read_text().strip() == digest and command.exists()
    if not fresh:
        print(
            f"installing LiteLLM into {display(venv)} from {display(requirements)} "
            "(about 750 MB, a minute or two)",
            file=log,
            flush=True,
        )
        stamp.unlink(missing_ok=True)
        # `python -m venv` from inside a venv makes one on the base interpreter.
        run_step([python, "-m", "venv", "--clear", str(venv)], "python -m venv")
        run_step(
            [
                str(venv / "bin/python"),
                *("-m", "pip", "install", "--disable-pip-version-check", "--no-input"),
                *("-r", str(requirements)),
            ],
            f"pip install -r {display(requirements)}",
        )
        if not command.exists():
            raise LiteLLMUnavailable(f"the install made no {display(command)}")
        stamp.write_text(digest + "\n")
    return Installed(command, installed_version(venv))


def run_step(command: list[str], what: str) -> None:
    try:
        completed = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            env=without_pythonpath(os.environ),
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as error:
        raise LiteLLMUnavailable(f"{what} failed: {error}") from error
    if completed.returncode != 0:
        words = last_words(completed.stderr or completed.stdout)
        raise LiteLLMUnavailable(f"{what} exited {completed.returncode}: {words}")


def last_words(output: str) -> str:
    """pip's error lines (its warnings about the local indexes left out), or its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return " / ".join(errors[-2:]) if errors else (lines[-1] if lines else "no output")


def installed_version(venv: Path) -> str:
    completed = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import importlib.metadata as m; print(m.version('litellm'))",
        ],
        capture_output=True,
        text=True,
        env=without_pythonpath(os.environ),
        check=False,
    )
    if completed.returncode != 0:
        raise LiteLLMUnavailable(f"litellm is not importable in {display(venv)}")
    return completed.stdout.strip()


def without_pythonpath(env: os._Environ[str] | dict[str, str]) -> dict[str, str]:
    """The environment without ``PYTHONPATH``: the venv imports nothing of the project's."""
    return {key: value for key, value in env.items() if key != "PYTHONPATH"}


def display(path: Path) -> str:
    try:
        return str(path.relative_to(REPO))
    except ValueError:
        return str(path)


def config_yaml(*, upstream_port: int, model: str, upstream_key: str) -> str:
    """LiteLLM's ``config.yaml``: ``model`` to the upstream, the master key, no database.

    Written by hand (YAML's JSON subset for the strings) so the bench's own venv needs
    no YAML library."""

    def quoted(text: str) -> str:
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'

    return "\n".join(
        [
            "model_list:",
            f"  - model_name: {quoted(model)}",
            "    litellm_params:",
            f"      model: {quoted('openai/' + model)}",
            f"      api_base: {quoted(f'http://127.0.0.1:{upstream_port}/v1')}",
            f"      api_key: {quoted(upstream_key)}",
            "general_settings:",
            f"  master_key: {quoted(MASTER_KEY)}",
            # No database_url: nothing is written per request. Both of these are the
            # production guide's; without a database they only skip building the rows.
            "  disable_spend_logs: true",
            "  disable_error_logs: true",
            "litellm_settings:",
            "  set_verbose: false",
            "",
        ]
    )


def proxy_command(installed: Installed, config: Path, port: int) -> list[str]:
    return [
        str(installed.command),
        *("--config", str(config)),
        *("--host", "127.0.0.1", "--port", str(port)),
        *("--num_workers", "1"),
    ]


def proxy_env(base: dict[str, str]) -> dict[str, str]:
    return {**without_pythonpath(base), **ENV}
