"""Shared pytest fixtures: fresh SoftHSM2 tokens, hashim configs, and the
``target`` fixture that runs a test once against the token's own module
("direct") and once through hashim over a one-member group ("hashim").

The hashim module's path comes from ``python3 -c "import shim; print(shim.module_path())"``
(run once per session in a subprocess, so nothing is loaded into pytest itself);
``HASHIM_MODULE=/path/libhashim.so`` in the environment overrides it.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests import softhsm
from tests.clients import Target, base_env

REPO = Path(__file__).resolve().parent


def _module_path_cmd() -> list[str]:
    return [sys.executable, "-c", "import shim; print(shim.module_path())"]


@functools.lru_cache(maxsize=1)
def hashim_module() -> tuple[str | None, str]:
    """(path, "") when the hashim module is available, else (None, why)."""
    if os.environ.get("HASHIM_MODULE"):
        p = os.environ["HASHIM_MODULE"]
        return (p, "") if Path(p).is_file() else (None, f"HASHIM_MODULE={p} is not a file")
    env = base_env()
    env.pop("PYTHONPATH", None)
    try:
        p = subprocess.run(_module_path_cmd(), env=env, capture_output=True, text=True,
                           timeout=120, cwd="/")
    except subprocess.TimeoutExpired:
        return None, "shim.module_path() timed out"
    path = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    if p.returncode != 0 or not path:
        return None, ("`import shim; shim.module_path()` failed (is hashim pip-installed "
                      "and built?):\n" + p.stderr.strip()[-2000:])
    if not Path(path).is_file():
        return None, f"shim.module_path() returned {path!r}, which is not a file"
    return path, ""


def require_hashim() -> str:
    path, why = hashim_module()
    if path is None:
        pytest.fail(f"hashim module not available: {why}", pytrace=False)
    return path


@pytest.fixture
def token(tmp_path) -> softhsm.Token:
    """A fresh SoftHSM2 token (own directory, config and library copy)."""
    return softhsm.make_token(tmp_path / "tokens", "hashim-t0")


@pytest.fixture
def tokens3(tmp_path) -> list[softhsm.Token]:
    return [softhsm.make_token(tmp_path / "tokens", f"hashim-t{i}") for i in range(3)]


def make_hashim_env(tmp: Path, tokens: list[softhsm.Token], **group) -> dict[str, str]:
    module = require_hashim()
    tmp = Path(tmp)
    tmp.mkdir(parents=True, exist_ok=True)
    group.setdefault("label", "hashim-test")
    group.setdefault("log", str(tmp / "hashim-ha.log"))
    conf = softhsm.write_config(tmp / "hashim.toml", tokens, **group)
    return base_env(HASHIM_CONF=str(conf), HASHIM_MODULE=module)


@pytest.fixture
def hashim_env(tmp_path):
    """``hashim_env(tokens, **group)`` writes a hashim config over ``tokens``
    (group keys as in DESIGN.md, e.g. label=..., ha_only=False) and returns the
    env (HASHIM_CONF, HASHIM_MODULE = the module's path) for a client."""
    n = [0]

    def make(tokens, **group):
        n[0] += 1
        return make_hashim_env(tmp_path / f"hashim{n[0]}", list(tokens), **group)
    return make


def direct_target(tok: softhsm.Token, tmp: Path) -> Target:
    return Target(module=tok.lib, env=base_env(**tok.env), label=tok.label, pin=tok.pin,
                  kind="direct", token=tok, tmp=tmp)


def hashim_target(tok: softhsm.Token, tmp: Path) -> Target:
    env = make_hashim_env(tmp / "hashim", [tok], label=tok.label)
    return Target(module=env["HASHIM_MODULE"], env=env, label=tok.label, pin=tok.pin,
                  kind="hashim", token=tok, tmp=tmp)


def make_target(kind: str, tok: softhsm.Token, tmp: Path) -> Target:
    return direct_target(tok, tmp) if kind == "direct" else hashim_target(tok, tmp)


@pytest.fixture(params=["direct", "hashim"])
def target(request, token, tmp_path) -> Target:
    """(module, env, token_label, pin) for one fresh token, reached directly
    through its SoftHSM2 library or through hashim (one-member group whose label
    is the token's label, so URIs and --token-label work the same both ways)."""
    return make_target(request.param, token, tmp_path)


# --- soak tests (tests/test_soak.py): long, not in the default run ------------------------
# `python3 -m pytest -m soak tests/test_soak.py` runs them (CI runs them as their own step).
def _register_soak_marker(config):
    config.addinivalue_line(
        "markers", "soak: long-running test, deselected unless selected with -m soak")


def _deselect_soak(config, items):
    if "soak" in (config.getoption("-m") or ""):
        return
    keep = [i for i in items if i.get_closest_marker("soak") is None]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep


def pytest_configure(config):
    _register_soak_marker(config)


def pytest_collection_modifyitems(config, items):
    _deselect_soak(config, items)
