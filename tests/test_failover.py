"""Failover and recovery through the built module, with real members (issue 4, point 5).

Every member is an emulated HSM (tests/fixtures/emuhsm.c): its own copy of libemuhsm.so
forwarding to its own copy of libsofthsm2.so and its own SoftHSM2 token, with its own
control and stats files (EMUHSM_BACKEND / EMUHSM_CONTROL / EMUHSM_STATS in the member's
``env`` in the config). Timeouts are short (command_timeout 2 s, heartbeat 0.5 s, recovery
every 1 s, 3 attempts) and the group's domain key is provisioned with ``hashim domain init``.

The application is a separate process (``_app`` below, python-pkcs11 over the HA slot,
which releases the GIL in every PKCS#11 call, so its threads really run at once), driven
over stdin/stdout by the test: it opens and logs in, generates keys, runs a load of client
threads and reports every error and every slow command. The test flips the members' faults
while the load runs and checks what the application saw, ``hashim status --json``, the HA
log, and the members' tokens directly (SoftHSM2 without hashim).

Shared with tests/test_soak.py and bench/failover.py: ``Cluster``, ``App``, ``emuhsm``.
"""
from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:                    # the app and bench import this file
    sys.path.insert(0, str(REPO))

from tests.fixtures.build import build_emuhsm, read_stats, write_control  # noqa: E402
from tests.softhsm import PIN, SO_PIN, make_token, toml_str  # noqa: E402

LABEL = "ha-failover"
P256 = bytes.fromhex("06082a8648ce3d030107")
REPLY = "@@APP@@ "
FAILED = ("device error", "token not present", "recovering", "given up")
# every cryptographic call the load makes, and the heartbeat: a member that hangs on
# these is a member that gives no sign of life (plain calls such as C_OpenSession and
# C_Login keep answering, so recovery attempts are not stuck in them)
HANG_ALL = ["C_SignInit", "C_Sign", "C_VerifyInit", "C_Verify", "C_EncryptInit",
            "C_Encrypt", "C_DecryptInit", "C_Decrypt", "C_SignUpdate", "C_SignFinal",
            "C_EncryptUpdate", "C_EncryptFinal", "C_GetSessionInfo"]
SINGLE = ("sign", "verify", "encrypt")
MULTI = ("sign_mp", "encrypt_mp")


# =====================================================================================
# Application side (a subprocess: python -c "from tests.test_failover import _app; _app()")

class _Load:
    """Client threads, each with its own session, running a mix of operations."""

    def __init__(self, app, threads, mix, record_all):
        self.app = app
        self.mix = list(mix)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.count = {}
        self.errors = []            # (t0, op, error name, duration)
        self.slow = []              # (t0, duration, op) of commands over SLOW s
        self.all = [] if record_all else None    # (t0, duration, op, ok)
        self.done = []              # completion times, for throughput
        self.ready = threading.Barrier(threads + 1)
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True)
                        for i in range(threads)]
        for t in self.threads:
            t.start()
        self.ready.wait(60)

    SLOW = 0.25

    def run(self, i):
        import pkcs11
        from pkcs11 import Mechanism, ObjectClass
        app = self.app
        s = app.token.open(rw=True)
        ec = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label="load-ec")
        ecpub = s.get_key(object_class=ObjectClass.PUBLIC_KEY, label="load-ec")
        aes = s.get_key(object_class=ObjectClass.SECRET_KEY, label="load-aes")
        hmac = s.get_key(object_class=ObjectClass.SECRET_KEY, label="load-hmac")
        data = bytes([i]) * 32
        sig = ec.sign(data, mechanism=Mechanism.ECDSA)
        iv = b"\x01" * 16
        chunks = [b"a" * 100, b"b" * 100, b"c" * 57]

        def sign():
            ec.sign(data, mechanism=Mechanism.ECDSA)

        def verify():
            if not ecpub.verify(data, sig, mechanism=Mechanism.ECDSA):
                raise ValueError("BadSignature")

        def encrypt():
            ct = aes.encrypt(data, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv)
            if aes.decrypt(ct, mechanism=Mechanism.AES_CBC_PAD, mechanism_param=iv) != data:
                raise ValueError("BadDecryption")

        def sign_mp():
            mac = hmac.sign(iter(chunks), mechanism=Mechanism.SHA256_HMAC)
            if len(mac) != 32:
                raise ValueError("BadMac")

        def encrypt_mp():
            ct = b"".join(aes.encrypt(iter(chunks), mechanism=Mechanism.AES_CBC_PAD,
                                      mechanism_param=iv))
            if aes.decrypt(ct, mechanism=Mechanism.AES_CBC_PAD,
                           mechanism_param=iv) != b"".join(chunks):
                raise ValueError("BadDecryption")
        ops = {"sign": sign, "verify": verify, "encrypt": encrypt, "sign_mp": sign_mp,
               "encrypt_mp": encrypt_mp}
        self.ready.wait(60)
        n = i
        while not self.stop.is_set():
            op = self.mix[n % len(self.mix)]
            n += 1
            t0 = time.time()
            err = None
            try:
                ops[op]()
            except pkcs11.PKCS11Error as e:
                err = type(e).__name__
            except ValueError as e:
                err = str(e)
            except Exception as e:  # noqa: BLE001 - reported to the test
                err = f"{type(e).__name__}: {e}"
            t1 = time.time()
            with self.lock:
                self.count[op] = self.count.get(op, 0) + 1
                self.done.append(t1)
                if err:
                    self.errors.append((t0, op, err, t1 - t0))
                if t1 - t0 > self.SLOW:
                    self.slow.append((t0, t1 - t0, op))
                if self.all is not None:
                    self.all.append((t0, t1 - t0, op, err is None))
            if err:
                time.sleep(0.01)        # every member down: do not spin
        try:
            s.close()
        except Exception:  # noqa: BLE001
            pass

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(120)
        alive = sum(t.is_alive() for t in self.threads)
        return {"count": self.count, "errors": self.errors, "slow": self.slow,
                "all": self.all, "done": self.done, "stuck_threads": alive}


class _App:
    def __init__(self):
        self.lib = self.token = self.session = None
        self.load = None
        self.mp = None

    # ---- commands ----------------------------------------------------------------
    def c_open(self):
        import pkcs11
        self.lib = pkcs11.lib(os.environ["HASHIM_MODULE"])
        self.token = self.lib.get_token(token_label=LABEL)
        self.session = self.token.open(user_pin=PIN, rw=True)
        return {}

    def c_keys(self):
        """The keys the load uses (token objects, replicated to every member)."""
        from pkcs11 import Attribute, KeyType
        s = self.session
        s.generate_keypair(KeyType.EC, label="load-ec", store=True,
                           public_template={Attribute.EC_PARAMS: P256})
        s.generate_key(KeyType.AES, 256, label="load-aes", store=True)
        s.generate_key(KeyType.GENERIC_SECRET, 256, label="load-hmac", store=True,
                       template={Attribute.SIGN: True, Attribute.VERIFY: True})
        return {}

    def c_keygen(self, label, kind="ec"):
        import pkcs11
        from pkcs11 import Attribute, KeyType
        t0 = time.time()
        try:
            if kind == "ec":
                self.session.generate_keypair(KeyType.EC, label=label, store=True,
                                              public_template={Attribute.EC_PARAMS: P256})
            else:
                self.session.generate_key(KeyType.AES, 256, label=label, store=True)
            return {"result": "ok", "took": time.time() - t0}
        except pkcs11.PKCS11Error as e:
            return {"result": type(e).__name__, "took": time.time() - t0}

    def c_sign(self, label="load-ec"):
        """One ECDSA signature on the main session, verified: "ok" or the error."""
        import pkcs11
        from pkcs11 import Mechanism, ObjectClass
        t0 = time.time()
        try:
            k = self.session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=label)
            p = self.session.get_key(object_class=ObjectClass.PUBLIC_KEY, label=label)
            sig = k.sign(b"\x05" * 32, mechanism=Mechanism.ECDSA)
            ok = p.verify(b"\x05" * 32, sig, mechanism=Mechanism.ECDSA)
            return {"result": "ok" if ok else "BadSignature", "took": time.time() - t0}
        except pkcs11.PKCS11Error as e:
            return {"result": type(e).__name__, "took": time.time() - t0}

    def c_objects(self, label):
        import pkcs11
        from pkcs11 import Attribute
        try:
            objs = list(self.session.get_objects({Attribute.LABEL: label}))
            return {"result": "ok", "count": len(objs)}
        except pkcs11.PKCS11Error as e:
            return {"result": type(e).__name__}

    def c_destroy(self, label):
        from pkcs11 import Attribute
        objs = list(self.session.get_objects({Attribute.LABEL: label}))
        for o in objs:
            o.destroy()
        return {"destroyed": len(objs)}

    def c_slot(self):
        """Is a token present in the HA slot (C_GetSlotInfo), and what C_GetSlotList(TRUE)
        lists."""
        from pkcs11 import SlotFlag
        slots = self.lib.get_slots(token_present=False)
        present = [bool(s.flags & SlotFlag.TOKEN_PRESENT) for s in slots]
        return {"present": present, "with_token": len(self.lib.get_slots(token_present=True))}

    def c_load_start(self, threads=8, mix=SINGLE, record_all=False):
        self.load = _Load(self, threads, mix, record_all)
        return {"started": time.time()}

    def c_load_stop(self):
        r = self.load.finish()
        self.load = None
        return r

    def c_load_peek(self):
        ld = self.load
        with ld.lock:
            return {"count": dict(ld.count), "errors": list(ld.errors), "n": len(ld.done)}

    def c_mp_begin(self, kind="sign"):
        """A multi-part operation on its own session, paused after its first part."""
        import pkcs11
        from pkcs11 import Mechanism, ObjectClass
        s = self.token.open(rw=True)
        hmac = s.get_key(object_class=ObjectClass.SECRET_KEY, label="load-hmac")
        aes = s.get_key(object_class=ObjectClass.SECRET_KEY, label="load-aes")
        paused, resume = threading.Event(), threading.Event()
        box = {}

        def parts():
            yield b"a" * 64
            paused.set()
            resume.wait(60)
            yield b"b" * 64

        def run():
            try:
                if kind == "sign":
                    hmac.sign(parts(), mechanism=Mechanism.SHA256_HMAC)
                else:
                    b"".join(aes.encrypt(parts(), mechanism=Mechanism.AES_CBC_PAD,
                                         mechanism_param=b"\x01" * 16))
                box["result"] = "ok"
            except pkcs11.PKCS11Error as e:
                box["result"] = type(e).__name__
            except Exception as e:  # noqa: BLE001
                box["result"] = f"{type(e).__name__}: {e}"
            paused.set()
        t = threading.Thread(target=run, daemon=True)
        t.start()
        paused.wait(30)
        self.mp = (s, t, resume, box, kind)
        return {"paused": "result" not in box}

    def c_mp_end(self):
        """Finish the paused operation; then the same session must still work: a
        single-part signature and a new multi-part operation."""
        import pkcs11
        from pkcs11 import Mechanism, ObjectClass
        s, t, resume, box, kind = self.mp
        resume.set()
        t.join(60)
        out = {"result": box.get("result", "hung")}
        try:
            ec = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label="load-ec")
            ec.sign(b"\x07" * 32, mechanism=Mechanism.ECDSA)
            out["single_after"] = "ok"
        except pkcs11.PKCS11Error as e:
            out["single_after"] = type(e).__name__
        try:
            hmac = s.get_key(object_class=ObjectClass.SECRET_KEY, label="load-hmac")
            hmac.sign(iter([b"x" * 10, b"y" * 10]), mechanism=Mechanism.SHA256_HMAC)
            out["multi_after"] = "ok"
        except pkcs11.PKCS11Error as e:
            out["multi_after"] = type(e).__name__
        s.close()
        self.mp = None
        return out

    def c_watch_start(self, name):
        """Watch member ``name`` inside the module (every ~1 ms): each time it comes
        back online, when, and when it served its first command after that."""
        fe = sys.modules.get("shim.frontend")
        g = getattr(fe, "ENGINE", None)
        m = g.member(name)
        from shim.engine.status import fast_stats
        self.watch = {"stop": threading.Event(), "cycles": []}
        w = self.watch

        def served():                 # the engine's and the stub's fast path's
            return m.served + fast_stats(m)[1]

        def run():
            was_online = m.state == "online"
            cur = None
            while not w["stop"].is_set():
                online = m.state == "online"
                now = time.time()
                if was_online and not online:
                    cur = {"down": now, "online": None, "first_served": None}
                    w["cycles"].append(cur)
                elif online and not was_online and cur is not None:
                    cur["online"] = now
                    cur["served_at_online"] = served()
                if cur is not None and cur["online"] and cur["first_served"] is None \
                        and served() > cur["served_at_online"]:
                    cur["first_served"] = now
                was_online = online
                time.sleep(0.001)
        threading.Thread(target=run, daemon=True).start()
        return {}

    def c_watch_stop(self):
        self.watch["stop"].set()
        return {"cycles": self.watch["cycles"]}

    def c_engine(self):
        """The module's own view when it runs in this interpreter (cffi embedding in a
        Python host shares the interpreter): per member, its state, the real sessions
        its token has open in this process (C_GetTokenInfo.ulSessionCount) and how many
        hashim accounts for (the anchor + one per virtual session holding one). Real
        sessions are counted by asking every small handle (SoftHSM2 hands out 1, 2, ...
        and does not fill in ulSessionCount)."""
        fe = sys.modules.get("shim.frontend")
        g = getattr(fe, "ENGINE", None)
        if g is None:
            return {"available": False}
        from shim.members.module import ffi
        out = {}
        for m in g.members:
            held = sum(1 for vs in g.sessions.all() if m.name in vs.members)
            real = None
            if m.state == "online":          # SoftHSM2 does not count: ask every handle
                info = ffi.new("CK_SESSION_INFO *")
                real = sum(1 for h in range(1, 4097)
                           if m.f["C_GetSessionInfo"](h, info) == 0)
            from shim.engine.status import fast_stats
            fin, fserved, fidle = fast_stats(m)
            out[m.name] = {"state": m.state, "held": held, "expected": held + 1,
                           "real": real, "calls": len(m.calls), "served": m.served,
                           "fast": {"in_flight": fin, "served": fserved, "idle_s": fidle}}
        return {"available": True, "members": out,
                "virtual_sessions": len(g.sessions.all())}


def _app():
    import faulthandler
    faulthandler.register(signal.SIGUSR1, all_threads=True)   # kill -USR1: every stack
    app = _App()
    out = sys.stdout
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        op = req.pop("op")
        if op == "exit":
            out.write(REPLY + json.dumps({"bye": True}) + "\n")
            out.flush()
            break
        try:
            res = getattr(app, "c_" + op)(**req)
        except Exception:  # noqa: BLE001 - the test shows it
            res = {"exception": traceback.format_exc()}
        out.write(REPLY + json.dumps(res) + "\n")
        out.flush()
    out.flush()
    os._exit(0)        # threads abandoned in a hung member must not hold the exit


# =====================================================================================
# Test side

class App:
    """The application process, one JSON command per line."""

    def __init__(self, cluster, supervise=None, extra_env=None):
        env = cluster.env(**(extra_env or {}))
        if supervise:
            env["HASHIM_SUPERVISE"] = supervise
        self.stderr_path = cluster.dir / f"app-{time.monotonic_ns()}.stderr"
        self.stderr = open(self.stderr_path, "w")
        self.p = subprocess.Popen(
            [sys.executable, "-c", "from tests.test_failover import _app; _app()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr, text=True,
            env=env, cwd=str(REPO), bufsize=1)
        self.pid = self.p.pid
        self.replies = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            if line.startswith(REPLY):
                self.replies.put(json.loads(line[len(REPLY):]))
        self.replies.put(None)

    def __call__(self, op, timeout=90, **kw):
        self.p.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.p.stdin.flush()
        try:
            r = self.replies.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"app: {op} did not answer in {timeout} s\n{self.log()}")
        if r is None:
            raise AssertionError(f"app exited during {op} (rc {self.p.poll()})\n{self.log()}")
        if "exception" in r:
            raise AssertionError(f"app: {op} raised\n{r['exception']}\n{self.log()}")
        return r

    def log(self) -> str:
        self.stderr.flush()
        try:
            return self.stderr_path.read_text()[-6000:]
        except OSError:
            return ""

    def close(self):
        if self.p.poll() is None:
            try:
                self("exit", timeout=30)
            except (AssertionError, OSError, ValueError):
                pass
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(5)
        self.stderr.close()


class Cluster:
    """N emulated-HSM members behind one hashim config, the domain key provisioned."""

    def __init__(self, base: Path, emu: str, n: int = 3, **group):
        self.dir = Path(base)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.names = [f"m{i}" for i in range(n)]
        self.tokens = {}
        self.control = {}
        self.stats_path = {}
        grp = {"command_timeout": 2.0, "heartbeat_interval": 0.5, "recovery_interval": 1.0,
               "recovery_attempts": 3, "log": str(self.dir / "ha.log"),
               "state_dir": str(self.dir / "state")}
        grp.update(group)
        lines = ["[group]", f"label = {toml_str(LABEL)}"]
        for k, v in grp.items():
            lines.append(f"{k} = {toml_str(v) if isinstance(v, str) else v}")
        for name in self.names:
            tok = make_token(self.dir / "tokens", name, private_lib=True)
            d = self.dir / name
            d.mkdir(exist_ok=True)
            lib = d / "libemuhsm.so"
            shutil.copyfile(emu, lib)           # its own instance: its own faults
            self.tokens[name] = tok
            self.control[name] = d / "control"
            self.stats_path[name] = d / "stats"
            env = {"SOFTHSM2_CONF": str(tok.conf), "EMUHSM_BACKEND": tok.lib,
                   "EMUHSM_CONTROL": str(self.control[name]),
                   "EMUHSM_STATS": str(self.stats_path[name])}
            lines += ["", "[[member]]", f"name = {toml_str(name)}",
                      f"module = {toml_str(str(lib))}", f"token_label = {toml_str(name)}",
                      "env = { " + ", ".join(f"{k} = {toml_str(v)}" for k, v in env.items())
                      + " }"]
        self.conf = self.dir / "hashim.toml"
        self.conf.write_text("\n".join(lines) + "\n")
        self.log_path = self.dir / "ha.log"
        self.state_dir = self.dir / "state"
        r = self.hashim("domain", "init", env={"HASHIM_SO_PIN": SO_PIN}, input="")
        assert r.returncode == 0, r.stderr
        self.apps = []

    # ---- environment and CLI -------------------------------------------------------
    def env(self, **extra) -> dict:
        from tests.clients import base_env
        from conftest import require_hashim
        env = base_env(HASHIM_CONF=str(self.conf), HASHIM_MODULE=require_hashim())
        env = {k: v for k, v in env.items() if not k.startswith(("EMUHSM_", "HASHIM_SUPERVISE"))}
        env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [
            p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.update(extra)
        return env

    def hashim(self, *args, env=None, input=None, timeout=60) -> subprocess.CompletedProcess:
        e = self.env(**(env or {}))
        return subprocess.run([sys.executable, "-m", "shim.cli", "--config", str(self.conf),
                               *args], env=e, input=input, capture_output=True, text=True,
                              timeout=timeout, cwd=str(REPO))

    def status(self) -> dict:
        r = self.hashim("status", "--json")
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout)

    def member_status(self, name) -> dict:
        return next(m for m in self.status()["members"] if m["name"] == name)

    def wait_state(self, name, states, timeout=15.0) -> dict:
        """The member's merged status once its state is one of ``states``."""
        states = (states,) if isinstance(states, str) else tuple(states)
        deadline = time.monotonic() + timeout
        while True:
            m = self.member_status(name)
            if m["state"] in states:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"member {name} is {m['state']!r}, not {states} after "
                                     f"{timeout} s:\n{json.dumps(m, indent=1)}\n"
                                     f"--- HA log ---\n{self.log()[-4000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        try:
            return self.log_path.read_text()
        except FileNotFoundError:
            return ""

    # ---- members ---------------------------------------------------------------------
    def ctl(self, name, **keys):
        """Set member ``name``'s faults (none: healthy); effective within 50 ms."""
        write_control(self.control[name], **keys)
        time.sleep(0.12)

    def stats(self, name) -> dict:
        return read_stats(self.stats_path[name])

    def wait_stats(self, name, pred, timeout=3.0) -> dict:
        """The member's emuhsm stats once ``pred(stats)`` holds (rewritten every 100 ms)."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.stats(name)
            if pred(st) or time.monotonic() > deadline:
                return st
            time.sleep(0.05)

    def direct_objects(self, name) -> list[dict]:
        """Objects on member ``name``'s token, read straight from SoftHSM2 (logged in)."""
        tok = self.tokens[name]
        code = (
            "import json, pkcs11\n"
            "from pkcs11 import Attribute\n"
            f"lib = pkcs11.lib({tok.lib!r})\n"
            f"t = lib.get_token(token_label={name!r})\n"
            f"s = t.open(user_pin={PIN!r})\n"
            "out = []\n"
            "for o in s.get_objects():\n"
            "    try: lbl = o[Attribute.LABEL]\n"
            "    except Exception: lbl = None\n"
            "    try: app = o[Attribute.APPLICATION]\n"
            "    except Exception: app = None\n"
            "    out.append({'class': int(o[Attribute.CLASS]), 'label': lbl,\n"
            "                'internal': app is not None and 'hashim' in str(app)})\n"
            "print(json.dumps(out))\n")
        env = dict(os.environ, SOFTHSM2_CONF=str(tok.conf))
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                           text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return json.loads(r.stdout.strip().splitlines()[-1])

    def app(self, supervise=None, **env) -> App:
        a = App(self, supervise, env)
        self.apps.append(a)
        return a

    def close(self):
        for a in self.apps:
            a.close()
        for name in self.names:                 # release anything still hung
            try:
                write_control(self.control[name])
            except OSError:
                pass


def states_seen(member_status) -> list[str]:
    return [t["state"] for t in member_status.get("transitions", [])]


def subsequence(want, seq) -> bool:
    it = iter(seq)
    return all(any(x == w for x in it) for w in want)


@pytest.fixture(scope="session")
def emuhsm(tmp_path_factory) -> str:
    return build_emuhsm(tmp_path_factory.mktemp("emuhsm-build"))


@pytest.fixture
def cluster(emuhsm, tmp_path):
    made = []

    def make(n=3, **group):
        c = Cluster(tmp_path / f"c{len(made)}", emuhsm, n, **group)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


def started(cluster_factory, supervise=None, keys=True, **group):
    c = cluster_factory(**group)
    a = c.app(supervise)
    a("open")
    if keys:
        a("keys")
    return c, a


def single_part_errors(res) -> list:
    return [e for e in res["errors"] if e[1] in SINGLE]


# =====================================================================================
# The scenarios

def test_device_errors_mid_load(cluster):
    """A member that starts answering CKR_DEVICE_ERROR under load: it leaves the rotation
    at once, the application sees no error at all, the member is retried, shows
    device error -> token not present -> recovering -> online, and serves again."""
    c, a = started(cluster, recovery_attempts=6)    # slack: the test heals it at ~2.5 s
    a("load_start", threads=8, mix=SINGLE)
    time.sleep(1.0)
    c.ctl("m1", fault="device_error", fault_after=20)
    failed = c.wait_state("m1", FAILED, timeout=10)
    assert "CKR_DEVICE_ERROR" in (failed["last_error"] or "")
    time.sleep(1.6)                      # the first attempt (after 1 s) fails: still faulty
    mid = c.member_status("m1")
    assert mid["state"] in ("token not present", "recovering", "device error")
    assert mid["recovery"] is not None and mid["recovery"]["of"] == 6
    served_before = c.stats("m1").get("served", 0)
    c.ctl("m1")                          # healthy again
    back = c.wait_state("m1", "online", timeout=10)
    time.sleep(1.0)
    # back in rotation: every member serves again (not only the one that came back)
    before = {n: c.wait_stats(n, lambda st: True).get("served", 0) for n in c.names}
    time.sleep(1.0)
    after = {n: c.wait_stats(n, lambda st: st.get("served", 0) > before[n]).get("served", 0)
             for n in c.names}
    res = a("load_stop")
    assert all(after[n] > before[n] + 20 for n in c.names), (before, after, a("engine"))
    assert single_part_errors(res) == [], res["errors"][:10]
    assert sum(res["count"].values()) > 500
    assert res["stuck_threads"] == 0
    seen = states_seen(back)
    assert subsequence(["online", "device error", "token not present", "recovering", "online"],
                       seen), seen
    st = c.status()
    assert st["processes"] == 1 and st["pids"] == [a.pid] and st["primary"] == "m0"
    m1 = next(m for m in st["members"] if m["name"] == "m1")
    assert m1["failed_over"] >= 1 and m1["recovery"] is None
    assert c.stats("m1")["served"] > served_before        # in rotation again
    log = c.log()
    assert "member 'm1': online -> device error" in log
    assert "member 'm1': recovering -> online" in log
    assert "CKR_DEVICE_ERROR" in log
    assert PIN not in log.replace("m1", "")     # (the PIN never appears)


@pytest.mark.parametrize("supervise", ["inline", "thread"])
def test_returning_member_gets_its_share_of_a_busy_load(cluster, supervise):
    """Members of fixed capacity (2 ms per command, one at a time: 500/s each) under a
    load that needs all three: when m1 returns after a failure, all three serve again
    and the throughput comes back (inline: the stub's fast path routes repeated
    operations itself; thread: every call goes through the engine's scheduler)."""
    c, a = started(cluster, supervise=None if supervise == "inline" else supervise,
                   recovery_attempts="unlimited")
    busy = dict(service_ms=2, capacity=1)
    for n in c.names:
        c.ctl(n, **busy)
    a("load_start", threads=8, mix=("sign",))
    time.sleep(1.5)
    c.ctl("m1", **busy, fault="device_error")
    c.wait_state("m1", FAILED, timeout=5)
    time.sleep(1.0)
    c.ctl("m1", **busy)
    c.wait_state("m1", "online", timeout=10)
    time.sleep(1.0)
    before = {n: c.wait_stats(n, lambda st: True).get("C_Sign", 0) for n in c.names}
    n0 = a("load_peek")["n"]
    time.sleep(1.5)
    n1 = a("load_peek")["n"]
    after = {n: c.stats(n).get("C_Sign", 0) for n in c.names}
    eng = a("engine")
    res = a("load_stop")
    assert res["errors"] == []
    share = {n: after[n] - before[n] for n in c.names}
    assert all(v > 150 for v in share.values()), (share, eng)      # ~500/s x 1.5 s each
    assert (n1 - n0) / 1.5 > 900, ((n1 - n0) / 1.5, share, eng)   # of 1500/s


def test_hung_member_fails_over_after_the_timeout(cluster):
    """A member that hangs with no heartbeat: after command_timeout (2 s) it is failed
    over, and the commands stuck in it are completed on the other members: the
    application sees a stall, no error. HASHIM_SUPERVISE=thread: the members are
    in-process modules, and only a call handed to a worker thread can be abandoned
    (inline, the application's own thread would be stuck inside the hung module until
    it answers; see the comment above SUPERVISE in shim/members/member.py)."""
    c, a = started(cluster, supervise="thread")
    a("load_start", threads=8, mix=SINGLE)
    time.sleep(1.0)
    t_hang = time.time()
    c.ctl("m1", fault="hang", fault_functions=HANG_ALL)
    failed = c.wait_state("m1", FAILED, timeout=10)
    t_failed = time.time()
    assert "command timeout" in (failed["last_error"] or ""), failed
    assert c.stats("m1").get("blocked", 0) >= 1
    time.sleep(0.5)
    c.ctl("m1")                          # it answers again (its late answers are dropped)
    c.wait_state("m1", "online", timeout=10)
    time.sleep(0.5)
    res = a("load_stop")
    assert single_part_errors(res) == [], res["errors"][:10]
    assert res["stuck_threads"] == 0
    stalls = [d for t0, d, op in res["slow"] if t_hang - 0.5 <= t0 <= t_failed]
    assert stalls, "no command was caught in the hung member"
    assert max(stalls) >= 1.5            # stalled (command_timeout 2 s), then re-run
    assert max(d for _, d, _ in res["slow"]) < 8.0
    log = c.log()
    assert "member 'm1': online -> device error (no answer for 2 s" in log
    assert "member 'm1': recovering -> online" in log


def test_hung_member_restarted_while_calls_are_stuck_in_it(cluster):
    """A member that stays hung past its first recovery attempt: the calls abandoned in it
    are still inside its module, so it is restarted without being finalised (their
    sessions stay open, new ones are opened beside them). When it answers again, those
    late calls land on their own old sessions and write only into hashim's private
    buffers: no application error, no operation left active anywhere, no crash."""
    c, a = started(cluster, supervise="thread", recovery_attempts="unlimited")
    a("load_start", threads=8, mix=SINGLE + MULTI)
    time.sleep(1.0)
    c.ctl("m1", fault="hang", fault_functions=HANG_ALL)
    c.wait_state("m1", FAILED, timeout=10)
    deadline = time.monotonic() + 15
    while "without finalising it" not in c.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "member 'm1': " in c.log() and "without finalising it" in c.log()
    c.ctl("m1")                          # the late calls come back now
    c.wait_state("m1", "online", timeout=15)
    time.sleep(1.5)
    res = a("load_stop")
    assert single_part_errors(res) == [], res["errors"][:10]
    assert all(e[2] == "DeviceError" for e in res["errors"]), res["errors"][:10]
    assert res["stuck_threads"] == 0
    assert a("sign")["result"] == "ok"
    assert a("mp_begin", kind="sign")["paused"]
    assert a("mp_end") == {"result": "ok", "single_after": "ok", "multi_after": "ok"}


def test_hung_member_inline_the_others_go_on(cluster):
    """Default supervision (calls on the application's threads): a hung member is failed
    over after command_timeout all the same (its stuck calls, the stub's fast path's
    included, count as running with no sign of life); the other threads go on at full
    speed meanwhile; the threads stuck inside it wait until it answers (they cannot be
    abandoned inline), then finish without an error."""
    c, a = started(cluster)
    a("load_start", threads=8, mix=SINGLE)
    time.sleep(1.0)
    t_hang = time.time()
    c.ctl("m1", fault="hang", fault_functions=HANG_ALL)
    failed = c.wait_state("m1", FAILED, timeout=10)
    assert "command timeout" in (failed["last_error"] or ""), failed
    assert time.time() - t_hang < 5.0
    n1 = a("load_peek")["n"]
    time.sleep(1.0)
    assert a("load_peek")["n"] - n1 > 200           # the others are served meanwhile
    t_heal = time.time()
    c.ctl("m1")
    c.wait_state("m1", "online", timeout=10)
    time.sleep(0.5)
    res = a("load_stop")
    assert res["errors"] == [] and res["stuck_threads"] == 0, res["errors"][:5]
    held = [d for t0, d, _ in res["slow"] if t0 + d >= t_heal - 0.2]
    assert held, "no thread was held by the hung member"      # released by the heal


def test_slow_member_is_not_failed_over(cluster):
    """A member whose commands take longer than command_timeout but which answers its
    heartbeats is not failed over: slow is not dead."""
    c, a = started(cluster)
    c.ctl("m2", fault="slow", slow_ms=2600, fault_functions=["C_Sign"])
    a("load_start", threads=3, mix=("sign",))
    time.sleep(3.5)
    res = a("load_stop")
    assert res["errors"] == []
    assert any(d >= 2.5 for _, d, _ in res["slow"]), res["slow"][:5]   # m2 did serve
    m2 = c.member_status("m2")
    assert m2["state"] == "online" and "device error" not in states_seen(m2), m2
    assert m2["heartbeat_rtt_ms"] is not None
    assert "'m2'" not in c.log().split("initialised")[-1]


def test_member_restart_lost_sessions(cluster):
    """The primary restarts under load (every session and its login gone): it fails on
    CKR_SESSION_HANDLE_INVALID, is re-initialised and logged back in within a second,
    becomes primary again, and key management goes on."""
    c, a = started(cluster)
    a("load_start", threads=8, mix=SINGLE)
    time.sleep(1.0)
    c.ctl("m0", lose_sessions=1)
    failed = c.wait_state("m0", FAILED, timeout=10)
    assert "SESSION_HANDLE_INVALID" in (failed["last_error"] or "") or \
        "CRYPTOKI_NOT_INITIALIZED" in (failed["last_error"] or ""), failed
    c.wait_state("m0", "online", timeout=10)
    time.sleep(1.0)
    res = a("load_stop")
    assert single_part_errors(res) == [], res["errors"][:10]
    assert c.wait_stats("m0", lambda st: st.get("reinits") == 1)["reinits"] == 1
    assert c.status()["primary"] == "m0"
    assert a("keygen", label="after-restart")["result"] == "ok"
    for name in c.names:
        labels = [o["label"] for o in c.direct_objects(name)]
        assert labels.count("after-restart") == 2, (name, labels)   # public + private
    assert "member 'm0': recovering -> online" in c.log()


def test_primary_fails_during_key_generation(cluster):
    """The primary answers CKR_DEVICE_ERROR to C_GenerateKeyPair: the next member
    becomes primary and generates the key, which ends up on every member -- once --
    including the old primary when it returns (checked on the tokens directly)."""
    c, a = started(cluster)
    c.ctl("m0", fault="device_error", fault_functions=["C_GenerateKeyPair"])
    r = a("keygen", label="kp-failover")
    assert r["result"] == "ok", r
    # generated on m1, the primary while m0 was out (m0 made the load keys before)
    assert c.wait_stats("m1", lambda st: st.get("C_GenerateKeyPair") == 1) \
        .get("C_GenerateKeyPair") == 1
    assert c.stats("m2").get("C_GenerateKeyPair", 0) == 0
    c.wait_state("m0", FAILED, timeout=5)
    back = c.wait_state("m0", "online", timeout=10)     # only key generation is faulty
    assert subsequence(["device error", "recovering", "online"], states_seen(back))
    c.ctl("m0")
    assert c.status()["primary"] == "m0"
    assert a("sign", label="kp-failover")["result"] == "ok"
    for name in c.names:
        objs = [o for o in c.direct_objects(name) if o["label"] == "kp-failover"]
        classes = sorted(o["class"] for o in objs)
        assert classes == [2, 3], (name, objs)   # one public, one private key
    assert a("objects", label="kp-failover")["count"] == 2
    log = c.log()
    assert "member 'm0': online -> device error (C_GenerateKeyPair returned CKR_DEVICE_ERROR)" \
        in log
    assert "sync: copied" in log and "to member 'm0'" in log


def test_all_members_lost_and_regained(cluster):
    """Every member fails: calls fail with a device-level code and no token is present;
    the members come back within the recovery window and the same application, same
    session, same login, carries on."""
    c, a = started(cluster)
    assert a("sign")["result"] == "ok"
    for name in c.names:
        c.ctl(name, fault="device_error")
    r = a("sign")
    assert r["result"] in ("DeviceError", "TokenNotPresent", "DeviceRemoved"), r
    for name in c.names:
        c.wait_state(name, FAILED, timeout=5)
    slot = a("slot")
    assert slot["present"][0] is False and slot["with_token"] == 0
    st = c.status()
    assert st["primary"] is None
    for name in c.names:
        c.ctl(name)
    for name in c.names:
        c.wait_state(name, "online", timeout=6)
    r = a("sign")                                  # no restart, no new login
    assert r["result"] == "ok", r
    assert a("slot")["present"][0] is True
    assert a("keygen", label="after-outage")["result"] == "ok"


def test_given_up_then_hashim_recover(cluster):
    """A member that fails every attempt is given up after recovery_attempts; once
    healthy it stays out until 'hashim recover' asks, then comes back at once."""
    c, a = started(cluster, keys=False)
    c.ctl("m2", fault="device_error")
    gone = c.wait_state("m2", "given up", timeout=15)
    assert gone["recovery"] == {"attempt": 3, "of": 3, "next_in_s": None}
    assert "recovery attempt 3" in gone["last_error"]
    c.ctl("m2")
    time.sleep(2.0)
    assert c.member_status("m2")["state"] == "given up"     # left alone
    bad = c.hashim("recover", "nosuch")
    assert bad.returncode == 2 and "no member 'nosuch'" in bad.stderr
    r = c.hashim("recover", "m2")
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert f"pid {a.pid}: member 'm2' is online" in r.stdout
    back = c.member_status("m2")
    assert back["state"] == "online"
    assert subsequence(["given up", "recovering", "online"], states_seen(back))
    log = c.log()
    assert "member 'm2': given up after 3 recovery attempts" in log
    assert "member 'm2': recovery requested by the operator" in log
    # with the member healthy but no module running: recover says so and exits 1
    a.close()
    r = c.hashim("recover", "m2")
    assert r.returncode == 1 and "no running module" in r.stderr
    assert "probed directly: online" in r.stdout


def test_recover_reports_a_failed_attempt(cluster):
    c, a = started(cluster, keys=False)
    c.ctl("m1", fault="device_error")
    c.wait_state("m1", "given up", timeout=15)
    r = c.hashim("recover", "m1", "--wait", "10")
    assert r.returncode == 1
    assert "recovery failed" in r.stdout and "CKR_DEVICE_ERROR" in r.stderr


def test_key_destroyed_while_member_down_is_not_resurrected(cluster):
    """A key destroyed while a member was away is destroyed on that member when it
    returns (tombstone), not copied back; a key made meanwhile is copied to it."""
    c, a = started(cluster, keys=False, recovery_attempts="unlimited")
    assert a("keygen", label="doomed")["result"] == "ok"
    assert a("keygen", label="kept", kind="aes")["result"] == "ok"
    for name in c.names:
        assert [o["label"] for o in c.direct_objects(name)].count("doomed") == 2
    c.ctl("m2", fault="device_error")
    c.wait_state("m2", FAILED, timeout=5)
    assert a("destroy", label="doomed")["destroyed"] == 2
    assert a("keygen", label="born-meanwhile")["result"] == "ok"
    assert [o["label"] for o in c.direct_objects("m2")].count("doomed") == 2   # still there
    c.ctl("m2")
    c.wait_state("m2", "online", timeout=10)
    for name in c.names:
        labels = [o["label"] for o in c.direct_objects(name)]
        assert "doomed" not in labels, (name, labels)
        assert labels.count("kept") == 1 and labels.count("born-meanwhile") == 2, (name, labels)
    assert a("objects", label="doomed")["count"] == 0
    assert "destroyed while it was away" in c.log()


@pytest.mark.parametrize("kind", ["sign", "encrypt"])
def test_multipart_on_a_failing_member(cluster, kind):
    """A multi-part operation pinned to a member that fails ends with CKR_DEVICE_ERROR;
    the session stays usable (single- and multi-part operations work right after)."""
    c, a = started(cluster)
    fn = "C_SignUpdate" if kind == "sign" else "C_EncryptUpdate"
    before = {n: c.stats(n).get(fn, 0) for n in c.names}
    assert a("mp_begin", kind=kind)["paused"]
    pinned = None
    deadline = time.monotonic() + 5
    while pinned is None and time.monotonic() < deadline:
        time.sleep(0.1)
        for n in c.names:
            if c.stats(n).get(fn, 0) > before[n]:
                pinned = n
    assert pinned is not None, "the first part reached no member"
    c.ctl(pinned, fault="device_error")
    r = a("mp_end")
    assert r == {"result": "DeviceError", "single_after": "ok", "multi_after": "ok"}, r
    c.wait_state(pinned, FAILED, timeout=5)


def test_key_made_while_a_member_synchronises(cluster):
    """A key generated while a returning member is being synchronised must end up on
    it too (and a key destroyed meanwhile must leave its tombstone there): a member
    synchronising on its way back receives copies (replication reaches it as well as
    the online members), not only what its sync's inventory saw."""
    c, a = started(cluster, keys=False)
    for i in range(4):                   # a few keys: the sync takes a while
        assert a("keygen", label=f"pad{i}", kind="aes")["result"] == "ok"
    c.ctl("m1", fault="device_error")
    c.wait_state("m1", FAILED, timeout=5)
    c.ctl("m1", service_ms=400)          # healthy but slow: its sync takes seconds
    c.wait_state("m1", "recovering", timeout=5)
    assert a("keygen", label="raced", kind="aes")["result"] == "ok"
    assert a("destroy", label="pad0")["destroyed"] == 1
    c.wait_state("m1", "online", timeout=30)
    c.ctl("m1")
    sets = {n: sorted((o["class"], o["label"] or "", o["internal"])
                      for o in c.direct_objects(n)) for n in c.names}
    assert "raced" in [lbl for _, lbl, _ in sets["m1"]]
    assert sets["m1"] == sets["m0"] == sets["m2"]
