"""Group administration while applications run (issue 5): replacing a member with the
``hashim`` command under a real signing workload, ``group synchronize --now``, and the
CLI's answers to good and bad input as a RUNNING module sees the change.

The workload is a separate application process (tests/clients.P11 through the HA slot):
one long-lived session logs in (the login is application-wide: the threads' own sessions,
opened without a PIN, are in the user state, and a second C_Login answers
CKR_USER_ALREADY_LOGGED_IN), then threads sign single-part (C_SignInit + C_Sign) in their
own sessions until told to stop, counting every return code. Member tokens are checked
DIRECTLY (each with its own SoftHSM2 library copy and SOFTHSM2_CONF, tests.groups), never
through hashim; "the removed member's token is no longer touched" is read from the
emulated HSM's per-process call counters (tests/fixtures/emuhsm.c).

Complements tests/test_cli.py (parsing, config edits and their one-line errors, without
modules) and tests/test_domain.py (domain key commands, the new-member check).

What a running application observed (see the tests):
* replacing the primary under 4 signing threads: no error, the new member serves
  signatures within a second of joining, the removed emulated HSM gets no call after
  "member 'old' left the group" (its C_Finalize is the last one);
* ``ha-only --disable``: C_GetSlotList of the running application lists the member slots
  (HA slot 0, members 1..n in configured order) at once; removing a member RENUMBERS the
  member slots after it (slot 2 was b, becomes c), a session already open on a member slot
  stays with its member; ``--enable`` refuses new sessions there (CKR_SLOT_ID_INVALID) but
  the open one keeps working;
* a config file that does not validate is logged ("configuration change ignored") and the
  module goes on with the one it had;
* engine bugs, as xfail tests: an idle session is stuck with CKR_OPERATION_ACTIVE after the
  member of its last (fast-path) operation left; a key generated while the group had one
  member can never be copied to a member added later; recovery settings changed while the
  module runs do not reach its supervisor.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests import softhsm
from tests.clients import REPO, K, base_env, wait_for
from tests.groups import (domain_init, hashim_cli, hashim_module, make_member,
                          write_group_config, Group)

pytestmark = pytest.mark.skipif(
    not shutil.which("softhsm2-util") or not os.path.exists(softhsm.SOFTHSM_LIB),
    reason="SoftHSM2 not installed")

PIN, SO_PIN = softhsm.PIN, softhsm.SO_PIN
HASH = bytes(range(32))


# --------------------------------------------------------------------------- helpers

def build_group(base: Path, members: list[tuple[str, bool]], *, label="admin-ha",
                domain=True, **group) -> Group:
    """A group over fresh tokens: ``(name, emu)`` per member, in order."""
    base.mkdir(parents=True, exist_ok=True)
    emu_lib = None
    if any(e for _, e in members):
        from tests.fixtures.build import build_emuhsm
        emu_lib = build_emuhsm(base / ".emuhsm-build")
    ms = [make_member(base, n, emu=e, emu_lib=emu_lib) for n, e in members]
    log = base / "ha.log"
    group.setdefault("state_dir", str(base / "state"))
    conf = write_group_config(base / "hashim.toml", ms, label=label, log=str(log), **group)
    g = Group(base, ms, conf, log, hashim_module(), label)
    if domain:
        domain_init(g)
    return g


def member_options(m) -> list[str]:
    out = ["--module", m.module, "--token-label", m.label]
    for k, v in m.env.items():
        out += ["--env", f"{k}={v}"]
    return out


def wait_log(g: Group, text: str, timeout: float = 20.0, after: int = 0) -> str:
    return wait_for(lambda: text in g.log_text()[after:], timeout,
                    f"{text!r} in the HA log:\n{g.log_text()[after:][-3000:]}")


def one_line(err: str) -> str:
    assert err.endswith("\n") and err.count("\n") == 1, repr(err)
    assert "Traceback" not in err
    return err.strip()


def labels(objs) -> set[tuple[int, str]]:
    """(class, label) of the application's objects (hashim's own left out)."""
    return {(o["CLASS"], o.get("LABEL", "")) for o in objs
            if o.get("LABEL") != "hashim-domain" and o.get("APPLICATION") != b"hashim".hex()}


# Through the HA slot (MODULE, LABEL, PIN bound by Group.run_py).
KEYS = r'''
import ctypes
from ctypes import byref
from tests.clients import Mechanism, buf, rv_name, ulong

P256 = bytes.fromhex("06082a8648ce3d030107")


def check(rv, what):
    if rv != 0:
        raise AssertionError(f"{what}: {rv_name(rv)}")


def connect():
    p = P11(MODULE)
    check(p.initialize(), "C_Initialize")
    slot = p.find_slot(LABEL)
    rv, s = p.open_session(slot)
    check(rv, "C_OpenSession")
    check(p.login(s, PIN), "C_Login")
    return p, slot, s


def keypair(p, s, kind, label):
    if kind == "ec":
        mech, extra = K.CKM_EC_KEY_PAIR_GEN, [(K.CKA_EC_PARAMS, P256)]
    else:
        mech, extra = K.CKM_RSA_PKCS_KEY_PAIR_GEN, [(K.CKA_MODULUS_BITS, 2048),
                                                    (K.CKA_PUBLIC_EXPONENT, b"\x01\x00\x01")]
    tpub = Template([(K.CKA_TOKEN, True), (K.CKA_LABEL, label), (K.CKA_ID, label.encode()),
                     (K.CKA_VERIFY, True)] + extra)
    tprv = Template([(K.CKA_TOKEN, True), (K.CKA_LABEL, label), (K.CKA_ID, label.encode()),
                     (K.CKA_PRIVATE, True), (K.CKA_SENSITIVE, True), (K.CKA_SIGN, True)])
    hpub, hprv = ulong(), ulong()
    check(p.C_GenerateKeyPair(s, Mechanism(mech).ptr, tpub.ptr, len(tpub), tprv.ptr,
                              len(tprv), byref(hpub), byref(hprv)), "C_GenerateKeyPair")
    return hpub.value, hprv.value


def aes(p, s, label):
    t = Template([(K.CKA_CLASS, K.CKO_SECRET_KEY), (K.CKA_KEY_TYPE, K.CKK_AES),
                  (K.CKA_TOKEN, True), (K.CKA_LABEL, label), (K.CKA_ID, label.encode()),
                  (K.CKA_VALUE_LEN, 32), (K.CKA_PRIVATE, True), (K.CKA_SENSITIVE, True),
                  (K.CKA_ENCRYPT, True), (K.CKA_DECRYPT, True)])
    h = ulong()
    check(p.C_GenerateKey(s, Mechanism(K.CKM_AES_KEY_GEN).ptr, t.ptr, len(t), byref(h)),
          "C_GenerateKey")
    return h.value


def make(p, s, specs):
    for kind, label in specs:
        if kind == "aes":
            aes(p, s, label)
        else:
            keypair(p, s, kind, label)
'''

MAKE_KEYS = KEYS + r'''
p, slot, s = connect()
make(p, s, ARGS)
p.C_Logout(s)
p.C_Finalize(None)
emit("made")
'''

# The application: a logged-in session, then THREADS threads signing in their own
# sessions (no PIN) until the file ARGS["stop"] exists. Progress (JSON) is rewritten
# into ARGS["progress"] every 0.1 s.
WORKLOAD = KEYS + r'''
import json, os, threading, time
stop, progress = ARGS["stop"], ARGS["progress"]
p, slot, s0 = connect()
MECH = {"ec": K.CKM_ECDSA, "rsa": K.CKM_SHA256_RSA_PKCS}
keys = []
for kind, label in ARGS["keys"]:
    t = Template([(K.CKA_CLASS, K.CKO_PRIVATE_KEY), (K.CKA_LABEL, label)])
    check(p.C_FindObjectsInit(s0, t.ptr, len(t)), "C_FindObjectsInit")
    arr, n = (ctypes.c_ulong * 4)(), ulong()
    check(p.C_FindObjects(s0, arr, 4, byref(n)), "C_FindObjects")
    check(p.C_FindObjectsFinal(s0), "C_FindObjectsFinal")
    assert n.value == 1, (label, n.value)
    keys.append((kind, label, arr[0]))
lock = threading.Lock()
ok = [0] * ARGS["threads"]
errors = {}
samples = []
relogin = []
states = []


def worker(i):
    rv, s = p.open_session(slot, rw=False)
    check(rv, "C_OpenSession (worker)")
    from tests.clients import CK_SESSION_INFO
    info = CK_SESSION_INFO()
    check(p.C_GetSessionInfo(s, byref(info)), "C_GetSessionInfo")
    states.append(int(info.state))
    if i == 0:
        relogin.append(rv_name(p.login(s, PIN)))
    n_out, out = ulong(), buf(512)
    j = 0
    while not os.path.exists(stop):
        kind, label, key = keys[(i + j) % len(keys)]
        j += 1
        data = HASH if kind == "ec" else b"message %d/%d" % (i, j)
        rv = p.C_SignInit(s, Mechanism(MECH[kind]).ptr, key)
        if rv == 0:
            n_out.value = 512
            rv = p.C_Sign(s, data, len(data), out, byref(n_out))
            what = "C_Sign"
        else:
            what = "C_SignInit"
        if rv != 0:
            with lock:
                e = errors.setdefault(f"{what}: {rv_name(rv)}", [0, time.time()])
                e[0] += 1
            continue
        ok[i] += 1
        if j % 97 == 0:
            with lock:
                samples.append((kind, label, data.hex(), out.raw[:n_out.value].hex(),
                                time.time()))
                del samples[:-40]
    p.C_CloseSession(s)


HASH = bytes(range(32))
threads = [threading.Thread(target=worker, args=(i,)) for i in range(ARGS["threads"])]
for t in threads:
    t.start()
while any(t.is_alive() for t in threads):
    tmp = progress + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"pid": os.getpid(), "ok": sum(ok), "errors": len(errors)}, f)
    os.replace(tmp, progress)
    time.sleep(0.1)
for t in threads:
    t.join()
check(p.C_Logout(s0), "C_Logout")
p.C_CloseSession(s0)
p.C_Finalize(None)
emit({"pid": os.getpid(), "ok": ok, "errors": errors, "samples": samples,
      "relogin": relogin, "states": states})
'''


class Workload:
    """The WORKLOAD snippet in a background process."""

    def __init__(self, g: Group, tmp: Path, keys, threads: int = 4):
        self.stop_file = tmp / "workload.stop"
        self.progress_file = tmp / "workload.progress"
        prelude = ("from tests.clients import emit, P11, Template, K, ulong\n"
                   f"MODULE, LABEL, PIN = {g.module!r}, {g.label!r}, {g.pin!r}\n")
        args = {"stop": str(self.stop_file), "progress": str(self.progress_file),
                "keys": keys, "threads": threads}
        prog = (f"import json as _json\nARGS = _json.loads({json.dumps(json.dumps(args))})\n"
                + prelude + WORKLOAD)
        env = dict(g.env)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.out_file = open(tmp / "workload.out", "w+")
        self.err_file = open(tmp / "workload.err", "w+")
        self.proc = subprocess.Popen([sys.executable, "-c", prog], env=env, cwd=str(REPO),
                                     stdout=self.out_file, stderr=self.err_file)

    def progress(self) -> dict:
        try:
            return json.loads(self.progress_file.read_text())
        except (OSError, ValueError):
            if self.proc.poll() is not None:
                raise AssertionError(f"the workload exited {self.proc.returncode}:\n"
                                     + self.stderr())
            return {}

    def stderr(self) -> str:
        self.err_file.seek(0)
        return self.err_file.read()[-6000:]

    def wait_ok(self, n: int, timeout: float = 30.0) -> dict:
        """Wait until ``n`` MORE signatures than now succeeded."""
        start = self.progress().get("ok", 0)
        return wait_for(lambda: (lambda p: p if p.get("ok", 0) >= start + n else None)(
            self.progress()), timeout, f"{n} more signatures from the workload")

    def finish(self, timeout: float = 60.0) -> dict:
        self.stop_file.touch()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the workload did not stop:\n" + self.stderr())
        from tests.clients import result
        self.out_file.seek(0)
        out = self.out_file.read()
        assert self.proc.returncode == 0, f"workload exited {self.proc.returncode}:\n" \
            + out[-2000:] + self.stderr()
        return result(out)

    def kill(self):
        if self.proc.poll() is None:
            self.stop_file.touch()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def verify(sample, pub) -> bool:
    """A workload signature checked with the public key read DIRECTLY from a token."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils
    kind, label, data, sig, _ = sample
    data, sig = bytes.fromhex(data), bytes.fromhex(sig)
    try:
        if kind == "ec":
            raw = bytes.fromhex(pub["EC_POINT"])[2:]
            key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), raw)
            half = len(sig) // 2
            der = utils.encode_dss_signature(int.from_bytes(sig[:half], "big"),
                                             int.from_bytes(sig[half:], "big"))
            key.verify(der, data, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        else:
            key = rsa.RSAPublicNumbers(int(pub["PUBLIC_EXPONENT"], 16),
                                       int(pub["MODULUS"], 16)).public_key()
            key.verify(sig, data, padding.PKCS1v15(), hashes.SHA256())
        return True
    except InvalidSignature:
        return False


def status_json(g: Group) -> dict:
    r = g.hashim("status", "--json")
    assert r.returncode in (0, 1), r.stderr
    return json.loads(r.stdout)


# =========================================================================== replacement

def test_replace_a_member_under_a_signing_workload(tmp_path):
    """remove-member (the primary, an emulated HSM), domain add-member, add-member while
    4 threads sign through the HA slot: zero errors, the new member ends with every key
    (checked on its token directly), the removed member's token is no longer called."""
    g = build_group(tmp_path / "g", [("old", True), ("b", False)])
    old, b = g.members
    new = make_member(tmp_path / "g", "new")          # a fresh token, not in the group
    keys = [("ec", "k1"), ("rsa", "k2")]
    g.run_py(MAKE_KEYS, keys + [("aes", "k3")])
    before = labels(b.objects())
    assert {(K.CKO_PRIVATE_KEY, "k1"), (K.CKO_PRIVATE_KEY, "k2"),
            (K.CKO_SECRET_KEY, "k3")} <= before
    assert labels(old.objects()) == before

    w = Workload(g, tmp_path, keys)
    try:
        w.wait_ok(300)
        pid = w.progress()["pid"]
        assert old.stats(pid).get("commands", 0) > 0      # the old primary did serve

        # 1. forget the old member (it is the primary: key management moves to b)
        mark = len(g.log_text())
        r = g.hashim("group", "remove-member", "old")
        assert r.returncode == 0, r.stderr
        assert r.stdout == (f"removed member 'old' from group 'admin-ha' in {g.conf}; "
                            "members: b\n")
        wait_log(g, "member 'old' left the group", after=mark)
        gone = old.stats(pid)
        w.wait_ok(300)

        # 2. the domain key onto the new token, from a member
        r = g.hashim("domain", "add-member", "new", *member_options(new))
        assert r.returncode == 0, r.stderr
        assert "new: domain key copied from b (check value " in r.stdout
        assert "next: hashim group add-member new --module" in r.stdout

        # 3. add it: checked, written; the running module starts it, logs it in, syncs it
        mark = len(g.log_text())
        r = hashim_cli(g.conf, "group", "add-member", "new", *member_options(new),
                       so_pin=None, pin=PIN)
        assert r.returncode == 0, r.stderr
        assert r.stdout == (f"added member 'new' to group 'admin-ha' in {g.conf} "
                            "(position 2 of 2)\n")
        wait_log(g, "member 'new' joined the group", after=mark)
        log = g.log_text()[mark:]
        for label in ("k1", "k2"):
            assert f"sync: copied private key '{label}' to member 'new'" in log, log
        assert "sync: copied secret key 'k3' to member 'new'" in log, log
        w.wait_ok(600)
        g.run_py(MAKE_KEYS, [("rsa", "k-after")])       # replicated as it is made
        st = status_json(g)
        w.wait_ok(200)
        assert old.stats(pid) == gone, "the removed member's token was called again"
        res = w.finish()
    finally:
        w.kill()

    assert res["errors"] == {}, (
        res["errors"], "CKR_OPERATION_ACTIVE at C_SignInit after the member left: see "
        "test_an_idle_session_signs_again_after_its_member_left (engine bug)"
        if any("CKR_OPERATION_ACTIVE" in e for e in res["errors"]) else "")
    assert sum(res["ok"]) > 1400 and all(res["ok"]), res["ok"]
    assert res["relogin"] == ["CKR_USER_ALREADY_LOGGED_IN"]
    assert set(res["states"]) == {K.CKS_RO_USER_FUNCTIONS}

    # the status: b primary, new online and serving; old gone
    ms = {m["name"]: m for m in st["members"]}
    assert st["primary"] == "b" and st["processes"] >= 1
    assert ms["new"]["state"] == "online" and ms["new"]["served"] > 0, ms["new"]
    assert "old" not in ms or ms["old"].get("configured") is False, ms

    # every key on the new token, read directly
    have_b, have_new = labels(b.objects()), labels(new.objects())
    want = before | {(K.CKO_PRIVATE_KEY, "k-after"), (K.CKO_PUBLIC_KEY, "k-after")}
    assert want <= have_b and have_new == have_b, (want - have_new, have_new ^ have_b)
    # the old token kept what it had and got nothing after its removal
    assert labels(old.objects()) == before
    assert old.stats(pid) == gone

    # the signatures made before, during and after the replacement verify
    pubs = {o["LABEL"]: o for o in new.objects(CLASS=K.CKO_PUBLIC_KEY)}
    assert res["samples"]
    bad = [s for s in res["samples"] if not verify(s, pubs[s[1]])]
    assert not bad, bad


# --------------------------------------------------------------------------- an application to ask
# A running application that answers one JSON request per line (stdin -> stdout): it is
# initialised and logged in (session s0) before the first request.
APP = KEYS + r'''
import json, sys
from tests.clients import CK_SLOT_INFO, CK_TOKEN_INFO
p, slot, s0 = connect()
sessions = {}


def token_label(sl):
    ti = CK_TOKEN_INFO()
    rv = p.C_GetTokenInfo(sl, byref(ti))
    return ti.label.decode().rstrip() if rv == 0 else rv_name(rv)


def sign(s, label):
    t = Template([(K.CKA_CLASS, K.CKO_PRIVATE_KEY), (K.CKA_LABEL, label)])
    check(p.C_FindObjectsInit(s, t.ptr, len(t)), "C_FindObjectsInit")
    arr, n = (ctypes.c_ulong * 4)(), ulong()
    check(p.C_FindObjects(s, arr, 4, byref(n)), "C_FindObjects")
    check(p.C_FindObjectsFinal(s), "C_FindObjectsFinal")
    if n.value != 1:
        return f"{n.value} keys labelled {label}"
    rv = p.C_SignInit(s, Mechanism(K.CKM_ECDSA).ptr, arr[0])
    if rv:
        return rv_name(rv)
    n_out, out = ulong(256), buf(256)
    return rv_name(p.C_Sign(s, bytes(32), 32, out, byref(n_out)))


print(json.dumps({"ready": os.getpid()}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    op = req["op"]
    if op == "slots":
        res = {"present": p.slot_list(True)[1], "all": p.slot_list(False)[1]}
        res["labels"] = {str(sl): token_label(sl) for sl in res["all"]}
    elif op == "open":
        rv, h = p.open_session(req["slot"], rw=False)
        res = {"rv": rv_name(rv), "session": h}
    elif op == "sign":
        res = {"rv": sign(req.get("session", s0), req["label"])}
    elif op == "quit":
        break
    print(json.dumps(res), flush=True)
p.C_Finalize(None)
'''


class App:
    """The APP snippet in a background process: ``app.ask(op=..., ...)``."""

    def __init__(self, g: Group):
        prelude = ("import os\nfrom tests.clients import emit, P11, Template, K, ulong\n"
                   f"MODULE, LABEL, PIN = {g.module!r}, {g.label!r}, {g.pin!r}\n")
        env = dict(g.env)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        self.proc = subprocess.Popen([sys.executable, "-c", prelude + APP], env=env,
                                     cwd=str(REPO), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.pid = self._read()["ready"]

    def _read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the application exited {self.proc.wait()}:\n"
                                 + self.proc.stderr.read()[-4000:])
        return json.loads(line)

    def ask(self, **req) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write('{"op": "quit"}\n')
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()


# =========================================================================== a running module sees
# the CLI's changes

def test_ha_only_and_members_seen_by_a_running_application(tmp_path):
    """``group ha-only --disable`` shows the members' own slots to an application that is
    already running (C_GetSlotList, then a new session on a member's slot, signing in it);
    removing a member renumbers the member slots after it (observed: member slot ids are
    positions, only the HA slot's id is stable); ``--enable`` hides them again from new
    sessions while a session already open on a member slot keeps working; a config file
    that does not validate is ignored by the running module, which keeps serving."""
    g = build_group(tmp_path / "g", [("a", False), ("b", False), ("c", False)])
    g.run_py(MAKE_KEYS, [("ec", "ks")])
    app = App(g)
    try:
        assert app.ask(op="slots") == {"present": [0], "all": [0],
                                       "labels": {"0": "admin-ha"}}

        def cli(*argv, wait="configuration reloaded"):
            mark = len(g.log_text())
            r = g.hashim(*argv)
            assert r.returncode == 0 and r.stderr == "", r.stderr
            wait_log(g, wait, after=mark)
            return r.stdout

        out = cli("group", "ha-only", "--disable")
        assert out == f"ha_only = false in group 'admin-ha' ({g.conf})\n"
        assert "changed ha_only; members now a, b, c" in g.log_text()
        assert app.ask(op="slots") == {"present": [0, 1, 2, 3], "all": [0, 1, 2, 3], "labels": {
            "0": "admin-ha", "1": "a", "2": "b", "3": "c"}}
        on_b = app.ask(op="open", slot=2)
        assert on_b["rv"] == "CKR_OK"
        assert app.ask(op="sign", session=on_b["session"], label="ks") == {"rv": "CKR_OK"}

        cli("group", "remove-member", "a", wait="member 'a' left the group")
        assert app.ask(op="slots")["labels"] == {"0": "admin-ha", "1": "b", "2": "c"}
        assert app.ask(op="sign", session=on_b["session"], label="ks") == {"rv": "CKR_OK"}

        cli("group", "ha-only", "--enable")
        assert app.ask(op="slots") == {"present": [0], "all": [0],
                                       "labels": {"0": "admin-ha"}}
        assert app.ask(op="open", slot=1)["rv"] == "CKR_SLOT_ID_INVALID"
        assert app.ask(op="sign", session=on_b["session"], label="ks") == {"rv": "CKR_OK"}
        fresh = app.ask(op="open", slot=0)
        assert app.ask(op="sign", session=fresh["session"], label="ks") == {"rv": "CKR_OK"}

        # a hand edit that does not validate: logged, ignored, the module keeps serving
        mark = len(g.log_text())
        g.conf.write_text(g.conf.read_text().replace("[group]", "[group]\nha_only = maybe"))
        wait_log(g, "configuration change ignored", after=mark)
        assert app.ask(op="slots")["all"] == [0]
        assert app.ask(op="sign", session=fresh["session"], label="ks") == {"rv": "CKR_OK"}
        r = g.hashim("group", "show")
        assert r.returncode == 2 and "ha_only" in one_line(r.stderr)
    finally:
        app.close()


def test_an_idle_session_signs_again_after_its_member_left(tmp_path):
    """A session that signed (through the fast path) on a member, then sat idle while that
    member was removed, signs again."""
    g = build_group(tmp_path / "g", [("a", False), ("b", False)])
    g.run_py(MAKE_KEYS, [("ec", "ks")])
    b = g.members[1]
    assert g.hashim("group", "remove-member", "b").returncode == 0
    app = App(g)                          # a alone: the session signs on a
    try:
        assert [app.ask(op="sign", label="ks")["rv"] for _ in range(2)] == ["CKR_OK"] * 2
        mark = len(g.log_text())
        r = hashim_cli(g.conf, "group", "add-member", "b", *member_options(b), pin=PIN)
        assert r.returncode == 0, r.stderr
        wait_log(g, "member 'b' joined the group", after=mark)
        mark = len(g.log_text())
        assert g.hashim("group", "remove-member", "a").returncode == 0
        wait_log(g, "member 'a' left the group", after=mark)
        assert [app.ask(op="sign", label="ks")["rv"] for _ in range(3)] == ["CKR_OK"] * 3
    finally:
        app.close()


# =========================================================================== synchronize --now
# On a member token directly (LIB, LABEL, PIN bound by GroupMember.run_direct).
DIRECT = r'''
from ctypes import byref
from tests.clients import Mechanism, rv_name
p = P11(LIB)
assert p.initialize() == 0
rv, s = p.open_session(p.find_slot(LABEL))
assert rv == 0 and p.login(s, PIN) == 0
made = []
for kind, label, extractable in ARGS.get("make", []):
    if kind == "aes":
        t = Template([(K.CKA_CLASS, K.CKO_SECRET_KEY), (K.CKA_KEY_TYPE, K.CKK_AES),
                      (K.CKA_TOKEN, True), (K.CKA_LABEL, label), (K.CKA_ID, label.encode()),
                      (K.CKA_VALUE_LEN, 32), (K.CKA_PRIVATE, True), (K.CKA_SENSITIVE, True),
                      (K.CKA_EXTRACTABLE, extractable), (K.CKA_ENCRYPT, True)])
        h = ulong()
        rv = p.C_GenerateKey(s, Mechanism(K.CKM_AES_KEY_GEN).ptr, t.ptr, len(t), byref(h))
    else:
        rv, h = p.create(s, [(K.CKA_CLASS, K.CKO_DATA), (K.CKA_TOKEN, True),
                             (K.CKA_PRIVATE, True), (K.CKA_LABEL, label),
                             (K.CKA_APPLICATION, "admin-test"), (K.CKA_VALUE, b"payload")])
    made.append(rv_name(rv))
for label in ARGS.get("destroy", []):
    rv, hs = p.find(s, [(K.CKA_LABEL, label)])
    for h in hs:
        made.append(rv_name(p.C_DestroyObject(s, h)))
p.C_Finalize(None)
emit(made)
'''

DESTROY = KEYS + r'''
p, slot, s = connect()
t = Template([(K.CKA_LABEL, ARGS)])
check(p.C_FindObjectsInit(s, t.ptr, len(t)), "C_FindObjectsInit")
arr, n = (ctypes.c_ulong * 8)(), ulong()
check(p.C_FindObjects(s, arr, 8, byref(n)), "C_FindObjects")
check(p.C_FindObjectsFinal(s), "C_FindObjectsFinal")
out = [rv_name(p.C_DestroyObject(s, arr[i])) for i in range(n.value)]
p.C_Finalize(None)
emit(out)
'''


def sync_now(g: Group, *args: str, pin: str | None = PIN):
    return hashim_cli(g.conf, "group", "synchronize", "--now", *args, so_pin=None, pin=pin)


def test_synchronize_now(tmp_path):
    """Copies what a member holds to the members that lack it, destroys on a member what
    was destroyed through the HA slot while it was away, says what it could not copy and
    why, names a member it could not reach, exits 1 until everything is in sync, then 0;
    --pin-file; synchronize = false does not stop it; the run is in the HA log."""
    g = build_group(tmp_path / "g", [("a", False), ("b", False), ("c", False)])
    a, b, c = g.members
    g.run_py(MAKE_KEYS, [("ec", "k-gone")])
    # c away (out of the config) while k-gone is destroyed through the HA slot
    assert g.hashim("group", "remove-member", "c").returncode == 0
    assert g.run_py(DESTROY, "k-gone") == ["CKR_OK", "CKR_OK"]
    assert (K.CKO_PRIVATE_KEY, "k-gone") in labels(c.objects())
    r = hashim_cli(g.conf, "group", "add-member", "c", *member_options(c), pin=PIN)
    assert r.returncode == 0, r.stderr
    # objects made on a directly, behind the group's back
    assert a.run_direct(DIRECT, {"make": [["aes", "d-aes", True], ["aes", "d-raw", False],
                                          ["data", "d-data", None]]}) == ["CKR_OK"] * 3
    # a member that cannot be reached (no such token)
    r = hashim_cli(g.conf, "group", "add-member", "d", "--module", a.module,
                   "--token-label", "no-such-token", "--env", f"SOFTHSM2_CONF={a.token.conf}",
                   "--no-check")
    assert r.returncode == 0, r.stderr
    assert g.hashim("group", "synchronize", "--disable").returncode == 0

    # refused: no PIN (2), a wrong PIN (1, tried on the primary only), nothing copied
    r = sync_now(g, pin=None)
    assert r.returncode == 2 and r.stdout == ""
    assert one_line(r.stderr) == ("hashim: no user PIN: set HASHIM_PIN, give --pin-file "
                                  "FILE, or run on a terminal to be prompted")
    r = sync_now(g, pin="00000000")
    assert r.returncode == 1 and r.stdout == ""
    assert one_line(r.stderr) == ("hashim: member 'a' refused the user PIN "
                                  "(CKR_PIN_INCORRECT); check the user PIN (the same on every "
                                  "member); nothing copied")
    r = sync_now(g, "--pin-file", str(tmp_path / "nope"), pin=None)
    assert r.returncode == 2 and "--pin-file" in one_line(r.stderr)
    assert (K.CKO_SECRET_KEY, "d-aes") not in labels(b.objects())

    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    mark = len(g.log_text())
    r = sync_now(g, "--pin-file", str(pin_file), pin=None)
    assert r.returncode == 1, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    for line in ("copied secret key 'd-aes' to b", "copied secret key 'd-aes' to c",
                 "copied data object 'd-data' to b", "copied data object 'd-data' to c",
                 "destroyed private key 'k-gone' on c (it was destroyed through the HA slot "
                 "while c was away)",
                 "destroyed public key 'k-gone' on c (it was destroyed through the HA slot "
                 "while c was away)",
                 "copied 2 hashim records (tombstones) to c"):
        assert line in lines, r.stdout
    assert [x for x in lines if x.startswith("not copied:")] == [
        "not copied: secret key 'd-raw' (held by a) to b, c: not wrappable under the domain "
        "key (CKR_KEY_UNEXTRACTABLE: member 'a': wrapping for replication failed)"], r.stdout
    unreachable = [x for x in lines if x.startswith("member ")]
    assert len(unreachable) == 1 and unreachable[0].startswith(
        "member 'd' not synchronised: member 'd': no token with label 'no-such-token'"), lines
    assert lines[-1] == ("synchronised group 'admin-ha': 3 of 4 members (a, b, c), 4 copied, "
                         "2 destroyed, 1 not copied"), lines
    assert PIN not in r.stdout + g.log_text()
    log = g.log_text()[mark:]
    assert "sync: copied secret key 'd-aes' to member 'b'" in log
    assert "hashim group synchronize --now: synchronised group 'admin-ha'" in log
    assert " -> " not in log          # the command's own member start-ups stay out

    # what the tokens hold now, read directly
    for m in (b, c):
        have = labels(m.objects())
        assert {(K.CKO_SECRET_KEY, "d-aes"), (K.CKO_DATA, "d-data")} <= have, m.name
        assert (K.CKO_SECRET_KEY, "d-raw") not in have
    assert not {lbl for _, lbl in labels(c.objects())} & {"k-gone"}
    assert labels(a.objects()) == labels(b.objects()) | {(K.CKO_SECRET_KEY, "d-raw")}

    # once the unreachable member is gone and the uncopyable key too: in sync, exit 0
    assert g.hashim("group", "remove-member", "d").returncode == 0
    assert a.run_direct(DIRECT, {"destroy": ["d-raw"]}) == ["CKR_OK"]
    r = sync_now(g)
    assert (r.returncode, r.stderr) == (0, "")
    assert r.stdout == ("synchronised group 'admin-ha': 3 of 3 members (a, b, c), 0 copied, "
                        "0 destroyed, 0 not copied; every member already held every "
                        "object\n")


def test_key_made_while_the_group_had_one_member_reaches_the_new_member(tmp_path):
    g = build_group(tmp_path / "g", [("a", False), ("b", False)])
    b = g.members[1]
    assert g.hashim("group", "remove-member", "b").returncode == 0
    g.run_py(MAKE_KEYS, [("ec", "k-solo")])               # a is the whole group now
    r = hashim_cli(g.conf, "group", "add-member", "b", *member_options(b), pin=PIN)
    assert r.returncode == 0, r.stderr
    r = sync_now(g)
    assert "copied private key 'k-solo' to b" in r.stdout.splitlines(), r.stdout
    assert r.returncode == 0, r.stdout
    assert (K.CKO_PRIVATE_KEY, "k-solo") in labels(b.objects())


# =========================================================================== settings
def fresh_sign(app: App) -> dict:
    """Sign in a new session of the application (its login covers it)."""
    s = app.ask(op="open", slot=0)
    assert s["rv"] == "CKR_OK", s
    return app.ask(op="sign", label="ks", session=s["session"])


def member_view(g: Group, name: str) -> dict:
    return next(m for m in status_json(g)["members"] if m["name"] == name)


def test_recovery_settings_reach_a_running_module(tmp_path):
    """``group set recovery_attempts`` / ``recovery_interval`` while a member is down in a
    running application: the status shows the new attempt limit at once; after ``hashim
    recover`` fails, the next attempt should come within the NEW interval."""
    g = build_group(tmp_path / "g", [("e0", True), ("e1", True)])
    e0, e1 = g.members
    g.run_py(MAKE_KEYS, [("ec", "ks")])
    app = App(g)
    try:
        assert fresh_sign(app) == {"rv": "CKR_OK"}
        mark = len(g.log_text())
        e1.set_control(fault="device_error")
        wait_log(g, "member 'e1': recovering -> token not present", after=mark)
        v = wait_for(lambda: (lambda v: v if v["state"] == "token not present" else None)(
            member_view(g, "e1")), 5, "e1 'token not present' in the status")
        assert v["recovery"]["attempt"] == 1 and v["recovery"]["of"] == 3, v
        assert v["recovery"]["next_in_s"] > 50, v             # recovery_interval = 60 s
        assert fresh_sign(app) == {"rv": "CKR_OK"}

        def cli(*argv):
            mark = len(g.log_text())
            r = g.hashim(*argv)
            assert r.returncode == 0 and r.stderr == "", r.stderr
            wait_log(g, "configuration reloaded", after=mark)
            return r.stdout, g.log_text()[mark:]

        out, log = cli("group", "set", "recovery_attempts", "unlimited")
        assert out == f"recovery_attempts = unlimited in group 'admin-ha' ({g.conf})\n"
        assert "changed recovery_attempts" in log
        assert wait_for(lambda: member_view(g, "e1")["recovery"]["of"] is None, 5,
                        "the unlimited attempts in the status")
        out, log = cli("group", "set", "recovery_interval", "5")
        assert out == f"recovery_interval = 5.0 in group 'admin-ha' ({g.conf})\n"
        assert "changed recovery_interval" in log

        # an attempt now (it fails: the fault is still on); the next one is scheduled
        r = g.hashim("recover", "e1", "--wait", "10")
        assert r.returncode == 1, (r.stdout, r.stderr)
        after = wait_for(lambda: (lambda v: v if v["state"] == "token not present" else None)(
            member_view(g, "e1")), 5, "e1 'token not present' in the status")["recovery"]
        # the member comes back when it is healthy again
        e1.set_control()
        r = g.hashim("recover", "e1", "--wait", "10")
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert member_view(g, "e1")["state"] == "online"
        assert fresh_sign(app) == {"rv": "CKR_OK"}
    finally:
        app.close()
    if after["next_in_s"] is None or after["next_in_s"] > 6:
        pytest.xfail("engine bug: the supervisor keeps the settings it started with "
                     "(shim/engine/supervisor.py: self.s = group.settings, read for "
                     "recovery_interval, recovery_attempts, heartbeat_interval, "
                     "command_timeout; live reconfiguration replaces g.settings): after the "
                     f"change to 5 s the next attempt was due in {after['next_in_s']} s")


# =========================================================================== writers and bad input
def test_concurrent_writers_are_serialised_and_a_held_lock_is_refused(tmp_path):
    """Eight ``hashim group`` commands started at once all succeed, one after the other
    (fcntl lock), and every change is in the file; a writer that finds the lock held for
    10 s gives up with exit 2 and writes nothing."""
    lib = tmp_path / "libfake.so"
    lib.write_bytes(b"\x7fELF")
    conf = tmp_path / "hashim.toml"
    conf.write_text(f'# ops\n[group]\nlabel = "race"\n\n[[member]]\nname = "m0"\n'
                    f'module = "{lib}"\ntoken_label = "m0"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("HASHIM_")}
    env["PYTHONPATH"] = str(REPO)
    env["HASHIM_CONF"] = str(conf)
    cmds = [["group", "set", "command_timeout", "30"], ["group", "set", "recovery_interval", "7"],
            ["group", "set", "label", "race-2"], ["group", "ha-only", "--disable"]]
    cmds += [["group", "add-member", f"m{i}", "--module", str(lib), "--token-label", f"m{i}",
              "--no-check"] for i in range(1, 5)]
    procs = [subprocess.Popen([sys.executable, "-m", "shim.cli", *c], env=env, cwd=str(REPO),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for c in cmds]
    outs = [(p.wait(60), *p.communicate()) for p in procs]
    assert [o[0] for o in outs] == [0] * 8, outs
    from shim import config as cfg
    c = cfg.load(str(conf), check_files=False)
    assert (c.group.command_timeout, c.group.recovery_interval, c.group.label,
            c.group.ha_only) == (30.0, 7.0, "race-2", False)
    assert sorted(c.member_names) == ["m0", "m1", "m2", "m3", "m4"]
    assert conf.read_text().startswith("# ops\n")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["hashim.toml", "hashim.toml.lock",
                                                          "libfake.so"]

    import fcntl
    before = conf.read_text()
    with open(str(conf) + ".lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        r = subprocess.run([sys.executable, "-m", "shim.cli", "group", "set", "label", "x"],
                           env=env, cwd=str(REPO), capture_output=True, text=True, timeout=60)
        waited = time.monotonic() - t0
    assert r.returncode == 2 and r.stdout == ""
    assert one_line(r.stderr) == (f"hashim: {conf}: another hashim command is editing it "
                                  f"(lock {conf}.lock held for 10 s); wait for it to finish "
                                  "and try again")
    assert 9 < waited < 30 and conf.read_text() == before


def test_add_member_refuses_a_file_that_is_not_a_pkcs11_module(tmp_path):
    """Exit 1, one line naming the file, the config unchanged."""
    g = build_group(tmp_path / "g", [("a", False)], domain=False)
    bogus = tmp_path / "libnot-pkcs11.so"
    bogus.write_text("not a shared library\n")
    before = g.conf.read_text()
    r = hashim_cli(g.conf, "group", "add-member", "x", "--module", str(bogus),
                   "--token-label", "x", pin=PIN)
    assert r.returncode == 1 and r.stdout == ""
    err = one_line(r.stderr)
    assert err.startswith("hashim: member 'x' not added: ") and str(bogus) in err, err
    assert err.endswith("(fix it, or add it anyway with --no-check)")
    assert g.conf.read_text() == before
