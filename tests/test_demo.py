"""``hashim demo``: a SoftHSM2 group behind the HA slot, driven by real clients."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shim import config as cfg
from tests import softhsm

REPO = str(Path(__file__).resolve().parent.parent)

pytestmark = pytest.mark.skipif(
    not shutil.which("softhsm2-util") or not shutil.which("pkcs11-tool")
    or not os.path.exists(softhsm.SOFTHSM_LIB), reason="SoftHSM2 / OpenSC not installed")


def demo(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HASHIM_") and k != "SOFTHSM2_CONF"}
    env["TMPDIR"] = str(tmp_path)
    # a config the demo must not touch or use
    env["HASHIM_CONF"] = str(tmp_path / "not-this.toml")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "shim.cli", "demo", *args], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=120,
                       stdin=subprocess.DEVNULL)
    return r, time.monotonic() - t0


def test_demo(tmp_path):
    r, seconds = demo(tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert seconds < 60
    out = r.stdout
    lines = [l.strip() for l in out.splitlines()]
    for i in range(1, 9):
        assert any(l.startswith(f"[{i}/8] ") for l in lines), i
    assert "FAILED" not in out
    assert lines.count("ok") == 0 and sum(l.startswith("ok (") for l in lines) == 8
    for m in ("hsm-a", "hsm-b", "hsm-c"):
        assert re.search(rf"^\s*{m}: domain key created \(check value [0-9a-f]{{6}}\)$", out,
                         re.M), m
    assert "pkcs11-tool sees 1 slot(s): Slot 0 (0x0) token 'demo-ha'" in out
    assert "generated EC P-256 key pair 'demo-ec'" in out
    assert "verified: Signature is valid" in out
    # what the listing observed, in the documented form (replication decides yes / no)
    m = re.search(r"^\s*key on hsm-a: (.+), hsm-b: (.+), hsm-c: (.+)$", out, re.M)
    assert m, out
    assert m.group(1) == "yes"
    for v in m.groups():
        assert v in ("yes", "no", "no (public key only)", "private key only")
    assert "python-pkcs11: 4 threads signed 100 digests through the HA slot" in out
    assert "100 of 100 signatures verify" in out
    assert lines[-1].startswith("demo ok: all 8 steps worked")
    # the temporary directory is gone, the user's config untouched
    d = re.search(r"^  directory: (\S+)", out, re.M).group(1)
    assert d.startswith(str(tmp_path)) and not os.path.exists(d)
    assert not (tmp_path / "not-this.toml").exists()


def test_demo_dir_keep(tmp_path):
    d = tmp_path / "demo"
    r, _ = demo(tmp_path, "--dir", str(d), "--keep")
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"kept {d}" in r.stdout
    c = cfg.load(str(d / "hashim.toml"))
    assert c.group.label == "demo-ha" and c.member_names == ("hsm-a", "hsm-b", "hsm-c")
    assert all(m.private_instance for m in c.members)
    assert all(m.env["SOFTHSM2_CONF"] == str(d / m.name / "softhsm2.conf")
               for m in c.members)
    # the kept group still works: the domain key agrees on every member
    env = {k: v for k, v in os.environ.items() if not k.startswith("HASHIM_")}
    r = subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(d / "hashim.toml"),
                        "domain", "check"], env=env, cwd=REPO, capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr

    # a non-empty --dir is refused
    r, _ = demo(tmp_path, "--dir", str(d))
    assert r.returncode == 2 and "not empty" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_demo_dir_removed_without_keep(tmp_path):
    d = tmp_path / "demo2"
    d.mkdir()
    r, _ = demo(tmp_path, "--dir", str(d))
    assert r.returncode == 0, r.stdout + r.stderr
    assert d.is_dir() and list(d.iterdir()) == []
