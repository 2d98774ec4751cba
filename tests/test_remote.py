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
