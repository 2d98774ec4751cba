"""Helpers for isolated and remote members: HSM "hosts" in network namespaces behind
mutually authenticated TLS tunnels, the certificates for them, a signing application
run through the HA slot in a subprocess, and what the tests look at (status files,
p11-kit processes).

    pki = PKI(tmp / "pki")                          # a CA, then server/client certs
    host = Host(tmp, "hsm-a", 1, token, pki)        # netns + veth + p11-kit server + TLS
    host.start()
    end = LocalEnd(tmp, host, pki); end.start()     # unix socket -> TLS -> host
    end.address                                     # P11_KIT_SERVER_ADDRESS for a member
    host.link_down(); host.link_up()                # veth down / up (a silent cut)
    host.kill_tunnel(); host.start_tunnel()         # the TLS listener killed (connections reset)
    host.stall(); host.resume()                     # p11-kit server SIGSTOPped / SIGCONTed
    host.close()

When the machine refuses network namespaces (no root, no ``ip``), ``Host`` runs the
same p11-kit server and TLS listener on 127.0.0.1 in this namespace (``host.netns`` is
None, ``link_down`` is not available) and ``why_no_netns()`` says why.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests import softhsm
from tests.clients import wait_for

REPO = Path(__file__).resolve().parent.parent
P11KIT_CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
P11KIT = shutil.which("p11-kit") or "/usr/bin/p11-kit"
SOCAT = shutil.which("socat") or "/usr/bin/socat"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"
IP = shutil.which("ip") or "/usr/sbin/ip"
PORT = 5443


def run(cmd, check=True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], check=check, capture_output=True,
                          text=True, **kw)


# ---------------------------------------------------------------------------------
# certificates
class PKI:
    """A throw-away CA; server certificates name the host (CN and SAN: DNS name and IP),
    client certificates are for clientAuth. EC P-256 keys, 2 days."""

    def __init__(self, base: Path):
        self.dir = Path(base)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca, self.ca_key = self.dir / "ca.pem", self.dir / "ca.key"
        run([OPENSSL, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", self.ca_key, "-out", self.ca, "-days", "2",
             "-subj", "/CN=hashim test CA"])

    def _issue(self, name: str, ext: str) -> tuple[Path, Path]:
        key, csr = self.dir / f"{name}.key", self.dir / f"{name}.csr"
        cert, extf = self.dir / f"{name}.pem", self.dir / f"{name}.ext"
        run([OPENSSL, "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
             "-keyout", key, "-out", csr, "-subj", f"/CN={name}"])
        extf.write_text(ext)
        run([OPENSSL, "x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
             "-CAcreateserial", "-out", cert, "-days", "2", "-extfile", extf])
        os.chmod(key, 0o600)
        return cert, key

    def server(self, name: str, ip: str) -> tuple[Path, Path]:
        return self._issue(name, f"subjectAltName=DNS:{name},IP:{ip}\n"
                                 "extendedKeyUsage=serverAuth\n")

    def client(self, name: str) -> tuple[Path, Path]:
        return self._issue(name, "extendedKeyUsage=clientAuth\n")


# ---------------------------------------------------------------------------------
# network namespaces
_netns_ok: tuple[bool, str] | None = None


def why_no_netns() -> str:
    """'' when this machine lets us make network namespaces and veth pairs, else why not."""
    global _netns_ok
    if _netns_ok is None:
        name = f"hxprobe{os.getpid()}"
        if os.environ.get("HASHIM_TEST_NO_NETNS"):
            _netns_ok = (False, "HASHIM_TEST_NO_NETNS is set")
        elif os.geteuid() != 0 or not os.path.exists(IP):
            _netns_ok = (False, "not root or no `ip` command")
        else:
            r = run([IP, "netns", "add", name], check=False)
            if r.returncode != 0:
                _netns_ok = (False, f"`ip netns add` refused: {r.stderr.strip()}")
            else:
                r = run([IP, "link", "add", f"hxp{os.getpid()}", "type", "veth", "peer",
                         "name", f"hxq{os.getpid()}"], check=False)
                run([IP, "link", "del", f"hxp{os.getpid()}"], check=False)
                run([IP, "netns", "del", name], check=False)
                _netns_ok = (r.returncode == 0, "" if r.returncode == 0 else
                             f"veth pairs refused: {r.stderr.strip()}")
    return "" if _netns_ok[0] else _netns_ok[1]


def _free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_listening(path: str | None = None, tcp: tuple[str, int] | None = None,
                    netns: str | None = None, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path is not None:
            if _unix_listening(path):
                return
        else:
            cmd = ([IP, "netns", "exec", netns] if netns else []) + ["ss", "-Hltn"]
            out = run(cmd, check=False).stdout
            want = f"{tcp[0]}:{tcp[1]} " if tcp[0] else f":{tcp[1]} "   # None: any address
            if want in out:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {path or tcp} after {timeout} s")


def _unix_listening(path: str) -> bool:
    """Connect to it (works across network namespaces, unlike /proc/net/unix)."""
    if not os.path.exists(path):
        return False
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
        return True
    except OSError:
        return False
    finally:
        s.close()


def _start(cmd, log: Path, env=None) -> subprocess.Popen:
    with open(log, "ab") as f:
        return subprocess.Popen([str(c) for c in cmd], stdin=subprocess.DEVNULL, stdout=f,
                                stderr=f, env=env, start_new_session=True)


def _killpg(p: subprocess.Popen | None, sig=signal.SIGKILL):
    if p is None:
        return
    try:
        os.killpg(p.pid, sig)
    except ProcessLookupError:
        pass
    if sig in (signal.SIGKILL, signal.SIGTERM):
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


class Host:
    """One HSM host: a token served by ``p11-kit server`` behind a TLS listener (socat
    OPENSSL-LISTEN, client certificate required), in its own network namespace reached
    over a veth pair (or, without namespaces, on 127.0.0.1)."""

    def __init__(self, base: Path, name: str, index: int, token: softhsm.Token, pki: PKI,
                 use_netns: bool | None = None):
        self.name, self.index, self.token, self.pki = name, index, token, pki
        self.dir = Path(base) / f"host-{name}"
        self.dir.mkdir(parents=True, exist_ok=True)
        if use_netns is None:
            use_netns = why_no_netns() == ""
        tag = os.getpid() & 0xFFFF
        if use_netns:
            self.netns = f"hx{tag}n{index}"
            self.veth, self.peer = f"hx{tag}a{index}", f"hx{tag}b{index}"
            net = f"10.{200 + index}.{tag >> 8}.{(tag & 0xFF) & 0xFC}"
            a, b, c, d = (int(x) for x in net.split("."))
            self.local_ip, self.ip = f"{a}.{b}.{c}.{d + 1}", f"{a}.{b}.{c}.{d + 2}"
            self.port = PORT
        else:
            self.netns = None
            self.local_ip, self.ip, self.port = "127.0.0.1", "127.0.0.1", _free_port()
        self.socket = str(self.dir / "pkcs11.sock")     # p11-kit server's, on the host
        self.cert = self.key = None
        self.server = self.tunnel = None
        self.procs = []                                 # started with run_in()

    def _ns(self, cmd):
        return ([IP, "netns", "exec", self.netns] if self.netns else []) + list(cmd)

    def run_in(self, cmd, log: Path, env=None) -> subprocess.Popen:
        """Start ``cmd`` on this host (in its namespace), in a session of its own."""
        p = _start(self._ns(cmd), log, env)
        self.procs.append(p)
        return p

    def start(self):
        self.start_network()
        self.start_server()
        self.start_tunnel()

    def start_network(self):
        if self.netns:
            for c in ([IP, "netns", "add", self.netns],
                      [IP, "link", "add", self.veth, "type", "veth", "peer", "name", self.peer],
                      [IP, "link", "set", self.peer, "netns", self.netns],
                      [IP, "addr", "add", f"{self.local_ip}/30", "dev", self.veth],
                      [IP, "link", "set", self.veth, "up"],
                      self._ns([IP, "addr", "add", f"{self.ip}/30", "dev", self.peer]),
                      self._ns([IP, "link", "set", self.peer, "up"]),
                      self._ns([IP, "link", "set", "lo", "up"])):
                run(c)

    def start_server(self):
        env = dict(os.environ, **self.token.env)
        self.server = _start(self._ns([P11KIT, "server", "-f", "-n", self.socket,
                                       "--provider", self.token.lib,
                                       f"pkcs11:token={self.token.label}"]),
                             self.dir / "server.log", env)
        wait_listening(path=self.socket)

    def start_tunnel(self):
        """socat OPENSSL-LISTEN: TLS, a client certificate signed by the CA required,
        one forked child per connection, each to the p11-kit server's socket. TCP_NODELAY
        on both ends: p11-kit writes a message in pieces, and Nagle + delayed ACKs
        otherwise add 40 ms to some calls."""
        if self.cert is None:
            self.cert, self.key = self.pki.server(self.name, self.ip)
        self.tunnel = _start(self._ns([
            SOCAT, f"OPENSSL-LISTEN:{self.port},bind={self.ip},reuseaddr,fork,nodelay,"
                   f"cert={self.cert},key={self.key},cafile={self.pki.ca},verify=1",
            f"UNIX-CONNECT:{self.socket}"]), self.dir / "tunnel.log")
        wait_listening(tcp=(self.ip, self.port), netns=self.netns)

    def kill_tunnel(self):
        """The TLS listener and every connection through it, gone (peers see a reset)."""
        _killpg(self.tunnel)
        self.tunnel = None

    def link_down(self):
        assert self.netns, "no veth without network namespaces"
        run([IP, "link", "set", self.veth, "down"])

    def link_up(self):
        assert self.netns
        run([IP, "link", "set", self.veth, "up"])
        run([IP, "addr", "replace", f"{self.local_ip}/30", "dev", self.veth])

    def stall(self):
        """SIGSTOP p11-kit server and the processes serving connections: the link stays
        up, nothing answers."""
        os.killpg(self.server.pid, signal.SIGSTOP)

    def resume(self):
        os.killpg(self.server.pid, signal.SIGCONT)

    def close(self):
        if self.server is not None:
            try:
                os.killpg(self.server.pid, signal.SIGCONT)
            except ProcessLookupError:
                pass
        _killpg(self.tunnel)
        _killpg(self.server)
        for p in self.procs:
            _killpg(p)
        if self.netns:
            run([IP, "link", "del", self.veth], check=False)
            run([IP, "netns", "del", self.netns], check=False)


class LocalEnd:
    """The application side of a tunnel: socat UNIX-LISTEN (mode 0600, in a 0700
    directory) forwarding each connection over TLS (client certificate, server name and
    CA checked) to a Host."""

    def __init__(self, base: Path, host: Host, pki: PKI, name: str = "hashim-client"):
        self.host, self.pki = host, pki
        self.dir = Path(base) / f"end-{host.name}"
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir, 0o700)
        self.path = str(self.dir / "p11.sock")
        self.cert, self.key = pki.client(f"{name}-{host.name}")
        self.proc = None

    @property
    def address(self) -> str:
        return f"unix:path={self.path}"

    def start(self):
        self.proc = _start([
            SOCAT, f"UNIX-LISTEN:{self.path},fork,unlink-early,mode=600",
            f"OPENSSL:{self.host.ip}:{self.host.port},cert={self.cert},key={self.key},"
            f"cafile={self.pki.ca},verify=1,commonname={self.host.name},connect-timeout=2,"
            "nodelay"],
            self.dir / "socat.log")
        wait_listening(path=self.path)

    def close(self):
        _killpg(self.proc)


# ---------------------------------------------------------------------------------
# processes
def p11kit_processes(marker: str) -> list[dict]:
    """Live (not zombie) p11-kit server / remote processes, and our ``sh`` wrappers,
    whose command line or environment mentions ``marker`` (a test's own path)."""
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                st = f.read()
            comm = st[st.index("(") + 1:st.rindex(")")]
            state = st[st.rindex(")") + 2]
            with open(f"/proc/{d}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
        if state == "Z":
            continue
        if (comm.startswith("p11-kit") or "hashim-isolate" in cmd) and marker in cmd:
            out.append({"pid": int(d), "comm": comm, "cmd": cmd.strip()})
    return out


def children_of(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


# ---------------------------------------------------------------------------------
# a group over isolated / remote members
@dataclass
class MemberSpec:
    name: str
    module: str
    label: str
    env: dict[str, str]
    isolate: bool = False


def toml(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml(x)}" for k, x in v.items()) + " }"
    return softhsm.toml_str(str(v))


FAST = {"command_timeout": 2.0, "heartbeat_interval": 0.5, "recovery_interval": 1.0,
        "recovery_attempts": "unlimited"}


def write_config(path: Path, members: list[MemberSpec], *, label: str = "ha-iso",
                 **group) -> Path:
    lines = ["[group]", f"label = {toml(label)}"]
    lines += [f"{k} = {toml(v)}" for k, v in group.items() if v is not None]
    for m in members:
        lines += ["", "[[member]]", f"name = {toml(m.name)}", f"module = {toml(m.module)}",
                  f"token_label = {toml(m.label)}", f"env = {toml(m.env)}"]
        if m.isolate:
            lines.append("isolate = true")
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)


def hashim_cli(conf: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("HASHIM_") and k not in ("SOFTHSM2_CONF", "P11_KIT_SERVER_ADDRESS")}
    env.update(PYTHONPATH=str(REPO), HASHIM_CONF=str(conf), HASHIM_SO_PIN=softhsm.SO_PIN)
    return subprocess.run([sys.executable, "-m", "shim.cli", *args], env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, cwd=str(REPO))


def domain_init(conf: Path):
    r = hashim_cli(conf, "domain", "init", "--config", str(conf))
    if r.returncode != 0:
        raise RuntimeError(f"hashim domain init failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")


def make_signing_key(base: Path) -> tuple[Path, Path]:
    """An EC P-256 key pair as PEM files (private PKCS#8, public SPKI)."""
    priv, pub = Path(base) / "sig.key.pem", Path(base) / "sig.pub.pem"
    run([OPENSSL, "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-out", priv])
    run([OPENSSL, "pkey", "-in", priv, "-pubout", "-out", pub])
    return priv, pub


def import_key(token: softhsm.Token, pem: Path, label: str = "sig", id_hex: str = "5101"):
    """The same key on every member token, put there directly (as an operator clones a
    key onto each HSM): p11-kit's RPC cannot carry CKM_AES_KEY_WRAP(_PAD), the only
    wrapping SoftHSM2 offers for private keys, so hashim cannot replicate private keys
    to or from isolated / remote SoftHSM2 members."""
    run(["softhsm2-util", "--import", pem, "--token", token.label, "--label", label,
         "--id", id_hex, "--pin", token.pin], env=dict(os.environ, **token.env))


def read_status(state_dir: Path, pid: int) -> dict | None:
    try:
        return json.loads((Path(state_dir) / f"status-{pid}.json").read_text())
    except (OSError, ValueError):
        return None


def member_status(state_dir: Path, pid: int, name: str) -> dict:
    st = read_status(state_dir, pid) or {}
    for m in st.get("members", []):
        if m.get("name") == name:
            return m
    return {}


# ---------------------------------------------------------------------------------
# the signing application
SIGNER = r'''
import json, os, sys, threading, time
import pkcs11
from pkcs11 import Mechanism, ObjectClass
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils

A = json.loads(sys.argv[1])
pub = serialization.load_pem_public_key(open(A["pub"], "rb").read())
lib = pkcs11.lib(A["module"])
tok = lib.get_token(token_label=A["label"])
first = tok.open(user_pin=A["pin"])
lock = threading.Lock()
stats = {"ok": 0, "errors": [], "bad_sigs": 0, "max_ms": 0.0, "stalls": [], "threads": A["threads"],
         "pid": os.getpid(), "random_ok": 0}
stop = threading.Event()
DIGEST = b"\x42" * 32

def der(sig):
    return utils.encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))

def worker(i):
    s = tok.open()
    key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=A["key"])
    n = 0
    reopen = A.get("reopen") or 0
    while not stop.is_set():
        if reopen and n and n % reopen == 0:     # a session per batch of requests
            try:
                s.close()
                s = tok.open()
                key = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=A["key"])
            except pkcs11.PKCS11Error as e:
                with lock:
                    stats["errors"].append([round(time.time(), 3), "reopen: " + type(e).__name__])
        t0 = time.monotonic()
        try:
            sig = key.sign(DIGEST, mechanism=Mechanism.ECDSA)
            if A.get("verify", True) and n % 8 == 0:
                pub.verify(der(sig), DIGEST, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
            ok = True
        except pkcs11.PKCS11Error as e:
            ok = False
            err = f"{type(e).__name__}"
        except Exception as e:
            ok = False
            err = f"{type(e).__name__}: {e}"
        dt = (time.monotonic() - t0) * 1000
        n += 1
        with lock:
            if ok:
                stats["ok"] += 1
            else:
                stats["errors"].append([round(time.time(), 3), err])
            if dt > stats["max_ms"]:
                stats["max_ms"] = dt
            if dt > A.get("stall_ms", 250):
                stats["stalls"].append([round(time.time(), 3), round(dt)])

threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(A["threads"])]
for t in threads:
    t.start()

def publish():
    with lock:
        body = json.dumps(stats)
    tmp = A["progress"] + ".tmp"
    with open(tmp, "w") as f:
        f.write(body)
    os.replace(tmp, A["progress"])

while not os.path.exists(A["stop"]):
    publish()
    time.sleep(0.1)
stop.set()
for t in threads:
    t.join(30)
publish()
print("@@RESULT@@ " + json.dumps(stats), flush=True)
how = A.get("exit", "finalize")
if how == "finalize":        # python-pkcs11 calls C_Finalize when the interpreter ends
    first.close()
    sys.exit(0)
elif how == "exit":          # the process ends without C_Finalize
    os._exit(0)
elif how == "wait":          # until killed
    while True:
        time.sleep(1)
'''


@dataclass
class Signer:
    """The application: ``threads`` threads signing with one key through the HA slot
    (python-pkcs11), each signature checked now and then with the public key, each
    thread opening a new session every ``reopen`` signatures (0: never); counts
    successes and errors, longest call, calls over ``stall_ms`` (time, ms)."""
    proc: subprocess.Popen
    dir: Path
    progress: Path
    stop_file: Path

    @classmethod
    def start(cls, base: Path, conf: Path, module: str, label: str, pub: Path,
              key: str = "sig", threads: int = 4, exit: str = "finalize",
              reopen: int = 200, stall_ms: float = 250,
              env: dict | None = None) -> "Signer":
        d = Path(base)
        d.mkdir(parents=True, exist_ok=True)
        progress, stop = d / "progress.json", d / "stop"
        for p in (progress, stop):
            if p.exists():
                p.unlink()
        args = {"module": module, "label": label, "pin": softhsm.PIN, "key": key,
                "pub": str(pub), "threads": threads, "progress": str(progress),
                "stop": str(stop), "exit": exit, "reopen": reopen,
                "stall_ms": stall_ms}
        e = {k: v for k, v in os.environ.items()
             if not k.startswith("HASHIM_") and k not in ("SOFTHSM2_CONF",
                                                          "P11_KIT_SERVER_ADDRESS")}
        e.update(PYTHONPATH=str(REPO), HASHIM_CONF=str(conf), PYTHONFAULTHANDLER="1")
        e.update(env or {})
        with open(d / "app.out", "wb") as out, open(d / "app.err", "wb") as err:
            p = subprocess.Popen([sys.executable, "-c", SIGNER, json.dumps(args)], env=e,
                                 stdout=out, stderr=err, cwd=str(REPO))
        return cls(p, d, progress, stop)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stats(self) -> dict:
        try:
            return json.loads(self.progress.read_text())
        except (OSError, ValueError):
            return {}

    def wait_signing(self, more: int = 50, timeout: float = 30.0) -> dict:
        """Wait until ``more`` further signatures have been made."""
        base = self.stats().get("ok", 0)

        def progressed():
            if self.proc.poll() is not None:
                raise AssertionError(f"the application exited ({self.proc.returncode}):\n"
                                     + self.output())
            st = self.stats()
            return st if st.get("ok", 0) >= base + more else None
        return wait_for(progressed, timeout, f"{more} more signatures")

    def finish(self, timeout: float = 60.0) -> dict:
        self.stop_file.write_text("stop")
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError("the application did not stop:\n" + self.output())
        out = (self.dir / "app.out").read_text(errors="replace")
        for line in reversed(out.splitlines()):
            if line.startswith("@@RESULT@@ "):
                r = json.loads(line[len("@@RESULT@@ "):])
                r["returncode"] = self.proc.returncode
                return r
        raise AssertionError(f"no result from the application:\n{self.output()}")

    def output(self) -> str:
        def tail(p):
            try:
                return p.read_text(errors="replace")[-4000:]
            except OSError:
                return ""
        return f"--- stdout ---\n{tail(self.dir / 'app.out')}\n--- stderr ---\n" \
               f"{tail(self.dir / 'app.err')}"

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def dedent(s: str) -> str:
    return textwrap.dedent(s)


def hashim_module() -> str:
    """The built hashim module (``HASHIM_MODULE`` overrides ``shim.module_path()``)."""
    if os.environ.get("HASHIM_MODULE"):
        return os.environ["HASHIM_MODULE"]
    env = dict(os.environ, PYTHONPATH=str(REPO))      # this checkout's module
    p = subprocess.run([sys.executable, "-c", "import shim; print(shim.module_path())"],
                       env=env, capture_output=True, text=True, timeout=120, cwd=str(REPO))
    path = p.stdout.strip().splitlines()[-1] if p.stdout.strip() else ""
    if p.returncode != 0 or not path or not Path(path).is_file():
        raise RuntimeError("hashim module not available (pip install -e . ?): "
                           + p.stderr.strip()[-2000:])
    return path


__all__ = ["PKI", "Host", "LocalEnd", "MemberSpec", "Signer", "write_config", "domain_init",
           "make_signing_key", "import_key", "read_status", "member_status", "wait_for",
           "p11kit_processes", "why_no_netns", "FAST", "P11KIT_CLIENT", "hashim_cli",
           "children_of", "hashim_module", "field"]
