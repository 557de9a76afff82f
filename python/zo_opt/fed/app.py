"""The Flower app directory: ``write_app_dir(path, **overrides)`` writes the ``pyproject.toml``
that ``flwr run PATH CONNECTION`` needs (flwr 1.42, FAB format 0).

The components are the installed ``zo_opt.fed.server_app:app`` and
``zo_opt.fed.client_app:app``; the run config below is the default of every setting (keys are
``FedConfig`` fields with ``-`` for ``_``) and ``flwr run --run-config`` overrides it. No other
file is needed in the app directory, and no dependency is installed at run time (the SuperLink
runs with ``--disable-runtime-dependency-installation``; zo-opt[fed] must be in the
environment of the SuperLink and SuperNodes).
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .task import FedConfig

APP_NAME = "zo-opt-fed"


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    return '"' + str(v).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_config(**overrides) -> dict:
    """Run-config dict (hyphenated keys) from FedConfig defaults and ``overrides`` (field names)."""
    values = asdict(FedConfig())
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"unknown federated settings {sorted(unknown)}; known: {sorted(values)}")
    values.update(overrides)
    return {k.replace("_", "-"): type(asdict(FedConfig())[k])(v) for k, v in values.items()}


def pyproject_toml(**overrides) -> str:
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        f'name = "{APP_NAME}"',
        'version = "0.1.0"',
        'description = "Federated zeroth-order training (FedKSeed-style step records) with zo-opt"',
        'license = "Apache-2.0"',
        'dependencies = ["flwr>=1.42,<1.43", "zo-opt"]',
        "",
        "[tool.flwr.app]",
        'publisher = "zo-opt"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "zo_opt.fed.server_app:app"',
        'clientapp = "zo_opt.fed.client_app:app"',
        "",
        "[tool.flwr.app.config]",
    ]
    lines += [f"{k} = {_toml_value(v)}" for k, v in run_config(**overrides).items()]
    return "\n".join(lines) + "\n"


def write_app_dir(path, **overrides) -> Path:
    """Writes ``path/pyproject.toml`` (the whole Flower app) and returns ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "pyproject.toml").write_text(pyproject_toml(**overrides))
    return path
