"""Members in their own processes and on other hosts, over p11-kit's PKCS#11 RPC.

An **isolated** member (``isolate = true``) runs its module in a child ``p11-kit server``
that hashim starts, on a unix socket in a private directory (mode 0700) under the
config's state directory; hashim reaches it through a private copy of
``p11-kit-client.so``. A **remote** member is ``p11-kit-client.so`` itself, with
``P11_KIT_SERVER_ADDRESS`` in its environment (a socket that ssh or a TLS tunnel
forwards from the HSM's host). Both speak p11-kit's RPC; hashim writes no protocol.

What this file adds is the process side:

* ``Child``: one ``p11-kit server`` for one member, started from a long-lived thread
  (``_Spawner``) because the kernel's parent-death signal follows the *thread* that
  forked, not the process: a child started from a recovery thread would be killed when
  that thread ends. The child is a small ``sh`` that leads its own process group and
  runs ``p11-kit server -f`` in it; p11-kit server forks one ``p11-kit-remote`` per
  connection (which runs the module), so:

  - ``Child.kill()`` sends SIGKILL to the whole group: the listener and the process
    that runs the module, so every call stuck in a hung module returns at once
    (the client then answers CKR_DEVICE_ERROR);
  - the ``sh`` has ``prctl(PR_SET_PDEATHSIG, SIGTERM)`` (set in ``preexec_fn``) and a
    trap that turns SIGTERM into SIGKILL for its group: when the application ends —
    exit, crash or ``kill -9`` — nothing of the member is left, not even a
    ``p11-kit-remote`` stuck inside a hung module (a plain SIGKILL death signal on the
    listener would leave that one behind: death signals are not inherited by fork);
  - the ``sh`` checks that its parent is still the application (a parent that died
    between fork and prctl is not noticed by the kernel).

* ``Connection``: the client module's socket(s) to its server, found by peer address
  after ``C_Initialize``. ``shutdown()`` on them makes every call stuck on a stalled
  remote link return at once, as killing the child does for an isolated member.

* fork safety: ``os.register_at_fork`` makes a forked application child forget the
  parent's children (it must not kill or reuse them; it starts its own at its own
  ``C_Initialize``).
"""
from __future__ import annotations

import ctypes
import logging
import os
import queue
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
import urllib.parse

from .. import native
from ..errors import P11Error
from ..spec.attributes import TEMPLATE_ATTRS
from ..spec.constants import (CK_UNAVAILABLE_INFORMATION, CKF_OS_LOCKING_OK, CKF_RW_SESSION,
                              CKF_SERIAL_SESSION, CKR, CKR_OK)
from . import member as _member          # circular on purpose: used at call time only
from .module import Module, _Environment, ffi, private_copy

log = logging.getLogger("hashim")

CLIENT_MODULE = os.environ.get("HASHIM_P11KIT_CLIENT",
                               "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so")
P11KIT = os.environ.get("HASHIM_P11KIT") or shutil.which("p11-kit") or "/usr/bin/p11-kit"
# seconds for a child to listen on its socket
START_TIMEOUT = float(os.environ.get("HASHIM_ISOLATE_START_TIMEOUT", "15"))
# seconds for C_Initialize of a client module (connect + handshake; a stalled server
# or tunnel never answers) and for C_Finalize at stop
CONNECT_TIMEOUT = float(os.environ.get("HASHIM_CONNECT_TIMEOUT", "10"))
STOP_TIMEOUT = float(os.environ.get("HASHIM_STOP_TIMEOUT", "3"))
SOCKET_NAME = "pkcs11"
SUN_PATH_MAX = 107

PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):       # not Linux: children rely on their group kill only
    _prctl = None

# The child: leader of its own process group; SIGTERM (the parent-death signal) or the
# end of p11-kit server takes the whole group down with SIGKILL.
#   $1 = the application's pid, then the command
_WRAPPER = ('trap "kill -s KILL 0" TERM HUP INT; '
            '[ "$PPID" = "$1" ] || exit 111; shift; '
            '"$@" & wait $!; kill -s KILL 0')


def _preexec(parent: int):
    def run():
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        if os.getppid() != parent:            # the application died before prctl
            os._exit(111)
    return run


# ---- one long-lived thread that starts every child ----------------------------------
class _Spawner:
    """Starts children from one thread that lives as long as the process (the
    parent-death signal fires when the forking thread ends)."""

    def __init__(self):
        self.jobs = queue.Queue()
        self.pid = os.getpid()
        self.thread = threading.Thread(target=self._run, name="hashim-spawner", daemon=True)
        self.thread.start()

    def _run(self):
        while True:
            kwargs, box, done = self.jobs.get()
            try:
                box.append(subprocess.Popen(**kwargs))
            except BaseException as e:          # noqa: BLE001 - handed to the caller
                box.append(e)
            done.set()

    def popen(self, **kwargs) -> subprocess.Popen:
        box, done = [], threading.Event()
        self.jobs.put((kwargs, box, done))
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]


_spawner = None
_spawner_lock = threading.Lock()
_children = set()                        # live Child objects of this process


def _get_spawner() -> _Spawner:
    global _spawner
    with _spawner_lock:
        if _spawner is None or _spawner.pid != os.getpid():
            _spawner = _Spawner()
        return _spawner


def _after_fork_in_child():
    """A forked application child owns none of the parent's children: forget them
    (never kill them from here) and start its own spawner when it needs one."""
    global _spawner, _spawner_lock
    _spawner = None
    _spawner_lock = threading.Lock()
    for c in list(_children):
        c.disown()
    _children.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


# ---- helpers -----------------------------------------------------------------------
def instance_name(member: str, n: int) -> str:
    """A name for one start of a member's client module: unique per process and
    start, so every (re)start loads a fresh, independent client instance."""
    return f"{member}.{os.getpid()}.{n}"


def discard_copy(path: str):
    """Remove a private copy once it is loaded (the mapping stays; the name is never
    reused, so the next start gets a fresh instance and nothing piles up on disk)."""
    try:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


def address_path(address: str | None) -> str | None:
    """The socket path of a ``unix:path=...`` address (p11-kit percent-encodes it)."""
    if not address or not address.startswith("unix:path="):
        return None
    return urllib.parse.unquote(address[len("unix:path="):])


def unix_address(path: str) -> str:
    return "unix:path=" + urllib.parse.quote(path, safe="/._-~+@")


def _listening(path: str) -> bool:
    """Whether a unix socket is bound at ``path`` and listening (/proc/net/unix,
    without connecting: a probe connection would make p11-kit server fork a child
    that loads the module)."""
    try:
        with open("/proc/net/unix") as f:
            for line in f:
                parts = line.split(None, 7)
                if len(parts) == 8 and parts[7].rstrip("\n") == path:
                    if int(parts[3], 16) & 0x10000:      # __SO_ACCEPTCON
                        return True
        return False
    except OSError:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(path)
            return True
        except OSError:
            return False
        finally:
            s.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def _sweep(base: str):
    """Remove private directories left by processes that no longer exist (an
    application killed with SIGKILL leaves its directory; its children are gone)."""
    try:
        names = os.listdir(base)
    except OSError:
        return
    for n in names:
        try:
            pid = int(n.rsplit(".", 2)[-2])
        except (ValueError, IndexError):
            continue
        if pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(os.path.join(base, n), ignore_errors=True)


# ---- the child -----------------------------------------------------------------------
class Child:
    """One ``p11-kit server`` for one isolated member."""

    def __init__(self, member: str, module: str, token_label: str | None,
                 token_serial: str | None, env: dict | None, base_dir: str, n: int):
        self.member = member
        self.module = module
        self.token_label = token_label
        self.token_serial = token_serial
        self.env = dict(env or {})
        self.base_dir = base_dir
        self.n = n
        self.proc = None
        self.dir = None
        self.socket = None
        self.address = None
        self.owner = os.getpid()
        self.lock = threading.Lock()
        self.killed = False
        self.started_at = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def uri(self) -> str:
        q = lambda s: urllib.parse.quote(s, safe="")  # noqa: E731
        if self.token_label is not None:
            return f"pkcs11:token={q(self.token_label)}"
        return f"pkcs11:serial={q(self.token_serial)}"

    def _make_dir(self) -> str:
        name = f"{self.member}.{os.getpid()}.{self.n}"
        try:
            os.makedirs(self.base_dir, mode=0o700, exist_ok=True)
            os.chmod(self.base_dir, 0o700)
            _sweep(self.base_dir)
            d = os.path.join(self.base_dir, name)
            if len(os.path.join(d, SOCKET_NAME)) <= SUN_PATH_MAX:
                shutil.rmtree(d, ignore_errors=True)
                os.mkdir(d, 0o700)
                return d
        except OSError as e:
            log.warning("member '%s': cannot use %s for its socket (%s); using a "
                        "temporary directory", self.member, self.base_dir, e)
        return tempfile.mkdtemp(prefix=f"hashim-{self.member[:20]}.")    # mode 0700

    def start(self) -> str:
        """Start the server; return its address once it listens. Raises P11Error."""
        if not os.path.exists(P11KIT):
            raise P11Error(CKR.GENERAL_ERROR, f"member '{self.member}': isolate = true "
                           f"needs p11-kit ({P11KIT} not found; install the p11-kit and "
                           "p11-kit-modules packages)")
        self.dir = self._make_dir()
        os.chmod(self.dir, 0o700)
        self.socket = os.path.join(self.dir, SOCKET_NAME)
        env = dict(os.environ)
        env.pop("P11_KIT_SERVER_ADDRESS", None)
        env.update(self.env)
        argv = ["/bin/sh", "-c", _WRAPPER, "hashim-isolate", str(os.getpid()),
                P11KIT, "server", "-f", "-n", self.socket,
                "--provider", self.module, self.uri()]
        logpath = os.path.join(self.dir, "server.log")
        with open(logpath, "ab") as logf:
            try:
                self.proc = _get_spawner().popen(
                    args=argv, env=env, cwd=self.dir, stdin=subprocess.DEVNULL,
                    stdout=logf, stderr=logf, close_fds=True, process_group=0,
                    preexec_fn=_preexec(os.getpid()))
            except OSError as e:
                self._remove_dir()
                raise P11Error(CKR.DEVICE_ERROR,
                               f"member '{self.member}': cannot start p11-kit server: {e}")
        _children.add(self)
        self.started_at = time.monotonic()
        deadline = self.started_at + START_TIMEOUT
        while not _listening(self.socket):
            rc = self.proc.poll()
            if rc is not None or time.monotonic() > deadline:
                why = (f"exited with status {rc}" if rc is not None
                       else f"not listening after {START_TIMEOUT:g} s")
                tail = self.log_tail()
                self.kill()
                raise P11Error(CKR.DEVICE_ERROR,
                               f"member '{self.member}': p11-kit server {why}"
                               + (f": {tail}" if tail else ""))
            time.sleep(0.01)
        self.address = unix_address(self.socket)
        log.info("member '%s': isolated in p11-kit server pid %d at %s", self.member,
                 self.proc.pid, self.socket)
        return self.address

    def log_tail(self, n: int = 400) -> str:
        try:
            with open(os.path.join(self.dir, "server.log"), "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n))
                return f.read().decode("utf-8", "replace").strip().replace("\n", "; ")
        except (OSError, TypeError):
            return ""

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self):
        """SIGKILL the whole group (listener and the process running the module), reap
        the leader, remove the private directory. Never blocks on the member."""
        with self.lock:
            proc = self.proc
            if proc is None or self.killed:
                return
            self.killed = True
            if os.getpid() == self.owner and proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    log.error("member '%s': p11-kit server pid %d did not die", self.member,
                              proc.pid)
            _children.discard(self)
            self._remove_dir()
            log.info("member '%s': p11-kit server pid %d ended", self.member, proc.pid)

    def disown(self):
        """In a forked child: this process does not own the server."""
        self.owner = -1
        self.killed = True

    def _remove_dir(self):
        if self.dir and os.getpid() == self.owner:
            shutil.rmtree(self.dir, ignore_errors=True)


# ---- the client's connection -------------------------------------------------------
class Connection:
    """The sockets a client module instance holds to its server, recognised by their
    peer address (the server's socket path), so a stalled link can be cut locally."""

    def __init__(self, path: str, fds: list[tuple[int, int]]):
        self.path = path
        self.fds = fds                   # (fd, inode)

    @classmethod
    def find(cls, path: str | None, before: set[int] | None = None) -> "Connection | None":
        if not path:
            return None
        found = []
        try:
            fds = [int(x) for x in os.listdir("/proc/self/fd")]
        except OSError:
            return None
        for fd in fds:
            if before is not None and fd in before:
                continue
            peer = _peer(fd)
            if peer == path:
                try:
                    found.append((fd, os.fstat(fd).st_ino))
                except OSError:
                    pass
        return cls(path, found)

    def cut(self) -> int:
        """shutdown() every socket still ours: calls blocked on it return at once."""
        n = 0
        for fd, ino in self.fds:
            try:
                if os.fstat(fd).st_ino != ino or _peer(fd) != self.path:
                    continue                  # closed by the client, number reused
                s = socket.socket(fileno=os.dup(fd))
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    n += 1
                finally:
                    s.close()
            except OSError:
                pass
        return n


def _peer(fd: int) -> str | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    if not stat.S_ISSOCK(st.st_mode):
        return None
    try:
        s = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    try:
        if s.family != socket.AF_UNIX:
            return None
        p = s.getpeername()
        if isinstance(p, bytes):
            p = p.decode("utf-8", "surrogateescape")
        return p or None
    except OSError:
        return None
    finally:
        s.close()


def open_fds() -> set[int]:
    try:
        return {int(x) for x in os.listdir("/proc/self/fd")}
    except OSError:
        return set()


# ---- the member's life cycle over p11-kit's RPC ----------------------------------------
# Client module instances are never unloaded: a call abandoned in one (a stalled link)
# may still be running on a pool worker. One per (re)start, about 1 MB of mapping each.
_retired = []


def _bounded(m, fname, fn, args, seconds):
    """``fn(*args)`` given at most ``seconds``: on a pool worker when the stub has one,
    else on a daemon thread; raises MemberDown when it does not return in time (the
    call is left behind)."""
    if native.lib is not None:
        deadline = time.monotonic() + seconds

        def gone():
            if time.monotonic() > deadline:
                return f"{fname} did not return within {seconds:g} s"
        return _member.pooled(m, fname, fn, args, gone)
    box = []
    t = threading.Thread(target=lambda: box.append(fn(*args)), daemon=True,
                         name=f"hashim-{fname}-{m.name}")
    t.start()
    t.join(seconds)
    if not box:
        raise _member.MemberDown(m, f"{fname} did not return within {seconds:g} s")
    return box[0]


# ---- what p11-kit's RPC cannot carry ---------------------------------------------------
# p11-kit 0.24's RPC has no encoding for nested templates (CKA_WRAP_TEMPLATE,
# CKA_UNWRAP_TEMPLATE: any C_GetAttributeValue naming one, any template holding one,
# is answered CKR_DEVICE_ERROR by the client while the link is fine; CKA_DERIVE_TEMPLATE
# would travel as raw bytes, i.e. the caller's pointers, into the server). Left as is,
# one application query, or hashim reading a key's attributes to replicate it, would
# fail a healthy member. So, for members reached through the RPC only: those
# attributes are never sent; a read reports them unavailable (ulValueLen =
# CK_UNAVAILABLE_INFORMATION, CKR_ATTRIBUTE_TYPE_INVALID), a template holding one is
# refused with CKR_ATTRIBUTE_TYPE_INVALID (an application-level answer: no failover).
NESTED = frozenset(int(a) for a in TEMPLATE_ATTRS)

# function -> positions of (template, count) argument pairs
_TEMPLATE_ARGS = {
    "C_CreateObject": ((1, 2),), "C_CopyObject": ((2, 3),), "C_SetAttributeValue": ((2, 3),),
    "C_FindObjectsInit": ((1, 2),), "C_GenerateKey": ((2, 3),),
    "C_GenerateKeyPair": ((2, 3), (4, 5)), "C_UnwrapKey": ((5, 6),), "C_DeriveKey": ((3, 4),),
}


def _has_nested(t, n) -> bool:
    if t == ffi.NULL:
        return False
    for i in range(n):
        if t[i].type in NESTED:
            return True
    return False


def rpc_shim(module) -> dict:
    """Replacement entries of ``module.f`` (C callbacks, so the worker pool can run
    them) that keep nested templates off the wire; see NESTED above."""
    real = dict(module.f)
    out = {}

    def get_attribute_value(s, o, t, n):
        fn = real["C_GetAttributeValue"]
        if not _has_nested(t, n):
            return fn(s, o, t, n)
        keep = [i for i in range(n) if t[i].type not in NESTED]
        for i in range(n):
            if t[i].type in NESTED:
                t[i].ulValueLen = CK_UNAVAILABLE_INFORMATION
        if not keep:
            return CKR.ATTRIBUTE_TYPE_INVALID
        sub = ffi.new("CK_ATTRIBUTE[]", len(keep))
        for j, i in enumerate(keep):
            sub[j].type, sub[j].pValue, sub[j].ulValueLen = t[i].type, t[i].pValue, t[i].ulValueLen
        rv = fn(s, o, sub, len(keep))
        for j, i in enumerate(keep):
            t[i].ulValueLen = sub[j].ulValueLen
        return CKR.ATTRIBUTE_TYPE_INVALID if rv == CKR_OK else rv

    out["C_GetAttributeValue"] = get_attribute_value
    for fname, pairs in _TEMPLATE_ARGS.items():
        def guard(*args, _fn=real[fname], _pairs=pairs):
            for ti, ni in _pairs:
                if _has_nested(args[ti], args[ni]):
                    return CKR.ATTRIBUTE_TYPE_INVALID
            return _fn(*args)
        out[fname] = guard
    cbs = {name: ffi.callback(ffi.typeof(real[name]), fn, error=int(CKR.GENERAL_ERROR))
           for name, fn in out.items()}
    module.rpc_callbacks = cbs                   # keep them alive with the module
    return cbs


def start_member(m):
    """``Member.start`` for isolated and remote members: (isolated) start the child,
    then load a fresh private copy of the client module, connect (C_Initialize with the
    address in the environment, bounded by CONNECT_TIMEOUT), find the token by label or
    serial, open the anchor session. Raises P11Error; leaves nothing running then."""
    n = m.__dict__.get("rpc_starts", 0) + 1
    m.rpc_starts = n
    terminate(m)                        # a start without a stop leaves nothing behind
    m.child = m.connection = None
    if m.kind == "isolated":
        base = os.path.join(os.path.dirname(m.cache_dir), "members")
        m.child = Child(m.name, m.cfg.module, m.cfg.token_label, m.cfg.token_serial,
                        m.cfg.env, base, n)
        address = m.child.start()
        src, env = CLIENT_MODULE, {"P11_KIT_SERVER_ADDRESS": address}
    else:
        src, env = m.cfg.module, dict(m.cfg.env or {})
        address = env.get("P11_KIT_SERVER_ADDRESS")
    m.address = address
    module = None
    try:
        path = private_copy(src, instance_name(m.name, n), m.cache_dir)
        module = Module(m.name, path, env, invoke=m.invoke)
        try:
            with _Environment(env):      # newer p11-kit reads the address here already
                module.load()
        finally:
            discard_copy(path)
        _retired.append(module)
        module.f.update(rpc_shim(module))
        m.module, m.f = module, module.f
        before = open_fds()
        args = ffi.new("CK_C_INITIALIZE_ARGS *")
        args.flags = CKF_OS_LOCKING_OK
        with _Environment(env):          # p11-kit 0.24 reads the address here
            rv = _bounded(m, "C_Initialize", module.f["C_Initialize"], (args,),
                          CONNECT_TIMEOUT)
        if rv != CKR_OK:
            where = address or "p11-kit's default address"
            tail = m.child.log_tail() if m.child is not None else ""
            raise P11Error(rv, f"member '{m.name}': cannot reach p11-kit server at {where} "
                           f"(C_Initialize of the client answered {rv:#x})"
                           + (f": {tail}" if tail else ""))
        module.initialized = True
        m.connection = Connection.find(address_path(address), before)
        m.slot = module.find_slot(m.cfg.token_label, m.cfg.token_serial)
        m.generation += 1
        m.anchor = m.raw_open_session(CKF_SERIAL_SESSION | CKF_RW_SESSION)
    except BaseException:
        terminate(m)
        if module is not None and module.initialized:
            _finalize(m, module)
        raise


def _finalize(m, module):
    module.initialized = False
    try:
        _bounded(m, "C_Finalize", module.f["C_Finalize"], (ffi.NULL,), STOP_TIMEOUT)
    except Exception as e:          # a wedged member is not waited for
        log.warning("member '%s': C_Finalize of the client: %s", m.name, e)


def stop_member(m):
    """``Member.stop`` for isolated and remote members. An online member (application
    C_Finalize) is finalised first, then its child ends; a failed one has its child
    killed (or its connection cut) first, so nothing waits for it."""
    m.anchor = None
    if m.state != _member.ONLINE:
        terminate(m)
    module = m.module
    if module is not None and module.initialized:
        _finalize(m, module)
    terminate(m)


def endpoint(m) -> dict:
    """For status: an isolated member's child pid and socket address, a remote member's
    address (None where not applicable)."""
    child = m.__dict__.get("child")
    return {"pid": child.pid if child is not None and child.alive() else None,
            "address": m.__dict__.get("address")}


def terminate(m):
    """Kill an isolated member's child (its whole process group) / cut a remote
    member's connection: every call stuck in the member returns at once (the client
    answers CKR_DEVICE_ERROR). Cheap, never blocks on the member; idempotent."""
    child = m.__dict__.get("child")
    if child is not None:
        child.kill()
    conn = m.__dict__.get("connection")
    if conn is not None:
        conn.cut()


__all__ = ["Child", "Connection", "start_member", "stop_member", "terminate", "endpoint", "CLIENT_MODULE", "instance_name", "discard_copy",
           "address_path", "unix_address", "open_fds", "CONNECT_TIMEOUT", "STOP_TIMEOUT"]
