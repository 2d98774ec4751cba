"""Remote members across "hosts": each member token is served by ``p11-kit server`` in
its own network namespace, behind a mutually authenticated TLS tunnel (socat, a CA and
certificates made here), reached from the application's side through a local unix
socket (socat UNIX-LISTEN -> OPENSSL). The group's members are p11-kit-client.so with
``P11_KIT_SERVER_ADDRESS`` pointing at those sockets.

An application signs in four threads through the HA slot while links are cut (the TLS
listener killed: connections reset; the veth taken down: packets vanish silently) and
stalled (the p11-kit server SIGSTOPped: the link stays up, nothing answers), then
brought back: failover and recovery with zero single-part errors.

Without network namespaces the same runs over 127.0.0.1 (and says so); the veth
scenario is then skipped.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import softhsm
from tests.netns import (FAST, P11KIT_CLIENT, PKI, Host, LocalEnd, MemberSpec, Signer,
                         domain_init, hashim_module, import_key, make_signing_key,
                         member_status, wait_for, why_no_netns, write_config)

pytestmark = [
    pytest.mark.skipif(not shutil.which("p11-kit") or not os.path.exists(P11KIT_CLIENT),
                       reason="p11-kit / p11-kit-modules not installed"),
    pytest.mark.skipif(not shutil.which("socat"), reason="socat not installed"),
    pytest.mark.skipif(not os.path.exists(softhsm.SOFTHSM_LIB), reason="no SoftHSM2"),
]


class Hosts:
    """Three HSM hosts (a, b, c) and the application's ends of their tunnels."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        why = why_no_netns()
        self.netns = why == ""
        print(f"\nremote members: {'network namespaces + veth pairs' if self.netns else 'LOOPBACK FALLBACK (' + why + ')'}"
              ", TLS (socat OPENSSL, client certificates)")
        self.pki = PKI(tmp / "pki")
        self.priv, self.pub = make_signing_key(tmp)
        self.hosts, self.ends = {}, {}
        try:
            for i, n in enumerate(("a", "b", "c")):
                tok = softhsm.make_token(tmp / "tokens", f"hsm-{n}")
                import_key(tok, self.priv)
                h = self.hosts[n] = Host(tmp, f"hsm-{n}", i + 1, tok, self.pki,
                                         use_netns=self.netns)
                h.start()
                e = self.ends[n] = LocalEnd(tmp, h, self.pki)
                e.start()
        except BaseException:
            self.close()
            raise
        self.state = tmp / "state"
        members = [MemberSpec(f"hsm-{n}", P11KIT_CLIENT, f"hsm-{n}",
                              {"P11_KIT_SERVER_ADDRESS": e.address})
                   for n, e in self.ends.items()]
        self.conf = write_config(tmp / "hashim.toml", members, label="ha-remote",
                                 state_dir=str(self.state), log=str(tmp / "ha.log"), **FAST)
        domain_init(self.conf)
        self.module = hashim_module()

    def signer(self, **kw) -> Signer:
        return Signer.start(self.tmp / "app", self.conf, self.module, "ha-remote", self.pub,
                            **kw)

    def state_of(self, app: Signer, n: str) -> dict:
        return member_status(self.state, app.pid, f"hsm-{n}")

    def close(self):
        for e in self.ends.values():
            e.close()
        for h in self.hosts.values():
            h.close()


@pytest.fixture
def hosts(tmp_path):
    h = Hosts(tmp_path)
    yield h
    h.close()


def _served(hosts, app, n) -> int:
    return hosts.state_of(app, n).get("served") or 0


def _down_then_back(hosts: Hosts, app: Signer, n: str, cut, restore, what: str) -> dict:
    """Apply ``cut`` to member n's link; the member must fail while the application
    keeps signing; ``restore`` it; the member must come back and serve."""
    app.wait_signing(100)
    t0 = time.monotonic()
    cut()
    wait_for(lambda: hosts.state_of(app, n).get("state") not in (None, "online"), 15,
             f"hsm-{n} failed ({what})")
    detected = time.monotonic() - t0
    app.wait_signing(200)                          # the others carry the load
    restore()
    t1 = time.monotonic()
    wait_for(lambda: hosts.state_of(app, n).get("state") == "online", 30,
             f"hsm-{n} back online after {what}")
    back = time.monotonic() - t1
    base = _served(hosts, app, n)
    wait_for(lambda: _served(hosts, app, n) >= base + 20, 20, f"hsm-{n} serving again")
    return {"what": what, "detected_s": round(detected, 2), "back_s": round(back, 2)}


def test_cut_and_stalled_links_fail_over_and_recover(hosts):
    app = hosts.signer(threads=4)
    seen = []
    try:
        app.wait_signing(200)
        for n in "abc":
            assert hosts.state_of(app, n).get("kind") == "remote"
            wait_for(lambda: _served(hosts, app, n) > 10, 10, f"hsm-{n} serving")
        a, b, c = (hosts.hosts[n] for n in "abc")
        seen.append(_down_then_back(hosts, app, "a", a.kill_tunnel, a.start_tunnel,
                                    "TLS tunnel killed"))
        seen.append(_down_then_back(hosts, app, "b", b.stall, b.resume,
                                    "p11-kit server stopped (SIGSTOP)"))
        if hosts.netns:
            seen.append(_down_then_back(hosts, app, "c", c.link_down, c.link_up,
                                        "veth link down"))
        else:
            print("loopback fallback: no veth to take down")
        app.wait_signing(200)
    finally:
        r = app.finish()
    for s in seen:
        print(f"  {s['what']:36s} member failed after {s['detected_s']:5.2f} s, "
              f"back {s['back_s']:5.2f} s after the link returned")
    print(f"  {r['ok']} signatures, {len(r['errors'])} errors, longest call {r['max_ms']:.0f} ms")
    assert r["errors"] == [], r["errors"][:5]
    assert r["returncode"] == 0, app.output()
    # a reset link fails at once; silent ones at the command timeout (2 s) + a probe
    assert seen[0]["detected_s"] < 2.5, seen
    assert all(s["detected_s"] < 8 for s in seen), seen


# ---------------------------------------------------------------------------------------
# docs/remote-members.md, followed as written
DOC = Path(__file__).resolve().parent.parent / "docs" / "remote-members.md"
REPO = DOC.parent.parent


def doc_blocks() -> dict[str, str]:
    """The doc's ```sh blocks, by the tag on their first line (``# [tag]``)."""
    blocks, text = {}, DOC.read_text()
    parts = text.split("```sh\n")[1:]
    for p in parts:
        body = p.split("```", 1)[0]
        first = body.splitlines()[0].strip()
        assert first.startswith("# [") and first.endswith("]"), first
        blocks[first[3:-1]] = body
    return blocks


def parse_unit(path: Path) -> dict:
    """The [Service] keys of a systemd unit (repeated keys as lists)."""
    svc, section = {}, None
    for line in path.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif "=" in line and section == "[Service]":
            k, v = line.split("=", 1)
            svc.setdefault(k, []).append(v)
    return svc


def start_unit(unit: Path, base: Path, host: Host | None = None):
    """What systemd does for these units: RuntimeDirectory (with its mode), Environment,
    then ExecStart (on the HSM host: in its namespace). User= is this test's own (root)."""
    import shlex
    import stat as st_
    svc = parse_unit(unit)
    assert svc["User"][0] == "root", "the test runs the units as root"
    for d in svc.get("RuntimeDirectory", []):
        path = Path("/run") / d
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, int(svc.get("RuntimeDirectoryMode", ["0755"])[0], 8))
    env = dict(os.environ)
    for e in svc.get("Environment", []):
        k, v = e.split("=", 1)
        env[k] = v
    cmd = shlex.split(svc["ExecStart"][0])
    log = base / (unit.stem + ".log")
    if host is not None:
        return host.run_in(cmd, log, env)
    from tests.netns import _start
    return _start(cmd, log, env)


def test_docs_as_written(tmp_path):
    from tests.netns import wait_listening
    blocks = doc_blocks()
    for tag in ("site", "ca", "hsm-host", "hsm-host: start", "app-host", "app-host: start",
                "app-host: hashim"):
        assert tag in blocks, f"docs/remote-members.md lost its [{tag}] block"
    for tag in ("hsm-host: start", "app-host: start"):     # systemd, done by start_unit here
        assert all(l.startswith(("#", "systemctl ")) or not l.strip()
                   for l in blocks[tag].splitlines()), blocks[tag]

    local = softhsm.make_token(tmp_path / "tokens", "local")
    far = softhsm.make_token(tmp_path / "tokens", "doc-b")
    priv, pub = make_signing_key(tmp_path)
    for t in (local, far):
        import_key(t, priv)
    why = why_no_netns()
    host = Host(tmp_path, "hsm-doc", 5, far, None, use_netns=why == "")
    tag = os.getpid()
    sock_dir, app_dir = f"/run/hashim-doc-{tag}", f"/run/hashim-doc-tunnel-{tag}"
    site = {"HSM_NAME": "hsm-doc.test", "HSM_ADDR": host.ip, "PORT": str(host.port),
            "TOKEN": far.label, "MODULE": far.lib, "MODULE_ENV": f"SOFTHSM2_CONF={far.conf}",
            "HSM_USER": "root", "APP_USER": "root", "APP_NAME": "app-doc.test",
            "MEMBER": "hsm-b", "PKI": str(tmp_path / "pki"), "UNITS": str(tmp_path / "units"),
            "SOCK_DIR": sock_dir, "APP_SOCK_DIR": app_dir}
    (tmp_path / "units").mkdir()
    import shlex
    overrides = "".join(f"{k}={shlex.quote(v)}\n" for k, v in site.items())
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "hashim").write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} "
                                    "-m shim.cli \"$@\"\n")
    os.chmod(bin_dir / "hashim", 0o755)
    procs = []
    try:
        host.start_network()
        script = ("set -euo pipefail\n" + blocks["site"] + overrides + blocks["ca"]
                  + blocks["hsm-host"] + blocks["app-host"])
        r = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                           cwd=str(tmp_path), timeout=60)
        assert r.returncode == 0, r.stderr
        units = tmp_path / "units"
        procs.append(start_unit(units / "hashim-p11kit.service", tmp_path, host))
        wait_listening(path=f"{sock_dir}/pkcs11.sock")
        procs.append(start_unit(units / "hashim-tls.service", tmp_path, host))
        wait_listening(tcp=(None, host.port), netns=host.netns)
        procs.append(start_unit(units / f"hashim-tunnel-{far.label}.service", tmp_path))
        wait_listening(path=f"{app_dir}/p11.sock")
        assert os.stat(sock_dir).st_mode & 0o777 == 0o700
        assert os.stat(app_dir).st_mode & 0o777 == 0o700
        assert os.stat(f"{app_dir}/p11.sock").st_mode & 0o777 == 0o600

        # a group with one local member; the doc's commands add the remote one
        state = tmp_path / "state"
        conf = write_config(tmp_path / "hashim.toml",
                            [MemberSpec("local", local.lib, "local", local.env)],
                            label="ha-doc", state_dir=str(state), log=str(tmp_path / "ha.log"),
                            **FAST)
        domain_init(conf)
        env = {k: v for k, v in os.environ.items() if not k.startswith("HASHIM_")}
        env.update(PATH=f"{bin_dir}:{env['PATH']}", HASHIM_CONF=str(conf),
                   HASHIM_PIN=softhsm.PIN, HASHIM_SO_PIN=softhsm.SO_PIN)
        r = subprocess.run(["bash", "-c", "set -euo pipefail\n" + blocks["site"] + overrides
                            + blocks["app-host: hashim"]], capture_output=True, text=True,
                           env=env, stdin=subprocess.DEVNULL, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert 'name = "hsm-b"' in conf.read_text()

        app = Signer.start(tmp_path / "app", conf, hashim_module(), "ha-doc", pub, threads=4)
        try:
            app.wait_signing(300)
            assert member_status(state, app.pid, "hsm-b").get("kind") == "remote"
            wait_for(lambda: (member_status(state, app.pid, "hsm-b").get("served") or 0) > 20,
                     20, "the remote member serving")
        finally:
            res = app.finish()
        assert res["errors"] == [] and res["returncode"] == 0, (res, app.output())
        print(f"\ndocs/remote-members.md followed as written "
              f"({'network namespace' if host.netns else 'loopback: ' + why}): "
              f"{res['ok']} signatures through a local and a remote member, 0 errors")
    finally:
        from tests.netns import _killpg
        for p in procs:
            _killpg(p)
        host.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
        shutil.rmtree(app_dir, ignore_errors=True)
