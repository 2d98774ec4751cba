"""The emulated-HSM fixture (tests/fixtures/emuhsm.c) against real SoftHSM2 tokens.

Every scenario runs in its own subprocess (``_worker`` below, run with
``python -c``) because the module reads its environment per process and some
scenarios hang or crash it. The worker drives libemuhsm.so with python-pkcs11
(which releases the GIL, so threads really run concurrently) or PyKCS11, flips
the control file while it runs and reports what it saw as one JSON line.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.build import build_emuhsm, read_stats, write_control
from tests.softhsm import PIN, make_token

REPO = Path(__file__).resolve().parent.parent
P256 = bytes.fromhex("06082a8648ce3d030107")      # DER OID prime256v1
SETTLE = 0.12                                     # > EMUHSM_POLL_MS (50 ms)


# --------------------------------------------------------------------------
# Worker side (runs in the subprocess)

def _ctl(**keys) -> None:
    write_control(os.environ["EMUHSM_CONTROL"], **keys)
    time.sleep(SETTLE)


def _stats() -> dict:
    return read_stats(os.environ["EMUHSM_STATS"])


def _wait_stats(pred, timeout: float = 3.0) -> dict:
    """Stats as soon as pred(stats) holds (the file is rewritten every 100 ms)."""
    deadline = time.monotonic() + timeout
    while True:
        st = _stats()
        if st and pred(st) or time.monotonic() > deadline:
            return st
        time.sleep(0.02)


def _outcome(fn) -> str:
    import pkcs11
    try:
        fn()
        return "ok"
    except pkcs11.PKCS11Error as e:
        return type(e).__name__


def _open():
    import pkcs11
    lib = pkcs11.lib(os.environ["EMUHSM_LIB"])
    tok = lib.get_token(token_label=os.environ["TOKEN_LABEL"])
    return lib, tok, tok.open(user_pin=PIN, rw=True)


def _keypair(session, label="k", store=False):
    from pkcs11 import Attribute, KeyType
    return session.generate_keypair(KeyType.EC, label=label, store=store,
                                    public_template={Attribute.EC_PARAMS: P256})


def _sign(priv) -> bytes:
    from pkcs11 import Mechanism
    return priv.sign(b"\x42" * 32, mechanism=Mechanism.ECDSA)


def _verify(pub, sig) -> bool:
    from pkcs11 import Mechanism
    return pub.verify(b"\x42" * 32, sig, mechanism=Mechanism.ECDSA)


def _w_forward_pykcs11():
    import PyKCS11
    lib = PyKCS11.PyKCS11Lib()
    lib.load(os.environ["EMUHSM_LIB"])
    info = lib.getInfo()
    slot = [s for s in lib.getSlotList(tokenPresent=True)
            if lib.getTokenInfo(s).label.strip() == os.environ["TOKEN_LABEL"]][0]
    s = lib.openSession(slot, PyKCS11.CKF_SERIAL_SESSION | PyKCS11.CKF_RW_SESSION)
    s.login(PIN)
    pub_t = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PUBLIC_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
             (PyKCS11.CKA_TOKEN, PyKCS11.CK_FALSE), (PyKCS11.CKA_VERIFY, PyKCS11.CK_TRUE),
             (PyKCS11.CKA_EC_PARAMS, P256)]
    priv_t = [(PyKCS11.CKA_CLASS, PyKCS11.CKO_PRIVATE_KEY), (PyKCS11.CKA_KEY_TYPE, PyKCS11.CKK_EC),
              (PyKCS11.CKA_TOKEN, PyKCS11.CK_FALSE), (PyKCS11.CKA_SIGN, PyKCS11.CK_TRUE),
              (PyKCS11.CKA_PRIVATE, PyKCS11.CK_TRUE), (PyKCS11.CKA_SENSITIVE, PyKCS11.CK_TRUE)]
    pub, priv = s.generateKeyPair(pub_t, priv_t, mecha=PyKCS11.MechanismECGENERATEKEYPAIR)
    data = b"\x42" * 32
    mech = PyKCS11.Mechanism(PyKCS11.CKM_ECDSA)
    sig = bytes(s.sign(priv, data, mech))
    ok = s.verify(pub, data, sig, mech)
    bad = s.verify(pub, b"\x43" * 32, sig, mech)
    digest = bytes(s.digest(b"abc", PyKCS11.Mechanism(PyKCS11.CKM_SHA256))).hex()
    rnd = len(s.generateRandom(16))
    s.logout()
    s.closeSession()
    st = _wait_stats(lambda st: st.get("C_Sign") == 1)
    lib.unload()                      # C_Finalize: final stats, backend unloaded
    return {"manufacturer": info.manufacturerID.strip(), "sig_len": len(sig), "verify": ok,
            "verify_bad": bad, "digest": digest, "random": rnd, "stats": st,
            "final": _stats(), "pid": os.getpid()}


def _w_forward_pkcs11():
    lib, tok, s = _open()
    pub, priv = _keypair(s)
    ok = _verify(pub, _sign(priv))
    lib.reinitialize()                # C_Finalize + C_Initialize: backend unloaded and reloaded
    s = tok.open(user_pin=PIN, rw=True)
    pub, priv = _keypair(s)
    ok2 = _verify(pub, _sign(priv))
    s.close()
    return {"verify": ok, "verify_after_reinit": ok2,
            "stats": _wait_stats(lambda st: st.get("C_Sign") == 2)}


def _w_service():
    lib, tok, s = _open()
    pub, priv = _keypair(s)
    t = time.monotonic()
    for _ in range(10):
        _sign(priv)
    base = time.monotonic() - t
    _ctl(service_ms=50)
    t = time.monotonic()
    for _ in range(10):
        _sign(priv)
    slowed = time.monotonic() - t
    return {"base": base, "slowed": slowed}


def _w_capacity():
    lib, tok, first = _open()                       # logs the token in
    sessions = [first, tok.open(rw=True)]
    keys = [_keypair(s)[1] for s in sessions]

    def run(n=5):
        barrier = threading.Barrier(2)

        def worker(k):
            barrier.wait()
            for _ in range(n):
                errors.append(_outcome(lambda: _sign(k)))
        threads = [threading.Thread(target=worker, args=(k,)) for k in keys]
        t = time.monotonic()
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return time.monotonic() - t

    errors = []
    _ctl(capacity=1, service_ms=30)
    serial = run()
    st1 = _wait_stats(lambda st: st.get("C_Sign") == 10 and st.get("in_flight") == 0)
    _ctl(capacity=0, service_ms=30)
    parallel = run()
    st2 = _wait_stats(lambda st: st.get("C_Sign") == 20 and st.get("in_flight") == 0)
    return {"serial": serial, "parallel": parallel,
            "max_in_flight_cap1": st1.get("max_in_flight"),
            "max_in_flight_unlimited": st2.get("max_in_flight"),
            "outcomes": sorted(set(errors))}


def _w_device_error():
    import pkcs11
    so = os.environ["EMUHSM_LIB"]
    _ctl(fault="device_error")
    at_init = _outcome(lambda: pkcs11.lib(so))     # C_Initialize fails too
    _ctl(fault="none")
    lib, tok, s = _open()
    pub, priv = _keypair(s)
    _ctl(fault="device_error")
    r = {"init": at_init,
         "sign": _outcome(lambda: _sign(priv)),
         "random": _outcome(lambda: s.generate_random(128)),
         "slots": _outcome(lambda: lib.get_slots())}
    _ctl(fault="none")
    r["sign_after"] = _outcome(lambda: _sign(priv))
    r["stats"] = _wait_stats(lambda st: st.get("faulted", 0) >= 4)
    return r


def _w_hang():
    lib, tok, s = _open()
    pub, priv = _keypair(s)
    _ctl(fault="hang")
    box = {}

    def signer():
        box["t0"] = time.monotonic()
        box["sig"] = _sign(priv)
        box["t1"] = time.monotonic()
    th = threading.Thread(target=signer, daemon=True)
    th.start()
    th.join(1.0)
    hung = th.is_alive()
    during = _wait_stats(lambda st: st.get("blocked") == 1)
    # plain calls keep working while commands hang
    slots = _outcome(lambda: lib.get_slots())
    _ctl(fault="none")
    th.join(2.0)
    released = not th.is_alive()
    r = {"hung_after_1s": hung, "released": released, "slots_while_hung": slots,
         "blocked_during": during.get("blocked"),
         "verify": released and _verify(pub, box["sig"]),
         "held_for": box.get("t1", 0) - box.get("t0", 0)}
    _ctl(fault="slow", slow_ms=300)
    t = time.monotonic()
    sig = _sign(priv)
    r["slow_took"] = time.monotonic() - t
    r["slow_verify"] = _verify(pub, sig)
    return r


def _w_crash():
    lib, tok, s = _open()
    pub, priv = _keypair(s)
    _ctl(fault="crash", fault_after=1)
    _sign(priv)                                    # the one command still allowed
    print("signed-once", flush=True)
    _sign(priv)                                    # aborts
    print("survived", flush=True)
    return {}


def _w_fault_after_functions():
    lib, tok, s = _open()
    pub, priv = _keypair(s)
    sig = _sign(priv)
    _ctl(fault="device_error", fault_functions="C_Sign", fault_after=3)
    signs = [_outcome(lambda: _sign(priv)) for _ in range(5)]
    others = {"verify": _outcome(lambda: _verify(pub, sig)),
              "random": _outcome(lambda: s.generate_random(128)),
              "slots": _outcome(lambda: lib.get_slots())}
    _ctl(fault="device_error", fault_functions="C_GenerateKeyPair")
    only_kp = {"sign": _outcome(lambda: _sign(priv)),
               "keypair": _outcome(lambda: _keypair(s, "k2"))}
    # fault_after counts commands only, not plain calls or other functions' calls
    _ctl(fault="device_error", fault_after=2)
    plain_before = _outcome(lambda: lib.get_slots())
    cmds = [_outcome(lambda: s.generate_random(64)) for _ in range(3)]
    plain_after = _outcome(lambda: lib.get_slots())
    _ctl()
    # the injected errors ended the backend's operations: the session is fine
    healthy = _outcome(lambda: _verify(pub, _sign(priv)))
    return {"signs": signs, "others": others, "only_keypair": only_kp,
            "plain_before": plain_before, "cmds": cmds, "plain_after": plain_after,
            "healthy": healthy}


def _w_lose_sessions():
    from pkcs11 import KeyType, ObjectClass
    lib, tok, s = _open()
    pub, priv = _keypair(s, "persist", store=True)
    before = _outcome(lambda: _sign(priv))
    _ctl(lose_sessions=1)
    old = _outcome(lambda: _sign(priv))
    s2 = tok.open(user_pin=PIN, rw=True)
    priv2 = s2.get_key(object_class=ObjectClass.PRIVATE_KEY, key_type=KeyType.EC, label="persist")
    pub2 = s2.get_key(object_class=ObjectClass.PUBLIC_KEY, key_type=KeyType.EC, label="persist")
    new = _verify(pub2, _sign(priv2))
    _ctl(lose_sessions=1, service_ms=0)             # every change carrying it is one restart
    again = _outcome(lambda: _sign(priv2))
    _ctl()                                          # and a file without it is none
    s3 = tok.open(user_pin=PIN, rw=True)
    priv3 = s3.get_key(object_class=ObjectClass.PRIVATE_KEY, label="persist")
    steady = [_outcome(lambda: _sign(priv3)) for _ in range(2)]
    return {"before": before, "old_session": old, "new_session_verify": new,
            "second_loss": again, "steady": steady,
            "reinits": _wait_stats(lambda st: st.get("reinits") == 2).get("reinits")}


def _worker() -> None:
    result = globals()["_w_" + sys.argv[1]]()
    print("RESULT " + json.dumps(result), flush=True)


# --------------------------------------------------------------------------
# Test side

@pytest.fixture(scope="module")
def emuhsm(tmp_path_factory) -> str:
    return build_emuhsm(tmp_path_factory.mktemp("emuhsm-build"))


@pytest.fixture
def run(emuhsm, tmp_path):
    """run(scenario) -> (CompletedProcess, result dict or None, paths)."""
    tok = make_token(tmp_path, "emu", private_lib=True)

    def _run(scenario: str, timeout: float = 20):
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMUHSM_")}
        env.update(tok.env, EMUHSM_BACKEND=tok.lib, EMUHSM_LIB=emuhsm,
                   EMUHSM_CONTROL=str(tmp_path / "control"),
                   EMUHSM_STATS=str(tmp_path / "stats"), TOKEN_LABEL=tok.label,
                   PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
        p = subprocess.run([sys.executable, "-c",
                            "from tests.test_emuhsm import _worker; _worker()", scenario],
                           env=env, cwd=REPO, capture_output=True, text=True,
                           timeout=timeout)
        result = None
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
        assert "emuhsm[" not in p.stderr, "the module printed without EMUHSM_DEBUG"
        if result is None and scenario != "crash":
            pytest.fail(f"worker {scenario} failed (rc {p.returncode}):\n{p.stderr}")
        return p, result

    _run.token = tok
    return _run


def test_build_is_cached_and_concurrent_safe(tmp_path):
    out = tmp_path / "b"
    paths = [None, None]

    def build(i):
        paths[i] = build_emuhsm(out)
    threads = [threading.Thread(target=build, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert paths[0] == paths[1] == str((out / "libemuhsm.so").resolve())
    mtime = os.stat(paths[0]).st_mtime_ns
    assert build_emuhsm(out) == paths[0]
    assert os.stat(paths[0]).st_mtime_ns == mtime          # cached, not rebuilt
    assert sorted(p.name for p in out.iterdir()) == [
        "libemuhsm.so", "libemuhsm.so.lock", "libemuhsm.so.stamp"]
    syms = subprocess.run(["nm", "-D", "--defined-only", paths[0]], capture_output=True,
                          text=True, check=True).stdout.split()
    assert {"C_GetFunctionList", "C_Initialize", "C_Sign", "C_WaitForSlotEvent"} <= set(syms)


def test_forwarding_pykcs11(run):
    p, r = run("forward_pykcs11")
    assert r["verify"] is True and r["verify_bad"] is False and r["sig_len"] == 64
    assert r["digest"] == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert r["random"] == 16
    assert r["manufacturer"] == "SoftHSM"
    st = r["stats"]
    assert st["pid"] == r["pid"]
    assert st["C_Sign"] == 1 and st["C_GenerateKeyPair"] == 1 and st["C_Login"] == 1
    assert st["length_queries"] >= 1             # PyKCS11 asks the signature size first
    assert st["commands"] == st["served"] == 6   # keypair, sign, 2 verifies, digest, random
    assert r["final"]["C_Finalize"] == 1


def test_forwarding_pkcs11_tool(run, emuhsm, tmp_path):
    tok = run.token
    env = dict(os.environ, **tok.env, EMUHSM_BACKEND=tok.lib)
    env.pop("EMUHSM_DEBUG", None)
    base = ["pkcs11-tool", "--module", emuhsm, "--token-label", tok.label]
    out = subprocess.run(base + ["-L"], env=env, capture_output=True, text=True, check=True)
    assert "token label        : emu" in out.stdout
    subprocess.run(base + ["--login", "--pin", PIN, "--keypairgen", "--key-type",
                           "EC:prime256v1", "--label", "t"],
                   env=env, capture_output=True, check=True)
    (tmp_path / "h").write_bytes(b"\x01" * 32)
    subprocess.run(base + ["--login", "--pin", PIN, "--sign", "-m", "ECDSA", "--label", "t",
                           "-i", str(tmp_path / "h"), "-o", str(tmp_path / "sig")],
                   env=env, capture_output=True, check=True)
    assert len((tmp_path / "sig").read_bytes()) == 64


def test_forwarding_pkcs11_reinitialize(run):
    p, r = run("forward_pkcs11")
    assert r["verify"] and r["verify_after_reinit"]
    assert r["stats"]["C_Initialize"] == 2 and r["stats"]["C_Finalize"] == 1


def test_service_ms(run):
    p, r = run("service")
    assert r["slowed"] >= 0.5
    assert r["base"] < r["slowed"] / 2


def test_capacity_serialises(run):
    p, r = run("capacity")
    assert r["outcomes"] == ["ok"]
    assert r["max_in_flight_cap1"] == 1
    assert r["serial"] >= 10 * 0.030
    assert r["max_in_flight_unlimited"] == 2     # the threads really did overlap
    assert r["parallel"] < r["serial"]


def test_device_error(run):
    p, r = run("device_error")
    assert r["init"] == "DeviceError"
    assert r["sign"] == r["random"] == r["slots"] == "DeviceError"
    assert r["sign_after"] == "ok"
    assert r["stats"]["faulted"] >= 4


def test_hang_and_slow(run):
    p, r = run("hang")
    assert r["hung_after_1s"] is True
    assert r["blocked_during"] == 1
    assert r["slots_while_hung"] == "ok"
    assert r["released"] is True and r["verify"] is True
    assert r["held_for"] >= 1.0
    assert 0.3 <= r["slow_took"] < 3 and r["slow_verify"] is True


def test_crash_aborts(run):
    p, r = run("crash")
    assert p.returncode == -signal.SIGABRT, (p.returncode, p.stderr)
    assert "signed-once" in p.stdout and "survived" not in p.stdout


def test_fault_after_and_fault_functions(run):
    p, r = run("fault_after_functions")
    assert r["signs"] == ["ok", "ok", "ok", "DeviceError", "DeviceError"]
    assert r["others"] == {"verify": "ok", "random": "ok", "slots": "ok"}
    assert r["only_keypair"] == {"sign": "ok", "keypair": "DeviceError"}
    assert r["plain_before"] == "ok"
    assert r["cmds"] == ["ok", "ok", "DeviceError"]
    assert r["plain_after"] == "DeviceError"
    assert r["healthy"] == "ok"


def test_lose_sessions(run):
    p, r = run("lose_sessions")
    assert r["before"] == "ok"
    assert r["old_session"] == "SessionHandleInvalid"
    assert r["new_session_verify"] is True
    assert r["second_loss"] == "SessionHandleInvalid"
    assert r["steady"] == ["ok", "ok"]
    assert r["reinits"] == 2
