"""Isolated members (``isolate = true``): the member's module runs in a child
``p11-kit server`` that hashim starts, and hashim reaches it through a private copy of
p11-kit-client.so. Driven through the built module by an application signing in four
threads (tests/netns.py ``Signer``), with the emulated HSM (tests/fixtures/emuhsm.c) as
the isolated member's module, so it can crash (abort()) and hang on command.

* a crash ends only the member's child: the application signs on with zero errors and
  the member comes back with a new child;
* a hang is caught at the command timeout, the child is killed (every call stuck in it
  returns at once, shown at the Member level too) and the member comes back;
* the same crash in an in-process member kills the application: why isolation exists;
* no ``p11-kit server`` outlives the application, however it ends (C_Finalize, exit
  without it, abort, SIGKILL), and a forked child neither inherits nor kills them.

Keys: the signing key is put on every member token directly (tests/netns.py
``import_key``): p11-kit's RPC does not carry CKM_AES_KEY_WRAP(_PAD), so hashim cannot
replicate private keys to isolated members (see docs/remote-members.md).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests import softhsm
from tests.clients import emit, result, run_py  # noqa: F401  (emit used in snippets)
from tests.fixtures.build import build_emuhsm, read_stats, write_control
from tests.netns import (FAST, MemberSpec, Signer, domain_init, hashim_module, import_key,
                         make_signing_key, member_status, p11kit_processes, wait_for,
                         write_config)

REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.skipif(not shutil.which("p11-kit"), reason="p11-kit not installed"),
    pytest.mark.skipif(not os.path.exists(softhsm.SOFTHSM_LIB), reason="no SoftHSM2"),
]


class Setup:
    """Two members: ``emu`` (emulated HSM over its own SoftHSM2 token; isolated unless
    told otherwise) and ``plain`` (SoftHSM2; isolated unless told otherwise)."""

    def __init__(self, tmp: Path, emu_isolated: bool = True, plain_isolated: bool = True):
        self.tmp = tmp
        self.state = tmp / "state"
        self.log = tmp / "ha.log"
        emu_tok = softhsm.make_token(tmp / "tokens", "emu")
        plain_tok = softhsm.make_token(tmp / "tokens", "plain")
        lib = tmp / "libemuhsm.so"
        shutil.copyfile(build_emuhsm(tmp / ".emuhsm-build"), lib)
        self.control = tmp / "emu.control"
        write_control(self.control)
        self.stats = str(tmp / "emu-stats-{pid}")
        emu_env = dict(emu_tok.env, EMUHSM_BACKEND=emu_tok.lib,
                       EMUHSM_CONTROL=str(self.control), EMUHSM_STATS=self.stats)
        self.priv, self.pub = make_signing_key(tmp)
        for t in (emu_tok, plain_tok):
            import_key(t, self.priv)
        self.members = [MemberSpec("emu", str(lib), "emu", emu_env, emu_isolated),
                        MemberSpec("plain", plain_tok.lib, "plain", plain_tok.env,
                                   plain_isolated)]
        self.conf = write_config(tmp / "hashim.toml", self.members, label="ha-iso",
                                 state_dir=str(self.state), log=str(self.log), **FAST)
        domain_init(self.conf)
        self.module = hashim_module()

    def signer(self, **kw) -> Signer:
        return Signer.start(self.tmp / "app", self.conf, self.module, "ha-iso", self.pub, **kw)

    def fault(self, **keys):
        write_control(self.control, **keys)

    def status(self, pid: int, name: str) -> dict:
        return member_status(self.state, pid, name)

    def children(self, name: str) -> list[dict]:
        """Live processes of member ``name``'s child (sh, p11-kit server, p11-kit-remote),
        recognised by the member's module path on their command lines."""
        module = [m.module for m in self.members if m.name == name][0]
        return p11kit_processes(f" {module} ")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""


def _remote(procs: list[dict]) -> set[int]:
    return {p["pid"] for p in procs if p["comm"] == "p11-kit-remote"}


def _emu_signs(s: Setup) -> int:
    """C_Sign calls the emulated HSM received in its current child (its own counters,
    written by the module in the p11-kit-remote process that runs it)."""
    n = 0
    for pid in _remote(s.children("emu")):
        n += int(read_stats(s.stats.replace("{pid}", str(pid))).get("C_Sign", 0) or 0)
    return n


def _online_and_serving(s: Setup, app: Signer, more: int = 20):
    """Wait until member emu is online again and its new child has signed ``more``."""
    wait_for(lambda: s.status(app.pid, "emu").get("state") == "online", 20,
             "member emu back online")
    wait_for(lambda: _emu_signs(s) >= more, 20, "member emu serving again")


def test_crash_of_isolated_member_is_contained(tmp_path):
    s = Setup(tmp_path)
    app = s.signer(threads=4)
    try:
        app.wait_signing(200)
        wait_for(lambda: _emu_signs(s) > 20, 10, "emu serving")
        before = _remote(s.children("emu"))
        assert before, s.children("emu")
        assert s.status(app.pid, "emu").get("kind") == "isolated"

        s.fault(fault="crash")                      # the next command calls abort()
        wait_for(lambda: s.status(app.pid, "emu").get("state") != "online", 10,
                 "emu failed")
        s.fault(fault="none")
        app.wait_signing(200)                       # the other member carries on
        wait_for(lambda: not (before & _remote(s.children("emu"))), 10,
                 "the crashed child gone")
        _online_and_serving(s, app)          # a new child, serving
        after = _remote(s.children("emu"))
        assert after and not (after & before)
        app.wait_signing(100)
    finally:
        r = app.finish()
    assert r["errors"] == [], r["errors"][:5]
    assert r["ok"] > 500 and r["returncode"] == 0, (r, app.output())
    log = s.log_text()
    assert "member 'emu' failed" in log and "CKR_DEVICE_ERROR" in log, log[-3000:]
    assert s.children("emu") == [] and s.children("plain") == []
    print(f"\ncrash: {r['ok']} signatures, 0 errors, longest call {r['max_ms']:.0f} ms")


def test_hang_of_isolated_member_kills_its_child(tmp_path):
    s = Setup(tmp_path)
    app = s.signer(threads=4)
    try:
        app.wait_signing(200)
        wait_for(lambda: _emu_signs(s) > 20, 10, "emu serving")
        before = _remote(s.children("emu"))
        assert before

        t0 = time.monotonic()
        s.fault(fault="hang")                       # every command blocks
        wait_for(lambda: s.status(app.pid, "emu").get("state") != "online", 15,
                 "emu failed at the command timeout")
        t_failed = time.monotonic() - t0
        # the hung child is killed (not waited for): whatever was stuck in it returns
        wait_for(lambda: not (before & _remote(s.children("emu"))), 10,
                 "the hung child killed")
        t_killed = time.monotonic() - t0
        app.wait_signing(200)
        s.fault(fault="none")
        _online_and_serving(s, app)
        app.wait_signing(100)
    finally:
        r = app.finish()
    assert r["errors"] == [], r["errors"][:5]
    assert r["returncode"] == 0, app.output()
    # command_timeout 2 s (+ heartbeat slices and a probe): failed in time, not hung
    # forever; the child killed as the member failed (the supervisor's terminate_child);
    # no application call waited much longer than the command timeout
    assert t_failed < 6, t_failed
    assert t_killed - t_failed < 1.5, (t_failed, t_killed)
    assert r["max_ms"] < 4000, r["max_ms"]
    assert "no answer" in s.log_text() or "abandoned" in s.log_text(), s.log_text()[-3000:]
    print(f"\nhang: failed after {t_failed:.1f} s, child killed after {t_killed:.1f} s, "
          f"{r['ok']} signatures, 0 errors, longest call {r['max_ms']:.0f} ms")


STUCK = r"""
import os, threading, time
from tests.clients import emit
from shim import config as C
from shim.members.member import Member
from shim.members.module import ffi
from tests.fixtures.build import write_control
cfg = C.load(ARGS["conf"])
mc = [m for m in cfg.members if m.name == "emu"][0]
m = Member(mc, os.path.join(cfg.group.state_dir, "lib"))
m.start()
pid1 = m.child.pid
buf = ffi.new("CK_BYTE[32]")
assert m.f["C_GenerateRandom"](m.anchor, buf, 32) == 0
write_control(ARGS["control"], fault="hang")
time.sleep(0.2)
done = []
def call():
    b = ffi.new("CK_BYTE[32]")
    rv = m.f["C_GenerateRandom"](m.anchor, b, 32)
    done.append((rv, time.monotonic()))
ts = [threading.Thread(target=call) for _ in range(4)]
for t in ts:
    t.start()
time.sleep(1.0)
stuck = 4 - len(done)
t0 = time.monotonic()
m.terminate_child()
for t in ts:
    t.join(10)
returned = [round(t - t0, 3) for rv, t in done]
rvs = sorted({rv for rv, t in done})
write_control(ARGS["control"], fault="none")
m.state = "recovering"
m.stop()
m.start()                           # recovery: a new child, a fresh client instance
pid2 = m.child.pid
rv2 = m.f["C_GenerateRandom"](m.anchor, buf, 32)
m.state = "online"
m.stop()
emit({"stuck": stuck, "returned_after": returned, "rvs": rvs, "pid1": pid1, "pid2": pid2,
      "rv2": rv2, "alive_after_stop": m.child.alive()})
"""


def test_stuck_calls_return_when_the_child_is_killed(tmp_path):
    """Member level: four calls blocked in a hung isolated member all return
    CKR_DEVICE_ERROR as soon as terminate_child() kills the child; stop + start then
    gives the member a new child that serves."""
    s = Setup(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HASHIM_")}
    out = result(run_py(STUCK, env, {"conf": str(s.conf), "control": str(s.control)},
                        timeout=60))
    assert out["stuck"] == 4, out
    assert out["rvs"] == [0x30], out                # CKR_DEVICE_ERROR
    assert max(out["returned_after"]) < 0.5, out
    assert out["pid1"] != out["pid2"] and out["rv2"] == 0, out
    assert out["alive_after_stop"] is False
    assert s.children("emu") == []


def test_crash_of_in_process_member_kills_the_application(tmp_path):
    """Without isolation the member's abort() is the application's: this is what
    ``isolate = true`` is for."""
    s = Setup(tmp_path, emu_isolated=False, plain_isolated=False)
    app = s.signer(threads=4)
    try:
        app.wait_signing(200)
        stats = s.stats.replace("{pid}", str(app.pid))      # the module runs in the app
        wait_for(lambda: int(read_stats(stats).get("C_Sign", 0) or 0) > 20, 10, "emu serving")
        assert s.status(app.pid, "emu").get("kind") == "in process"
        s.fault(fault="crash")
        app.proc.wait(20)
    finally:
        app.kill()
    assert app.proc.returncode == -signal.SIGABRT, app.output()
    print(f"\nin-process crash: the application died with signal "
          f"{-app.proc.returncode} (SIGABRT) after {app.stats().get('ok')} signatures")


@pytest.mark.parametrize("how", ["finalize", "exit", "abort", "sigkill"])
def test_no_child_outlives_the_application(tmp_path, how):
    s = Setup(tmp_path)
    app = s.signer(threads=2, exit="wait" if how in ("abort", "sigkill") else how)
    try:
        app.wait_signing(50)
        procs = s.children("emu") + s.children("plain")
        assert len([p for p in procs if p["comm"] == "p11-kit-server"]) == 2, procs
        if how == "finalize" or how == "exit":
            r = app.finish()
            assert r["returncode"] == 0 and r["errors"] == []
        elif how == "abort":
            # a crash of the application itself: SIGABRT
            os.kill(app.pid, signal.SIGABRT)
            app.proc.wait(20)
        else:
            app.proc.kill()
            app.proc.wait(20)
    finally:
        app.kill()
    left = wait_for(lambda: (s.children("emu") + s.children("plain")) == [] or None, 5,
                    "no p11-kit server left")
    assert left


FORK = r"""
import os, json, time
from tests.clients import emit
import pkcs11
from pkcs11 import Mechanism, ObjectClass
from tests.clients import P11
lib = pkcs11.lib(MODULE_PATH)
tok = lib.get_token(token_label="ha-iso")
s = tok.open(user_pin="1234")
key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label="sig")
key.sign(b"x" * 32, mechanism=Mechanism.ECDSA)
from shim.members import isolated
parent_children = sorted(c.pid for c in isolated._children)
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    inherited = sorted(c.pid for c in isolated._children)
    p = P11(MODULE_PATH)
    rv = p.initialize()
    slot = p.find_slot("ha-iso")
    rv2, h = p.open_session(slot)
    from tests.clients import buf
    b = buf(32)
    rv3 = p.C_GenerateRandom(h, b, 32)
    own = sorted(c.pid for c in isolated._children)
    os.write(w, json.dumps({"inherited": inherited, "init": rv, "random": rv3,
                            "own": own}).encode())
    os.close(w)
    os._exit(0)                    # no C_Finalize: its children must go with it
os.close(w)
data = b""
while True:
    chunk = os.read(r, 65536)
    if not chunk:
        break
    data += chunk
os.waitpid(pid, 0)
child = json.loads(data)
time.sleep(0.5)
def alive(p):
    try:
        with open(f"/proc/{p}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False
sig = key.sign(b"y" * 32, mechanism=Mechanism.ECDSA)
emit({"parent": parent_children, "child": child,
      "parent_alive": [alive(p) for p in parent_children],
      "child_alive": [alive(p) for p in child["own"]], "signed_after": len(sig)})
"""


def test_forked_child_does_not_inherit_children(tmp_path):
    s = Setup(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("HASHIM_")}
    env["HASHIM_CONF"] = str(s.conf)
    out = result(run_py(f"MODULE_PATH = {s.module!r}\n" + FORK, env, timeout=60))
    assert len(out["parent"]) == 2, out
    assert out["child"]["inherited"] == [], out          # nothing of the parent's
    assert out["child"]["init"] == 0 and out["child"]["random"] == 0, out
    assert len(out["child"]["own"]) == 2 and not set(out["child"]["own"]) & set(out["parent"])
    assert out["parent_alive"] == [True, True], out      # the child's exit left them alone
    assert out["child_alive"] == [False, False], out     # the child's own went with it
    assert out["signed_after"] == 64
    wait_for(lambda: (s.children("emu") + s.children("plain")) == [] or None, 5,
             "no p11-kit server left")
