"""Helpers to drive a PKCS#11 module through real hosts, one process per run.

A PKCS#11 module is initialised once per process and PyKCS11 / python-pkcs11
cannot reload it with another environment, so every client run here happens in
a fresh subprocess:

* ``run(cmd, env)``         – any command (pkcs11-tool, openssl, java, a C host)
* ``run_py(code, env)``     – a Python snippet; ``ARGS`` holds the JSON-able args
* ``P11``                   – a small ctypes PKCS#11 binding (exact control over
                              NULL buffers, lengths and raw return codes), meant
                              to be used inside ``run_py`` snippets
* ``Target``                – what a test gets from the ``target`` fixture
"""
from __future__ import annotations

import ctypes
import json
import os
import shlex
import subprocess
import sys
import textwrap
import time
from ctypes import (CFUNCTYPE, POINTER, Structure, byref, c_char, c_ubyte,
                    c_ulong, c_void_p, create_string_buffer, sizeof)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

REPO = Path(__file__).resolve().parent.parent
PKCS11_TOOL = "/usr/bin/pkcs11-tool"
OPENSSL = "/usr/bin/openssl"
RESULT_MARK = "@@RESULT@@ "

# Variables that select a module / token; a client env starts without them so a
# stray value in the developer's shell cannot leak into a run.
_MODULE_VARS = ("SOFTHSM2_CONF", "HASHIM_CONF", "HASHIM_MODULE", "PKCS11_MODULE_PATH",
                "PYKCS11LIB", "P11_KIT_SERVER_ADDRESS")


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _MODULE_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


@dataclass
class Target:
    """One way of reaching a token: its module, the env it needs, the token label
    applications select and the user PIN.  Unpacks as (module, env, label, pin)."""
    module: str
    env: dict[str, str]
    label: str
    pin: str
    kind: str = "direct"          # "direct" (the member module) or "hashim"
    token: Any = None             # tests.softhsm.Token behind it
    tmp: Path | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.module, self.env, self.label, self.pin))

    # pkcs11-tool bound to this target's module and token
    def tool(self, *args: str, login: bool = False, check: bool = True,
             input: bytes | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
        cmd = [PKCS11_TOOL, "--module", self.module, "--token-label", self.label]
        if login:
            cmd += ["--login", "--pin", self.pin]
        return run(cmd + [str(a) for a in args], self.env, check=check, input=input,
                   timeout=timeout)


class ClientError(AssertionError):
    """A client run failed; carries the command line, exit code and both outputs."""

    def __init__(self, what: str, rc: int | None, stdout: str, stderr: str):
        self.rc, self.stdout, self.stderr = rc, stdout, stderr
        super().__init__(f"{what} exited {rc}\n--- stdout ---\n{stdout[-4000:]}"
                         f"\n--- stderr ---\n{stderr[-6000:]}")


def _text(b: bytes | str | None) -> str:
    if b is None:
        return ""
    return b if isinstance(b, str) else b.decode("utf-8", "replace")


def run(cmd: list[str] | str, env: dict[str, str], *, check: bool = True,
        input: bytes | str | None = None, timeout: float = 120, cwd: str | Path | None = None,
        text: bool = True) -> subprocess.CompletedProcess:
    """Run ``cmd`` with exactly ``env``; raise ClientError (with stderr) when it
    exits non-zero and ``check`` is true, or when it does not finish in time."""
    if isinstance(cmd, str):
        cmd = shlex.split(cmd)
    cmd = [str(c) for c in cmd]
    if text and isinstance(input, bytes):
        input = input.decode()
    try:
        p = subprocess.run(cmd, env=env, input=input, capture_output=True, timeout=timeout,
                           cwd=cwd, text=text)
    except subprocess.TimeoutExpired as e:
        raise ClientError(f"{shlex.join(cmd)} (timed out after {timeout}s)", None,
                          _text(e.stdout), _text(e.stderr)) from None
    if check and p.returncode != 0:
        raise ClientError(shlex.join(cmd), p.returncode, _text(p.stdout), _text(p.stderr))
    return p


def run_py(code: str, env: dict[str, str], args: Any = None, *, timeout: float = 120,
           check: bool = True) -> str:
    """Run a Python snippet in a fresh interpreter with ``env`` (plus the repo on
    PYTHONPATH); ``ARGS`` is bound to ``args`` (through JSON).  Returns stdout."""
    env = dict(env)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("PYTHONFAULTHANDLER", "1")
    prog = f"import json as _json\nARGS = _json.loads({json.dumps(json.dumps(args))})\n" \
        + textwrap.dedent(code)
    p = run([sys.executable, "-c", prog], env, check=False, timeout=timeout, cwd=str(REPO))
    if check and p.returncode != 0:
        raise ClientError("python snippet", p.returncode, p.stdout,
                          p.stderr + "\n--- snippet ---\n" + textwrap.dedent(code))
    return p.stdout


def emit(obj: Any) -> None:
    """Inside a run_py snippet: hand a JSON-able result back to the test."""
    sys.stdout.write(RESULT_MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def result(stdout: str) -> Any:
    """The last value ``emit``-ted by a snippet (other output is ignored)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    raise AssertionError(f"no result in output:\n{stdout[-4000:]}")


# ---------------------------------------------------------------------------
# A small ctypes PKCS#11 (2.40) binding.
# ---------------------------------------------------------------------------
CK_ULONG = c_ulong
CK_BBOOL = c_ubyte
CK_UNAVAILABLE_INFORMATION = (1 << (8 * sizeof(c_ulong))) - 1
NULL = None


def _consts() -> Any:
    from PyKCS11 import constants  # names only; nothing is loaded
    return constants


K = _consts()  # K.CKR_OK, K.CKA_LABEL, K.CKM_SHA256, ... (PKCS#11 3.x names)


def rv_name(rv: int) -> str:
    name = K.CKR.get(rv) if hasattr(K, "CKR") else None
    return name if isinstance(name, str) else f"CKR_0x{rv:08X}"


class CK_VERSION(Structure):
    _fields_ = [("major", c_ubyte), ("minor", c_ubyte)]


class CK_INFO(Structure):
    _fields_ = [("cryptokiVersion", CK_VERSION), ("manufacturerID", c_char * 32),
                ("flags", CK_ULONG), ("libraryDescription", c_char * 32),
                ("libraryVersion", CK_VERSION)]


class CK_SLOT_INFO(Structure):
    _fields_ = [("slotDescription", c_char * 64), ("manufacturerID", c_char * 32),
                ("flags", CK_ULONG), ("hardwareVersion", CK_VERSION),
                ("firmwareVersion", CK_VERSION)]


class CK_TOKEN_INFO(Structure):
    _fields_ = [("label", c_char * 32), ("manufacturerID", c_char * 32),
                ("model", c_char * 16), ("serialNumber", c_char * 16),
                ("flags", CK_ULONG), ("ulMaxSessionCount", CK_ULONG),
                ("ulSessionCount", CK_ULONG), ("ulMaxRwSessionCount", CK_ULONG),
                ("ulRwSessionCount", CK_ULONG), ("ulMaxPinLen", CK_ULONG),
                ("ulMinPinLen", CK_ULONG), ("ulTotalPublicMemory", CK_ULONG),
                ("ulFreePublicMemory", CK_ULONG), ("ulTotalPrivateMemory", CK_ULONG),
                ("ulFreePrivateMemory", CK_ULONG), ("hardwareVersion", CK_VERSION),
                ("firmwareVersion", CK_VERSION), ("utcTime", c_char * 16)]


class CK_SESSION_INFO(Structure):
    _fields_ = [("slotID", CK_ULONG), ("state", CK_ULONG), ("flags", CK_ULONG),
                ("ulDeviceError", CK_ULONG)]


class CK_MECHANISM_INFO(Structure):
    _fields_ = [("ulMinKeySize", CK_ULONG), ("ulMaxKeySize", CK_ULONG), ("flags", CK_ULONG)]


class CK_ATTRIBUTE(Structure):
    _fields_ = [("type", CK_ULONG), ("pValue", c_void_p), ("ulValueLen", CK_ULONG)]


class CK_MECHANISM(Structure):
    _fields_ = [("mechanism", CK_ULONG), ("pParameter", c_void_p),
                ("ulParameterLen", CK_ULONG)]


class CK_GCM_PARAMS(Structure):          # 2.40 layout (SoftHSM2 2.6.1)
    _fields_ = [("pIv", c_void_p), ("ulIvLen", CK_ULONG), ("ulIvBits", CK_ULONG),
                ("pAAD", c_void_p), ("ulAADLen", CK_ULONG), ("ulTagBits", CK_ULONG)]


class CK_RSA_PKCS_PSS_PARAMS(Structure):
    _fields_ = [("hashAlg", CK_ULONG), ("mgf", CK_ULONG), ("sLen", CK_ULONG)]


class CK_RSA_PKCS_OAEP_PARAMS(Structure):
    _fields_ = [("hashAlg", CK_ULONG), ("mgf", CK_ULONG), ("source", CK_ULONG),
                ("pSourceData", c_void_p), ("ulSourceDataLen", CK_ULONG)]


class CK_ECDH1_DERIVE_PARAMS(Structure):
    _fields_ = [("kdf", CK_ULONG), ("ulSharedDataLen", CK_ULONG), ("pSharedData", c_void_p),
                ("ulPublicDataLen", CK_ULONG), ("pPublicData", c_void_p)]


class CK_KEY_DERIVATION_STRING_DATA(Structure):
    _fields_ = [("pData", c_void_p), ("ulLen", CK_ULONG)]


MUTEX_CREATE = CFUNCTYPE(CK_ULONG, POINTER(c_void_p))
MUTEX_OP = CFUNCTYPE(CK_ULONG, c_void_p)


class CK_C_INITIALIZE_ARGS(Structure):
    _fields_ = [("CreateMutex", c_void_p), ("DestroyMutex", c_void_p),
                ("LockMutex", c_void_p), ("UnlockMutex", c_void_p),
                ("flags", CK_ULONG), ("pReserved", c_void_p)]


# CK_FUNCTION_LIST, in order: name and argument kinds
# (u = CK_ULONG-sized integer, b = CK_BBOOL, p = pointer).
FUNCTIONS: list[tuple[str, str]] = [
    ("C_Initialize", "p"), ("C_Finalize", "p"), ("C_GetInfo", "p"),
    ("C_GetFunctionList", "p"), ("C_GetSlotList", "bpp"), ("C_GetSlotInfo", "up"),
    ("C_GetTokenInfo", "up"), ("C_GetMechanismList", "upp"),
    ("C_GetMechanismInfo", "uup"), ("C_InitToken", "upup"), ("C_InitPIN", "upu"),
    ("C_SetPIN", "upupu"), ("C_OpenSession", "uuppp"), ("C_CloseSession", "u"),
    ("C_CloseAllSessions", "u"), ("C_GetSessionInfo", "up"),
    ("C_GetOperationState", "upp"), ("C_SetOperationState", "upuuu"),
    ("C_Login", "uupu"), ("C_Logout", "u"), ("C_CreateObject", "upup"),
    ("C_CopyObject", "uupup"), ("C_DestroyObject", "uu"), ("C_GetObjectSize", "uup"),
    ("C_GetAttributeValue", "uupu"), ("C_SetAttributeValue", "uupu"),
    ("C_FindObjectsInit", "upu"), ("C_FindObjects", "upup"), ("C_FindObjectsFinal", "u"),
    ("C_EncryptInit", "upu"), ("C_Encrypt", "upupp"), ("C_EncryptUpdate", "upupp"),
    ("C_EncryptFinal", "upp"),
    ("C_DecryptInit", "upu"), ("C_Decrypt", "upupp"), ("C_DecryptUpdate", "upupp"),
    ("C_DecryptFinal", "upp"),
    ("C_DigestInit", "up"), ("C_Digest", "upupp"), ("C_DigestUpdate", "upu"),
    ("C_DigestKey", "uu"), ("C_DigestFinal", "upp"),
    ("C_SignInit", "upu"), ("C_Sign", "upupp"), ("C_SignUpdate", "upu"),
    ("C_SignFinal", "upp"), ("C_SignRecoverInit", "upu"), ("C_SignRecover", "upupp"),
    ("C_VerifyInit", "upu"), ("C_Verify", "upupu"), ("C_VerifyUpdate", "upu"),
    ("C_VerifyFinal", "upu"), ("C_VerifyRecoverInit", "upu"),
    ("C_VerifyRecover", "upupp"),
    ("C_DigestEncryptUpdate", "upupp"), ("C_DecryptDigestUpdate", "upupp"),
    ("C_SignEncryptUpdate", "upupp"), ("C_DecryptVerifyUpdate", "upupp"),
    ("C_GenerateKey", "uppup"), ("C_GenerateKeyPair", "uppupupp"),
    ("C_WrapKey", "upuupp"), ("C_UnwrapKey", "upupupup"), ("C_DeriveKey", "upupup"),
    ("C_SeedRandom", "upu"), ("C_GenerateRandom", "upu"),
    ("C_GetFunctionStatus", "u"), ("C_CancelFunction", "u"),
    ("C_WaitForSlotEvent", "upp"),
]
assert len(FUNCTIONS) == 68

_CT = {"u": CK_ULONG, "b": CK_BBOOL, "p": c_void_p}


class CK_FUNCTION_LIST(Structure):
    _fields_ = [("version", CK_VERSION)] + [(n, c_void_p) for n, _ in FUNCTIONS]


def ulong(v: int = 0) -> c_ulong:
    return c_ulong(v)


def buf(n: int) -> Any:
    return create_string_buffer(max(int(n), 1))


def _encode(v: Any) -> bytes:
    if isinstance(v, bool):
        return bytes([1 if v else 0])
    if isinstance(v, int):
        return bytes(c_ulong(v))
    if isinstance(v, str):
        return v.encode()
    return bytes(v)


class Template:
    """A CK_ATTRIBUTE array that owns its value buffers.

    ``Template([(CKA_CLASS, CKO_SECRET_KEY), (CKA_TOKEN, True), (CKA_LABEL, "x")])``
    sets values (bool -> CK_BBOOL, int -> CK_ULONG, str/bytes as is).
    ``Template.query([CKA_A, CKA_B])`` makes a template with NULL pValues
    (the length query); ``t.alloc()`` then gives every attribute a buffer of its
    reported length (or ``size``)."""

    def __init__(self, pairs: list[tuple[int, Any]] | None = None):
        pairs = pairs or []
        self.arr = (CK_ATTRIBUTE * max(len(pairs), 1))()
        self.n = len(pairs)
        self._keep: list[Any] = []
        for i, (t, v) in enumerate(pairs):
            self.arr[i].type = t
            if v is None:
                self.arr[i].pValue = None
                self.arr[i].ulValueLen = 0
            else:
                b = create_string_buffer(_encode(v), len(_encode(v)))
                self._keep.append(b)
                self.arr[i].pValue = ctypes.cast(b, c_void_p)
                self.arr[i].ulValueLen = len(b)

    @classmethod
    def query(cls, types: list[int]) -> "Template":
        return cls([(t, None) for t in types])

    def alloc(self, size: int | None = None) -> "Template":
        for i in range(self.n):
            n = self.arr[i].ulValueLen if size is None else size
            if size is None and n == CK_UNAVAILABLE_INFORMATION:
                self.arr[i].pValue = None
                continue
            b = create_string_buffer(max(n, 1))
            self._keep.append(b)
            self.arr[i].pValue = ctypes.cast(b, c_void_p)
            self.arr[i].ulValueLen = n
        return self

    @property
    def ptr(self) -> Any:
        return self.arr if self.n else None

    def __len__(self) -> int:
        return self.n

    def length(self, i: int) -> int:
        return self.arr[i].ulValueLen

    def value(self, i: int) -> bytes | None:
        a = self.arr[i]
        if a.ulValueLen == CK_UNAVAILABLE_INFORMATION or not a.pValue:
            return None
        return ctypes.string_at(a.pValue, a.ulValueLen)

    def ulong(self, i: int) -> int | None:
        v = self.value(i)
        return None if v is None else c_ulong.from_buffer_copy(v.ljust(sizeof(c_ulong), b"\0")).value

    def lengths(self) -> list[int | str]:
        return ["UNAVAILABLE" if self.length(i) == CK_UNAVAILABLE_INFORMATION else self.length(i)
                for i in range(self.n)]


class Mechanism:
    """A CK_MECHANISM that owns its parameter (bytes or a ctypes Structure)."""

    def __init__(self, mech: int, param: Any = None):
        self.m = CK_MECHANISM()
        self.m.mechanism = mech
        self._keep = param
        if param is None:
            self.m.pParameter = None
            self.m.ulParameterLen = 0
        elif isinstance(param, (bytes, bytearray)):
            self._keep = create_string_buffer(bytes(param), len(param))
            self.m.pParameter = ctypes.cast(self._keep, c_void_p)
            self.m.ulParameterLen = len(param)
        else:
            self.m.pParameter = ctypes.cast(byref(param), c_void_p)
            self.m.ulParameterLen = sizeof(param)

    @property
    def ptr(self) -> Any:
        return byref(self.m)


def gcm(iv: bytes, aad: bytes = b"", tag_bits: int = 128) -> Mechanism:
    p = CK_GCM_PARAMS()
    ivb = create_string_buffer(iv, len(iv))
    aadb = create_string_buffer(aad, max(len(aad), 1))
    p.pIv, p.ulIvLen, p.ulIvBits = ctypes.cast(ivb, c_void_p), len(iv), len(iv) * 8
    p.pAAD, p.ulAADLen, p.ulTagBits = (ctypes.cast(aadb, c_void_p) if aad else None), len(aad), tag_bits
    m = Mechanism(K.CKM_AES_GCM, p)
    m._bufs = (ivb, aadb)  # type: ignore[attr-defined]
    return m


def ecdh(public_point: bytes) -> Mechanism:
    pub = create_string_buffer(public_point, len(public_point))
    p = CK_ECDH1_DERIVE_PARAMS(K.CKD_NULL, 0, None, len(public_point), ctypes.cast(pub, c_void_p))
    m = Mechanism(K.CKM_ECDH1_DERIVE, p)
    m._bufs = (pub,)  # type: ignore[attr-defined]
    return m


def derive_string(mech: int, data: bytes) -> Mechanism:
    d = create_string_buffer(data, len(data))
    m = Mechanism(mech, CK_KEY_DERIVATION_STRING_DATA(ctypes.cast(d, c_void_p), len(data)))
    m._bufs = (d,)  # type: ignore[attr-defined]
    return m


def pss(mech: int = None, hash_alg: int = None, mgf: int = None, slen: int = 32) -> Mechanism:
    p = CK_RSA_PKCS_PSS_PARAMS(hash_alg or K.CKM_SHA256, mgf or K.CKG_MGF1_SHA256, slen)
    return Mechanism(mech or K.CKM_SHA256_RSA_PKCS_PSS, p)


class P11:
    """ctypes view of one module's CK_FUNCTION_LIST.

    Every ``p.C_Xxx(...)`` returns the raw CK_RV as an int; integers are passed as
    CK_ULONG, pointers as given (None = NULL_PTR, bytes, ctypes objects, byref())."""

    def __init__(self, path: str):
        self.path = path
        self.dll = ctypes.CDLL(path)
        getfl = self.dll.C_GetFunctionList
        getfl.restype = CK_ULONG
        getfl.argtypes = [POINTER(POINTER(CK_FUNCTION_LIST))]
        flp = POINTER(CK_FUNCTION_LIST)()
        rv = getfl(byref(flp))
        if rv != 0 or not flp:
            raise RuntimeError(f"C_GetFunctionList failed: {rv_name(rv)}")
        self.fl = flp.contents
        self.version = (self.fl.version.major, self.fl.version.minor)
        self._fns: dict[str, Any] = {}
        for name, kinds in FUNCTIONS:
            addr = getattr(self.fl, name)
            if addr:
                self._fns[name] = CFUNCTYPE(CK_ULONG, *[_CT[k] for k in kinds])(addr)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("C_"):
            fns = self.__dict__.get("_fns", {})
            if name not in fns:
                raise AttributeError(f"{self.path}: {name} is NULL in CK_FUNCTION_LIST")
            return fns[name]
        raise AttributeError(name)

    def has(self, name: str) -> bool:
        return name in self._fns

    # -- conveniences (each still reports the raw rv) --------------------------
    def initialize(self, flags: int | None = K.CKF_OS_LOCKING_OK) -> int:
        if flags is None:
            return self.C_Initialize(None)
        self._init_args = CK_C_INITIALIZE_ARGS(None, None, None, None, flags, None)
        return self.C_Initialize(byref(self._init_args))

    def slot_list(self, present: bool = True) -> tuple[int, list[int]]:
        n = ulong()
        rv = self.C_GetSlotList(1 if present else 0, None, byref(n))
        if rv:
            return rv, []
        arr = (CK_ULONG * max(n.value, 1))()
        rv = self.C_GetSlotList(1 if present else 0, arr, byref(n))
        return rv, list(arr[: n.value])

    def token_info(self, slot: int) -> tuple[int, CK_TOKEN_INFO]:
        ti = CK_TOKEN_INFO()
        return self.C_GetTokenInfo(slot, byref(ti)), ti

    def find_slot(self, label: str) -> int:
        """The slot whose token carries ``label`` (raises if none)."""
        rv, slots = self.slot_list(True)
        if rv:
            raise RuntimeError(f"C_GetSlotList: {rv_name(rv)}")
        for s in slots:
            rv, ti = self.token_info(s)
            if rv == 0 and ti.label.decode().rstrip() == label:
                return s
        raise RuntimeError(f"no token labelled {label!r} in slots {slots}")

    def open_session(self, slot: int, rw: bool = True) -> tuple[int, int]:
        h = ulong()
        flags = K.CKF_SERIAL_SESSION | (K.CKF_RW_SESSION if rw else 0)
        rv = self.C_OpenSession(slot, flags, None, None, byref(h))
        return rv, h.value

    def login(self, session: int, pin: str, user: int = K.CKU_USER) -> int:
        p = pin.encode()
        return self.C_Login(session, user, p, len(p))

    def find(self, session: int, pairs: list[tuple[int, Any]], max_objects: int = 64) -> tuple[int, list[int]]:
        t = Template(pairs)
        rv = self.C_FindObjectsInit(session, t.ptr, len(t))
        if rv:
            return rv, []
        arr = (CK_ULONG * max_objects)()
        n = ulong()
        rv = self.C_FindObjects(session, arr, max_objects, byref(n))
        rv2 = self.C_FindObjectsFinal(session)
        return rv or rv2, list(arr[: n.value])

    def get_attrs(self, session: int, obj: int, types: list[int]) -> tuple[int, Template]:
        """Two-call C_GetAttributeValue (length query, then values)."""
        t = Template.query(types)
        rv = self.C_GetAttributeValue(session, obj, t.ptr, len(t))
        if rv not in (0, K.CKR_ATTRIBUTE_SENSITIVE, K.CKR_ATTRIBUTE_TYPE_INVALID):
            return rv, t
        t.alloc()
        rv = self.C_GetAttributeValue(session, obj, t.ptr, len(t))
        return rv, t

    def create(self, session: int, pairs: list[tuple[int, Any]]) -> tuple[int, int]:
        t = Template(pairs)
        h = ulong()
        rv = self.C_CreateObject(session, t.ptr, len(t), byref(h))
        return rv, h.value

    def two_call(self, fn: str, session: int, *inargs: Any) -> tuple[int, bytes | None]:
        """``fn(session, *inargs, out, &outlen)`` with a length query first."""
        f = getattr(self, fn)
        n = ulong()
        rv = f(session, *inargs, None, byref(n))
        if rv:
            return rv, None
        out = buf(n.value)
        rv = f(session, *inargs, out, byref(n))
        return rv, (out.raw[: n.value] if rv == 0 else None)

    def data_call(self, fn: str, session: int, data: bytes) -> tuple[int, bytes | None]:
        """C_Sign / C_Encrypt / C_Decrypt / C_Digest style: data in, two-call out."""
        return self.two_call(fn, session, data, len(data))


def load(path: str) -> P11:
    return P11(path)


def wait_for(pred, timeout: float, what: str, interval: float = 0.05):
    """Poll ``pred`` until it returns something true (returned), or fail after
    ``timeout`` seconds naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)
