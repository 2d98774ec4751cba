"""A member of the HA group: its module, its token's slot, its state and counters.

Every call to a member goes through ``Member.call``: it counts the call in flight
(least-busy scheduling and supervision read that), and turns a device-level answer
into ``MemberDown`` after marking the member failed. Application-level answers are
returned unchanged."""
from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time

from ..errors import P11Error, rv_name
from ..spec.constants import CKF_RW_SESSION, CKF_SERIAL_SESSION, CKR, CKR_OK
from .. import native
from .module import Module, ffi, private_copy
from . import isolated

log = logging.getLogger("hashim")

ONLINE = "online"
DEVICE_ERROR = "device error"          # has just failed
TOKEN_NOT_PRESENT = "token not present"  # failed, waiting for recovery
RECOVERING = "recovering"
GIVEN_UP = "given up"

# Answers that mean the member, not the request, is in trouble: the member fails over.
#   CKR_DEVICE_ERROR, CKR_DEVICE_REMOVED      the device (or the link to it: p11-kit-client
#                                             answers DEVICE_ERROR once its connection is cut)
#   CKR_DEVICE_MEMORY                         the token's own memory failed or is full
#   CKR_TOKEN_NOT_PRESENT, _NOT_RECOGNIZED    the token went away
#   CKR_CRYPTOKI_NOT_INITIALIZED              the module was finalised or restarted under us
#   CKR_SESSION_HANDLE_INVALID, _CLOSED       lost sessions: the member restarted (hashim only
#                                             ever passes a member the session handles that
#                                             member gave it, so these are never the
#                                             application's mistake)
# Not in it, on purpose: CKR_GENERAL_ERROR and CKR_FUNCTION_FAILED (modules answer them for
# requests they dislike: failing members over for them would let one bad request take the
# whole group down, member after member), and every application-level code (bad mechanism,
# wrong length, invalid signature, not logged in, ...): returned to the application as is.
DEVICE_LEVEL = frozenset({
    CKR.DEVICE_ERROR, CKR.DEVICE_REMOVED, CKR.DEVICE_MEMORY, CKR.TOKEN_NOT_PRESENT,
    CKR.TOKEN_NOT_RECOGNIZED, CKR.CRYPTOKI_NOT_INITIALIZED, CKR.SESSION_HANDLE_INVALID,
    CKR.SESSION_CLOSED,
})


# How member calls run:
#   "thread" hands each call to a worker of the stub's pool and waits with a deadline:
#            a hung call is abandoned and re-run elsewhere, the application goes on;
#   "inline" calls on the application's thread: cheaper, and the member sees the
#            application's thread (some modules share thread-local library state with
#            their host: SoftHSM2 and pkcs11-tool share OpenSSL's, and pkcs11-tool's
#            EC key decoding failed when SoftHSM2 ran on another thread); a hung call
#            keeps its caller waiting while the group fails over for everyone else.
#   "auto"   (default) inline for in-process members, thread for isolated and remote
#            ones (their module runs in another process: nothing thread-local shared).
SUPERVISE = os.environ.get("HASHIM_SUPERVISE", "auto")
WAIT_SLICE = 0.05       # seconds between two looks at a still-running call
HISTORY = 16            # transitions kept per member for the status


def _word(a, keep):
    """A call argument as a machine word for the worker pool."""
    if type(a) is int:
        return a
    if type(a) is bytes:
        b = ffi.from_buffer(a)
        keep.append(b)
        a = b
    return int(ffi.cast("uintptr_t", a))


RAW_TIMEOUT = float(os.environ.get("HASHIM_START_TIMEOUT", "60"))


class _Reaper:
    """Abandoned calls: a worker still runs each one inside its member's module. They
    are waited for here, on one background thread, with their arguments kept alive
    until they return (an engine-owned buffer must not be freed under a call that may
    still read it), so that a member's restart can tell whether any of its calls is
    still inside its module (``abandoned(member)``): finalising a module under a call,
    or letting a late call land on a session of the next instance (same handle
    numbers), would hurt whoever owns that session then."""

    def __init__(self):
        self.lock = threading.Lock()
        self.jobs = []              # [member, job, rv, keep-alive]
        self.thread = None

    def adopt(self, member, job, rv, keep):
        with self.lock:
            self.jobs.append((member, job, rv, keep))
            if self.thread is None:
                self.thread = threading.Thread(target=self.run, name="hashim-reaper",
                                               daemon=True)
                self.thread.start()

    def count(self, member) -> int:
        with self.lock:
            return sum(1 for j in self.jobs if j[0] is member)

    def run(self):
        lib = native.lib
        while True:
            with self.lock:
                jobs = list(self.jobs)
                if not jobs:
                    self.thread = None
                    return
            for item in jobs:
                if lib.hashim_wait(item[1], 0.0, item[2]) != 0:    # returned: job freed
                    with self.lock:
                        self.jobs.remove(item)
            time.sleep(WAIT_SLICE)

    def after_fork(self):
        self.lock = threading.Lock()
        self.jobs = []              # the parent's workers: not ours
        self.thread = None


_reaper = _Reaper()
os.register_at_fork(after_in_child=_reaper.after_fork)


def abandoned(member) -> int:
    """Calls given up on (failover) that are still running inside ``member``'s module."""
    return _reaper.count(member)


# ---- outputs of a handed-off call go to private buffers ---------------------------------
# A call handed to a worker may be abandoned (failover) and still return later: whatever
# it writes then must not land in the application's buffers, which the application freed
# or reused once the re-run answered. So a handed-off call writes into buffers of its own
# (kept alive by the reaper when abandoned) and the results are copied out only when it
# returns in time. Driven by the function table (shim/spec/functions.py): every output
# parameter shape of PKCS#11 2.40, by C type and position:
#   buf     CK_BYTE_PTR + CK_ULONG_PTR        data out, its length in/out (NULL: a query)
#   fixed   C_GenerateRandom's buffer          exactly ulRandomLen bytes out
#   list    CK_SLOT_ID_PTR/CK_MECHANISM_TYPE_PTR + CK_ULONG_PTR count in/out
#   handles C_FindObjects' CK_OBJECT_HANDLE_PTR, ulMaxObjectCount entries
#   ulong   any other CK_ULONG_PTR / CK_SESSION_HANDLE_PTR / CK_OBJECT_HANDLE_PTR
#   struct  CK_INFO_PTR, CK_SLOT_INFO_PTR, CK_TOKEN_INFO_PTR, CK_SESSION_INFO_PTR,
#           CK_MECHANISM_INFO_PTR
#   attrs   C_GetAttributeValue's template: each value buffer (nested templates, such
#           as CKA_WRAP_TEMPLATE, are passed through)
# Inputs are not copied: a late call may read freed input (its result is dropped), but
# it writes nowhere that is not its own.
STRUCTS = {"CK_INFO_PTR": "CK_INFO", "CK_SLOT_INFO_PTR": "CK_SLOT_INFO",
           "CK_TOKEN_INFO_PTR": "CK_TOKEN_INFO", "CK_SESSION_INFO_PTR": "CK_SESSION_INFO",
           "CK_MECHANISM_INFO_PTR": "CK_MECHANISM_INFO"}
ULONG_OUT = {"CK_ULONG_PTR", "CK_SESSION_HANDLE_PTR", "CK_OBJECT_HANDLE_PTR"}
LIST_OUT = {"CK_SLOT_ID_PTR", "CK_MECHANISM_TYPE_PTR"}
ULONG_SIZE = ffi.sizeof("CK_ULONG")
ATTR_SIZE = ffi.sizeof("CK_ATTRIBUTE")
UNAVAILABLE = (1 << (8 * ULONG_SIZE)) - 1
BOUNCE_MAX = 1 << 26    # a larger buffer is announced to the member as this large
_raw = ffi.new_allocator(should_clear_after_alloc=False)


def _output_plan(f):
    steps, used = [], set()
    args = f.args
    for i, (t, _) in enumerate(args):
        if i in used:
            continue
        nxt = args[i + 1][0] if i + 1 < len(args) else None
        if t == "CK_BYTE_PTR" and nxt == "CK_ULONG_PTR":
            steps.append(("buf", i, i + 1))
            used.add(i + 1)
        elif t == "CK_BYTE_PTR" and f.name == "C_GenerateRandom":
            steps.append(("fixed", i, i + 1))
        elif t in LIST_OUT and nxt == "CK_ULONG_PTR":
            steps.append(("list", i, i + 1))
            used.add(i + 1)
        elif t == "CK_OBJECT_HANDLE_PTR" and nxt == "CK_ULONG":
            steps.append(("handles", i, i + 1))
        elif t in ULONG_OUT:
            steps.append(("ulong", i, None))
        elif t in STRUCTS:
            steps.append(("struct", i, STRUCTS[t]))
        elif t == "CK_ATTRIBUTE_PTR" and f.name == "C_GetAttributeValue":
            steps.append(("attrs", i, i + 1))
    return tuple(steps)


def _plans():
    from ..spec.functions import FUNCTIONS_V3
    return {f.name: p for f in FUNCTIONS_V3 if (p := _output_plan(f))}


OUTPUT_PLANS = _plans()


def _ulong(addr):
    return ffi.cast("CK_ULONG *", addr)


def _bounce(plan, words, keep):
    """Point ``words`` at private output buffers; returns what copy_out needs."""
    from ..spec.attributes import TEMPLATE_ATTRS
    out = []
    for kind, i, j in plan:
        app = words[i]
        if kind == "buf" or kind == "list":
            app_len = words[j]
            if not app_len:
                continue
            cap = _ulong(app_len)[0]
            if app:
                cap = min(cap, BOUNCE_MAX if kind == "buf" else BOUNCE_MAX // ULONG_SIZE)
            n = ffi.new("CK_ULONG *", cap)
            keep.append(n)
            words[j] = int(ffi.cast("uintptr_t", n))
            priv = None
            if app:
                priv = _raw("char[]", max(1, cap if kind == "buf" else cap * ULONG_SIZE))
                keep.append(priv)
                words[i] = int(ffi.cast("uintptr_t", priv))
            out.append((kind, app, priv, cap, app_len, n))
        elif not app:
            continue
        elif kind == "fixed" or kind == "handles":
            size = min(words[j], BOUNCE_MAX) * (ULONG_SIZE if kind == "handles" else 1)
            if size < words[j] * (ULONG_SIZE if kind == "handles" else 1):
                continue            # absurdly large: passed through as it is
            priv = _raw("char[]", max(1, size))
            keep.append(priv)
            words[i] = int(ffi.cast("uintptr_t", priv))
            out.append((kind, app, priv, size, None, None))
        elif kind == "ulong":
            priv = ffi.new("CK_ULONG *", _ulong(app)[0])
            keep.append(priv)
            words[i] = int(ffi.cast("uintptr_t", priv))
            out.append((kind, app, priv, ULONG_SIZE, None, None))
        elif kind == "struct":
            priv = ffi.new(j + " *")
            keep.append(priv)
            words[i] = int(ffi.cast("uintptr_t", priv))
            out.append((kind, app, priv, ffi.sizeof(j), None, None))
        elif kind == "attrs":
            count = words[j]
            src = ffi.cast("CK_ATTRIBUTE *", app)
            priv = ffi.new("CK_ATTRIBUTE[]", max(1, count))
            keep.append(priv)
            for k in range(count):
                priv[k].type = src[k].type
                priv[k].ulValueLen = src[k].ulValueLen
                if src[k].pValue != ffi.NULL and src[k].type not in TEMPLATE_ATTRS:
                    if src[k].ulValueLen > BOUNCE_MAX:
                        priv[k].pValue = src[k].pValue
                        continue
                    b = _raw("char[]", max(1, src[k].ulValueLen))
                    keep.append(b)
                    priv[k].pValue = b
                else:
                    priv[k].pValue = src[k].pValue
            words[i] = int(ffi.cast("uintptr_t", priv))
            out.append((kind, app, priv, count, None, None))
    return out


def _copy_out(bounced, rv):
    """The call returned in time: its outputs to the caller's buffers."""
    ok = rv == CKR_OK
    for kind, app, priv, cap, app_len, n in bounced:
        if kind == "buf" or kind == "list":
            got = n[0]
            _ulong(app_len)[0] = got
            if app and ok:
                unit = 1 if kind == "buf" else ULONG_SIZE
                ffi.memmove(ffi.cast("char *", app), priv, min(got, cap) * unit)
        elif kind == "ulong":
            _ulong(app)[0] = priv[0]
        elif kind == "attrs":
            dst = ffi.cast("CK_ATTRIBUTE *", app)
            for k in range(cap):
                got, room = priv[k].ulValueLen, dst[k].ulValueLen
                if dst[k].pValue != ffi.NULL and priv[k].pValue != dst[k].pValue \
                        and got != UNAVAILABLE and got <= room:
                    ffi.memmove(dst[k].pValue, priv[k].pValue, got)
                dst[k].ulValueLen = got
        elif ok:                                 # fixed, handles, struct
            ffi.memmove(ffi.cast("char *", app), ffi.cast("char *", priv), cap)


def pooled(member, fname, fn, args, gone) -> int:
    """Call ``fn(*args)`` on a worker of the stub's pool (the caller's thread keeps
    no state of the member's: neither a hang nor, say, a library's thread-local error
    queue). ``gone()`` is asked every WAIT_SLICE while the call runs; a reason from it
    abandons the call (the worker stays behind, the reaper waits for it) and raises
    MemberDown."""
    sffi, lib = native.ffi, native.lib
    keep = []
    w = [_word(a, keep) for a in args]
    plan = OUTPUT_PLANS.get(fname)
    bounced = _bounce(plan, w, keep) if plan else ()
    words = sffi.new("CK_ULONG[9]", w)
    rv = sffi.new("CK_RV *")
    job = sffi.new("void **")
    done = lib.hashim_call(sffi.cast("void *", int(ffi.cast("uintptr_t", fn))), words,
                           WAIT_SLICE, rv, job)
    while done == 0:
        reason = gone()
        if reason:
            _reaper.adopt(member, job[0], rv, (words, keep, args))
            raise MemberDown(member, reason)
        done = lib.hashim_wait(job[0], WAIT_SLICE, rv)
    if done < 0:
        raise MemberDown(member, f"{fname}: no worker thread could be started")
    if bounced:
        _copy_out(bounced, rv[0])
    return rv[0]


class MemberDown(P11Error):
    """The member failed during a call; the caller re-runs elsewhere or gives up."""

    def __init__(self, member, reason):
        super().__init__(CKR.DEVICE_ERROR, f"member '{member.name}': {reason}")
        self.member = member


class Member:
    def __init__(self, cfg, cache_dir: str, on_failure=None):
        self.cfg = cfg
        self.name = cfg.name
        self.cache_dir = cache_dir
        self.module = None
        self.f = {}
        self.slot = None
        self.anchor = None            # a session kept open: login, searches, probes
        self.domain_key = None        # handle of the group's domain key on this token
        self.mechanisms = None        # {mechanism: (min, max, flags)}
        self.state = TOKEN_NOT_PRESENT
        self.calls = {}               # call id -> (function, start time): in flight
        self._ids = itertools.count()
        self.served = 0
        self.failed_over = 0
        self.last_error = None
        self.last_change = time.time()
        self.recovery_attempt = 0
        self.next_recovery = None
        self.generation = 0           # bumps at every (re)start: old sessions are void
        self.on_failure = on_failure
        self.lock = threading.RLock()
        self.handoff = self._handoff()

    @property
    def kind(self) -> str:
        """"isolated" (the module runs in a child p11-kit server hashim starts),
        "remote" (p11-kit-client.so towards a p11-kit server elsewhere) or
        "in process"."""
        if self.cfg.isolate:
            return "isolated"
        if "P11_KIT_SERVER_ADDRESS" in (self.cfg.env or {}) \
                or os.path.basename(self.cfg.module) == "p11-kit-client.so":
            return "remote"
        return "in process"

    @property
    def in_flight(self) -> int:
        return len(self.calls)

    @property
    def online(self) -> bool:
        return self.state == ONLINE

    # ---- life cycle ----------------------------------------------------------
    def start(self):
        """Load (a fresh instance where private), initialise, find the token, open
        the anchor session. Raises P11Error. Isolated and remote members (see
        isolated.py): (isolated) start a p11-kit server child, then a fresh private
        copy of p11-kit-client.so at every start, so a restart reconnects."""
        if self.kind != "in process":
            return isolated.start_member(self)
        path = self.cfg.module
        if self.cfg.private_instance:
            path = private_copy(self.cfg.module, self.name, self.cache_dir)
        self.module = Module(self.name, path, self.cfg.env, invoke=self.invoke)
        self.module.initialize()
        self.f = self.module.f
        self.slot = self.module.find_slot(self.cfg.token_label, self.cfg.token_serial)
        self.generation += 1
        # a module restarted without C_Finalize (calls were still inside it) keeps the
        # sessions of its previous life: nobody uses them any more (they were dropped
        # when it failed), close them
        self.raw("C_CloseAllSessions", self.slot)
        self.anchor = self.raw_open_session(CKF_SERIAL_SESSION | CKF_RW_SESSION)

    def stop(self):
        if self.kind != "in process":
            return isolated.stop_member(self)
        self.anchor = None
        if self.module is not None:
            self.module.finalize()

    def terminate_child(self):
        """Isolated member: SIGKILL its p11-kit server child (the whole process group,
        the process running the module included); remote member: shut its connection
        down. Every call stuck in the member returns at once (CKR_DEVICE_ERROR). Cheap
        and idempotent; for the supervisor to call as soon as it fails the member.
        In-process members: nothing to do."""
        if self.kind != "in process":
            isolated.terminate(self)

    def set_state(self, state, error=None):
        with self.lock:
            if error:
                self.last_error = error
            if state != self.state:
                log.info("member '%s': %s -> %s%s", self.name, self.state, state,
                         f" ({error})" if error else "")
                self.state = state
                self.last_change = time.time()
                # recent transitions, for 'hashim status' (see engine/status.py)
                hist = self.__dict__.get("history")
                if hist is None:
                    hist = self.history = collections.deque(maxlen=HISTORY)
                hist.append((self.last_change, state, error))

    def fail(self, reason: str):
        """Take the member out of rotation (first failure wins)."""
        with self.lock:
            if self.state != ONLINE:
                return
            self.set_state(DEVICE_ERROR, reason)
        log.error("member '%s' failed: %s", self.name, reason)
        if self.on_failure:
            self.on_failure(self)

    # ---- calls ----------------------------------------------------------------
    def call(self, fname, *args) -> int:
        if self.state != ONLINE and self.state != RECOVERING:
            raise MemberDown(self, "not online")
        gen = self.generation
        cid = next(self._ids)
        self.calls[cid] = (fname, time.monotonic())
        try:
            if self.handoff:
                rv = self._supervised(fname, args)
            else:
                rv = self.f[fname](*args)
        except MemberDown:
            self.calls.pop(cid, None)
            raise
        except Exception as e:                      # a broken member module
            self.calls.pop(cid, None)
            self.fail(f"{fname} raised {e!r}")
            raise MemberDown(self, f"{fname} failed: {e!r}")
        self.calls.pop(cid, None)
        if self.generation != gen:
            # the member failed and was restarted while this call was inside its old
            # instance: the answer belongs to sessions that are gone; not the new
            # instance's failure either. The caller re-runs it.
            raise MemberDown(self, f"{fname} answered by an instance restarted since")
        if rv in DEVICE_LEVEL:
            self.fail(f"{fname} returned {rv_name(rv)}")
            raise MemberDown(self, f"{fname} returned {rv_name(rv)}")
        self.served += 1
        return rv

    def _supervised(self, fname, args) -> int:
        """Run the call on a pool worker; while it runs, look every WAIT_SLICE at the
        member: once the supervisor failed it (no sign of life within the command
        timeout), the call is abandoned and the caller re-runs elsewhere. A member that
        failed and already came back (a new generation) does not own the call either:
        its sessions are new, the call's answer would mean nothing."""
        gen = self.generation

        def gone():
            if self.generation != gen or self.state not in (ONLINE, RECOVERING):
                return f"{fname} abandoned: {self.last_error}"
        return pooled(self, fname, self.f[fname], args, gone)

    def raw(self, fname, *args) -> int:
        """A call outside rotation (start-up, recovery, probes): no state checks; on a
        pool worker when there is one, abandoned after RAW_TIMEOUT."""
        return self.invoke(fname, self.f[fname], *args)

    def _handoff(self) -> bool:
        if native.lib is None:
            return False
        if SUPERVISE == "auto":
            return self.kind != "in process"
        return SUPERVISE == "thread"

    def invoke(self, fname, fn, *args) -> int:
        if not self.handoff:
            return fn(*args)
        deadline = time.monotonic() + RAW_TIMEOUT

        def gone():
            if time.monotonic() > deadline:
                return f"{fname} did not return within {RAW_TIMEOUT:g} s"
        return pooled(self, fname, fn, args, gone)

    def raw_open_session(self, flags) -> int:
        h = ffi.new("CK_SESSION_HANDLE *")
        rv = self.raw("C_OpenSession", self.slot, flags, ffi.NULL, ffi.NULL, h)
        if rv != CKR_OK:
            raise P11Error(rv, f"member '{self.name}': C_OpenSession failed")
        return int(h[0])

    def open_session(self, flags) -> int:
        h = ffi.new("CK_SESSION_HANDLE *")
        rv = self.call("C_OpenSession", self.slot, flags, ffi.NULL, ffi.NULL, h)
        if rv != CKR_OK:
            raise P11Error(rv, f"member '{self.name}': C_OpenSession failed")
        return int(h[0])
