"""Loading a member's PKCS#11 module by path (cffi ABI mode) and calling it through
its own CK_FUNCTION_LIST.

One ABI-mode FFI serves every member; it is separate from the stub's embedding FFI
(a dlopen through that one resolved C_GetFunctionList to hashim's own export)."""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import threading

import cffi

from ..errors import P11Error
from ..spec.cdef import cdef
from ..spec.constants import CKF_OS_LOCKING_OK, CKR, CKR_OK
from ..spec.functions import FUNCTIONS_V2

log = logging.getLogger("hashim")

ffi = cffi.FFI()
ffi.cdef(cdef() + "CK_RV C_GetFunctionList(CK_FUNCTION_LIST_PTR_PTR ppFunctionList);\n")

# The environment is process-wide: a member's variables are set only while its
# module initialises (SoftHSM2 reads SOFTHSM2_CONF, p11-kit-client the server
# address, in C_Initialize), one member at a time.
_env_lock = threading.RLock()     # re-entrant: load() may run inside initialize()


class _Environment:
    def __init__(self, env):
        self.env = dict(env or {})
        self.saved = {}

    def __enter__(self):
        _env_lock.acquire()
        for k, v in self.env.items():
            self.saved[k] = os.environ.get(k)
            os.environ[k] = v

    def __exit__(self, *exc):
        try:
            for k, v in self.saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        finally:
            _env_lock.release()


def private_copy(path: str, name: str, cache_dir: str) -> str:
    """A copy of the library file that only this member loads (an independent
    instance of a module that keeps process-global state). Files are never
    rewritten in place (a process may have them mapped): new content, new name."""
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    d = os.path.join(cache_dir, f"{name}-{digest}")
    target = os.path.join(d, os.path.basename(path))
    if not os.path.exists(target):
        os.makedirs(d, mode=0o700, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".copy-")
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.chmod(tmp, 0o755)
        os.replace(tmp, target)
    return target


def _text(raw) -> str:
    return bytes(raw).decode("utf-8", "replace").rstrip(" \0")


class Module:
    """A loaded member module: its function table and the slot of its token."""

    def __init__(self, name: str, path: str, env=None, invoke=None):
        self.invoke = invoke or (lambda fname, fn, *args: fn(*args))
        self.name = name
        self.path = path
        self.env = env or {}
        self.lib = None
        self.fl = None
        self.f = {}            # function name -> callable function pointer
        self.initialized = False

    def load(self):
        try:
            self.lib = ffi.dlopen(self.path)
        except OSError as e:
            raise P11Error(CKR.GENERAL_ERROR,
                           f"member '{self.name}': cannot load module {self.path}: {e}")
        try:
            get_list = self.lib.C_GetFunctionList
        except AttributeError:
            raise P11Error(CKR.GENERAL_ERROR, f"member '{self.name}': {self.path} is not a "
                           "PKCS#11 module (no C_GetFunctionList)")
        pp = ffi.new("CK_FUNCTION_LIST_PTR *")
        with _Environment(self.env):        # some modules read it here already
            rv = get_list(pp)
        if rv != CKR_OK or pp[0] == ffi.NULL:
            raise P11Error(CKR.GENERAL_ERROR,
                           f"member '{self.name}': C_GetFunctionList failed ({rv:#x})")
        self.fl = pp[0]
        self.f = {fn.name: getattr(self.fl, fn.name) for fn in FUNCTIONS_V2}

    def initialize(self):
        args = ffi.new("CK_C_INITIALIZE_ARGS *")
        args.flags = CKF_OS_LOCKING_OK
        with _Environment(self.env):
            if self.fl is None:     # some modules read their environment at load
                self.load()         # (C_GetFunctionList), not at C_Initialize
            # on the calling thread, as the module would be initialised without
            # hashim: some modules set up thread-local library state here (SoftHSM2
            # loads OpenSSL engines into the caller's default OpenSSL context)
            rv = self.f["C_Initialize"](args)
        if rv not in (CKR_OK, CKR.CRYPTOKI_ALREADY_INITIALIZED):
            raise P11Error(rv, f"member '{self.name}': C_Initialize of {self.path} failed")
        self.initialized = True

    def finalize(self):
        if self.initialized:
            self.initialized = False
            try:
                self.invoke("C_Finalize", self.f["C_Finalize"], ffi.NULL)
            except Exception:  # a member that crashes on finalize must not stop the others
                log.exception("member '%s': C_Finalize failed", self.name)

    def find_slot(self, token_label=None, token_serial=None) -> int:
        count = ffi.new("CK_ULONG *")
        call = lambda fname, *a: self.invoke(fname, self.f[fname], *a)  # noqa: E731
        rv = call("C_GetSlotList", 1, ffi.NULL, count)
        if rv != CKR_OK:
            raise P11Error(rv, f"member '{self.name}': C_GetSlotList failed")
        slots = ffi.new("CK_SLOT_ID[]", max(count[0], 1))
        rv = call("C_GetSlotList", 1, slots, count)
        if rv != CKR_OK:
            raise P11Error(rv, f"member '{self.name}': C_GetSlotList failed")
        info = ffi.new("CK_TOKEN_INFO *")
        seen = []
        for i in range(count[0]):
            if call("C_GetTokenInfo", slots[i], info) != CKR_OK:
                continue
            label, serial = _text(info.label), _text(info.serialNumber)
            seen.append(f"'{label}' (serial {serial})")
            if (token_label is not None and label == token_label) or \
               (token_serial is not None and serial == token_serial):
                return int(slots[i])
        want = f"label '{token_label}'" if token_label is not None else f"serial '{token_serial}'"
        raise P11Error(CKR.TOKEN_NOT_PRESENT,
                       f"member '{self.name}': no token with {want} in {self.path} "
                       f"(tokens present: {', '.join(seen) or 'none'}); fix token_label/"
                       "token_serial or the module's environment")
