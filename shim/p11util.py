"""Small helpers to drive one member's PKCS#11 module directly, through
:class:`shim.members.module.Module` and its ABI-mode ``ffi``: load a member as configured,
open a session, log in, find objects, get and set attributes, create / generate / wrap /
unwrap keys.

Used by the ``hashim`` admin commands (:mod:`shim.domain`, :mod:`shim.demo`) and meant to be
reusable by the engine.  Every failure raises :class:`shim.errors.P11Error` whose reason
names the member and the function, never a PIN or key material.

Templates are plain dicts ``{CKA_x: value}``; a value is encoded by its Python type:
``bool`` -> CK_BBOOL, ``int`` -> CK_ULONG, ``bytes``/``bytearray`` -> bytes as they are,
``str`` -> UTF-8.  Buffers that held secrets (a ``bytearray`` value, PINs) are zeroed
after the call.  Attribute values read back are ``bytes``; :func:`as_bool` and
:func:`as_ulong` decode them.
"""
from __future__ import annotations

import os
import sys
from contextlib import contextmanager
from typing import Iterable, Iterator, Mapping

from .errors import P11Error, rv_name
from .members.module import Module, ffi, private_copy
from .spec.constants import (CKF_RW_SESSION, CKF_SERIAL_SESSION, CKG_MGF1_SHA1, CKM_SHA_1,
                             CKR, CKR_OK, CKZ_DATA_SPECIFIED, CK_UNAVAILABLE_INFORMATION,
                             CKM_RSA_PKCS_OAEP)

__all__ = [
    "Template", "Session", "MemberLoader", "check", "load_member", "open_session",
    "close_session", "login", "logout", "find_objects", "get_attributes", "get_attribute",
    "set_attributes", "create_object", "destroy_object", "generate_key",
    "generate_key_pair", "wrap_key", "unwrap_key", "generate_random", "mechanism",
    "rsa_oaep_sha1", "as_bool", "as_ulong", "token_info", "wipe",
]

ULONG_SIZE = ffi.sizeof("CK_ULONG")


# --------------------------------------------------------------------------- basics

def check(module: Module, rv: int, what: str) -> None:
    """Raise P11Error unless ``rv`` is CKR_OK."""
    if rv != CKR_OK:
        raise P11Error(rv, f"member '{module.name}': {what} returned {rv_name(rv)}")


def wipe(buf) -> None:
    """Zero a bytearray or a cffi buffer in place (best effort)."""
    if buf is None:
        return
    if isinstance(buf, bytearray):
        for i in range(len(buf)):
            buf[i] = 0
        return
    try:
        ffi.memmove(buf, b"\0" * ffi.sizeof(buf), ffi.sizeof(buf))
    except (TypeError, ValueError):
        pass


def as_bool(v: bytes | None) -> bool | None:
    if v is None:
        return None
    return any(v)


def as_ulong(v: bytes | None) -> int | None:
    if v is None:
        return None
    return int.from_bytes(v[:ULONG_SIZE], sys.byteorder)


class Template:
    """A CK_ATTRIBUTE array built from ``{type: value}`` (see the module docstring).
    Keep the object alive while the array is in use; :meth:`wipe` zeroes every value
    buffer (done on exit when used as a context manager)."""

    def __init__(self, attrs: Mapping[int, object] | Iterable[tuple[int, object]] = ()):
        items = list(attrs.items() if isinstance(attrs, Mapping) else attrs)
        self.count = len(items)
        self.array = ffi.new("CK_ATTRIBUTE[]", max(self.count, 1))
        self._bufs = []
        for i, (t, v) in enumerate(items):
            buf, n = self._encode(v)
            self._bufs.append(buf)
            self.array[i].type = int(t)
            self.array[i].pValue = ffi.NULL if buf is None else ffi.cast("CK_VOID_PTR", buf)
            self.array[i].ulValueLen = n

    @staticmethod
    def _encode(v):
        if v is None:
            return None, 0
        if isinstance(v, bool):
            return ffi.new("CK_BBOOL *", 1 if v else 0), 1
        if isinstance(v, int):
            return ffi.new("CK_ULONG *", v), ULONG_SIZE
        if isinstance(v, str):
            v = v.encode("utf-8")
        if isinstance(v, (bytes, bytearray, memoryview)):
            n = len(v)
            buf = ffi.new("CK_BYTE[]", max(n, 1))
            if n:
                ffi.memmove(buf, v, n)
            return buf, n
        raise TypeError(f"attribute value of type {type(v).__name__} is not supported")

    def wipe(self) -> None:
        for b in self._bufs:
            if b is not None:
                wipe(b)

    def __enter__(self) -> "Template":
        return self

    def __exit__(self, *exc) -> None:
        self.wipe()


def mechanism(mech: int, param=None):
    """A CK_MECHANISM (cdata; the parameter is kept alive by the returned object).
    ``param``: None, bytes, or a cdata pointer to a parameter struct."""
    m = ffi.new("CK_MECHANISM *")
    m.mechanism = int(mech)
    keep = None
    if param is None:
        m.pParameter, m.ulParameterLen = ffi.NULL, 0
    elif isinstance(param, (bytes, bytearray)):
        keep = ffi.new("CK_BYTE[]", max(len(param), 1))
        ffi.memmove(keep, param, len(param))
        m.pParameter, m.ulParameterLen = keep, len(param)
    else:
        keep = param
        m.pParameter = ffi.cast("CK_VOID_PTR", param)
        m.ulParameterLen = ffi.sizeof(ffi.typeof(param).item)
    return _Mech(m, keep)


class _Mech:
    def __init__(self, m, keep):
        self.ptr, self._keep = m, keep


def rsa_oaep_sha1():
    """CKM_RSA_PKCS_OAEP with SHA-1 / MGF1-SHA1 and no label (what SoftHSM2 2.6.1 accepts)."""
    p = ffi.new("CK_RSA_PKCS_OAEP_PARAMS *")
    p.hashAlg = CKM_SHA_1
    p.mgf = CKG_MGF1_SHA1
    p.source = CKZ_DATA_SPECIFIED
    p.pSourceData = ffi.NULL
    p.ulSourceDataLen = 0
    return mechanism(CKM_RSA_PKCS_OAEP, p)


def _mech_ptr(mech):
    if isinstance(mech, _Mech):
        return mech, mech.ptr
    m = mechanism(mech)
    return m, m.ptr


# --------------------------------------------------------------------------- loading

def load_member(member_config, cache_dir: str, *, force_private: bool = False) -> Module:
    """Load and C_Initialize a configured member's module: a private copy of the library
    (in ``cache_dir``) when ``private_instance`` (or ``force_private``), the member's ``env``
    set during C_Initialize.  ``isolate`` is not honoured here (the module runs in this
    process): callers that need containment run this in a child process."""
    path = member_config.module
    if member_config.private_instance or force_private:
        path = private_copy(path, member_config.name, cache_dir)
    m = Module(member_config.name, path, dict(member_config.env))
    m.initialize()
    return m


class MemberLoader:
    """Loads several members in one process.  A module file already loaded for another
    member is loaded again from a private copy (one process shares one instance of a
    library file, so two tokens configured through different environments would otherwise
    see the first one's configuration).  :meth:`close` finalises every module."""

    def __init__(self, cache_dir: str):
        self.cache_dir = cache_dir
        self.modules: dict[str, Module] = {}
        self._paths: set[str] = set()

    def load(self, member_config) -> tuple[Module, int]:
        """(module, slot of the member's token)."""
        name = member_config.name
        if name in self.modules:
            m = self.modules[name]
        else:
            real = os.path.realpath(member_config.module)
            force = real in self._paths
            m = load_member(member_config, self.cache_dir, force_private=force)
            self._paths.add(real)
            self.modules[name] = m
        slot = m.find_slot(member_config.token_label, member_config.token_serial)
        return m, slot

    def close(self) -> None:
        for m in reversed(list(self.modules.values())):
            m.finalize()
        self.modules.clear()

    def __enter__(self) -> "MemberLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def token_info(module: Module, slot: int) -> dict[str, object]:
    info = ffi.new("CK_TOKEN_INFO *")
    check(module, module.f["C_GetTokenInfo"](slot, info), "C_GetTokenInfo")

    def text(raw):
        return bytes(raw).decode("utf-8", "replace").rstrip(" \0")
    return {"label": text(info.label), "serial": text(info.serialNumber),
            "manufacturer": text(info.manufacturerID), "model": text(info.model),
            "flags": int(info.flags)}


# --------------------------------------------------------------------------- sessions

def open_session(module: Module, slot: int, rw: bool = True) -> int:
    h = ffi.new("CK_SESSION_HANDLE *")
    flags = CKF_SERIAL_SESSION | (CKF_RW_SESSION if rw else 0)
    check(module, module.f["C_OpenSession"](slot, flags, ffi.NULL, ffi.NULL, h),
          "C_OpenSession")
    return int(h[0])


def close_session(module: Module, session: int) -> None:
    check(module, module.f["C_CloseSession"](session), "C_CloseSession")


def login(module: Module, session: int, user_type: int, pin) -> None:
    """C_Login.  ``pin``: bytearray (preferred), bytes or str; the copy handed to the module
    is zeroed afterwards; the reason of a failure never contains it."""
    if isinstance(pin, str):
        pin = pin.encode("utf-8")
    n = len(pin)
    buf = ffi.new("CK_UTF8CHAR[]", max(n, 1))
    try:
        if n:
            ffi.memmove(buf, pin, n)
        rv = module.f["C_Login"](session, user_type, buf, n)
    finally:
        wipe(buf)
    if rv == CKR.USER_ALREADY_LOGGED_IN:
        return
    what = "security officer" if user_type == 0 else "user"
    check(module, rv, f"C_Login ({what})")


def logout(module: Module, session: int) -> None:
    rv = module.f["C_Logout"](session)
    if rv not in (CKR_OK, CKR.USER_NOT_LOGGED_IN):
        check(module, rv, "C_Logout")


def find_objects(module: Module, session: int, template: Mapping[int, object],
                 limit: int | None = None) -> list[int]:
    with Template(template) as t:
        check(module, module.f["C_FindObjectsInit"](session, t.array, t.count),
              "C_FindObjectsInit")
    out: list[int] = []
    try:
        batch = ffi.new("CK_OBJECT_HANDLE[]", 64)
        n = ffi.new("CK_ULONG *")
        while limit is None or len(out) < limit:
            check(module, module.f["C_FindObjects"](session, batch, 64, n), "C_FindObjects")
            if n[0] == 0:
                break
            out.extend(int(batch[i]) for i in range(n[0]))
    finally:
        module.f["C_FindObjectsFinal"](session)
    return out if limit is None else out[:limit]


_ATTR_OK = (CKR_OK, CKR.ATTRIBUTE_SENSITIVE, CKR.ATTRIBUTE_TYPE_INVALID)


def get_attributes(module: Module, session: int, obj: int,
                   types: Iterable[int]) -> dict[int, bytes | None]:
    """Values of the given attributes; None for an attribute the object does not have or
    will not reveal (sensitive)."""
    types = [int(t) for t in types]
    out: dict[int, bytes | None] = {t: None for t in types}
    if not types:
        return out
    arr = ffi.new("CK_ATTRIBUTE[]", len(types))
    for i, t in enumerate(types):
        arr[i].type, arr[i].pValue, arr[i].ulValueLen = t, ffi.NULL, 0
    rv = module.f["C_GetAttributeValue"](session, obj, arr, len(types))
    if rv not in _ATTR_OK:
        check(module, rv, "C_GetAttributeValue")
    avail = [i for i in range(len(types)) if arr[i].ulValueLen != CK_UNAVAILABLE_INFORMATION]
    if not avail:
        return out
    arr2 = ffi.new("CK_ATTRIBUTE[]", len(avail))
    bufs = []
    for j, i in enumerate(avail):
        n = int(arr[i].ulValueLen)
        b = ffi.new("CK_BYTE[]", max(n, 1))
        bufs.append(b)
        arr2[j].type, arr2[j].pValue, arr2[j].ulValueLen = types[i], b, n
    rv = module.f["C_GetAttributeValue"](session, obj, arr2, len(avail))
    if rv not in _ATTR_OK:
        check(module, rv, "C_GetAttributeValue")
    for j, i in enumerate(avail):
        n = arr2[j].ulValueLen
        if n != CK_UNAVAILABLE_INFORMATION:
            out[types[i]] = bytes(ffi.buffer(bufs[j], n))
    return out


def get_attribute(module: Module, session: int, obj: int, type_: int) -> bytes | None:
    return get_attributes(module, session, obj, [type_])[int(type_)]


def set_attributes(module: Module, session: int, obj: int,
                   template: Mapping[int, object]) -> None:
    with Template(template) as t:
        check(module, module.f["C_SetAttributeValue"](session, obj, t.array, t.count),
              "C_SetAttributeValue")


def create_object(module: Module, session: int, template: Mapping[int, object]) -> int:
    h = ffi.new("CK_OBJECT_HANDLE *")
    with Template(template) as t:
        check(module, module.f["C_CreateObject"](session, t.array, t.count, h),
              "C_CreateObject")
    return int(h[0])


def destroy_object(module: Module, session: int, obj: int) -> None:
    check(module, module.f["C_DestroyObject"](session, obj), "C_DestroyObject")


def generate_key(module: Module, session: int, mech, template: Mapping[int, object]) -> int:
    keep, m = _mech_ptr(mech)
    h = ffi.new("CK_OBJECT_HANDLE *")
    with Template(template) as t:
        check(module, module.f["C_GenerateKey"](session, m, t.array, t.count, h),
              "C_GenerateKey")
    return int(h[0])


def generate_key_pair(module: Module, session: int, mech, public: Mapping[int, object],
                      private: Mapping[int, object]) -> tuple[int, int]:
    keep, m = _mech_ptr(mech)
    hpub = ffi.new("CK_OBJECT_HANDLE *")
    hpriv = ffi.new("CK_OBJECT_HANDLE *")
    with Template(public) as tp, Template(private) as tq:
        check(module, module.f["C_GenerateKeyPair"](session, m, tp.array, tp.count,
                                                    tq.array, tq.count, hpub, hpriv),
              "C_GenerateKeyPair")
    return int(hpub[0]), int(hpriv[0])


def wrap_key(module: Module, session: int, mech, wrapping_key: int, key: int) -> bytes:
    keep, m = _mech_ptr(mech)
    n = ffi.new("CK_ULONG *")
    check(module, module.f["C_WrapKey"](session, m, wrapping_key, key, ffi.NULL, n),
          "C_WrapKey")
    buf = ffi.new("CK_BYTE[]", max(n[0], 1))
    check(module, module.f["C_WrapKey"](session, m, wrapping_key, key, buf, n), "C_WrapKey")
    return bytes(ffi.buffer(buf, n[0]))


def unwrap_key(module: Module, session: int, mech, unwrapping_key: int, wrapped: bytes,
               template: Mapping[int, object]) -> int:
    keep, m = _mech_ptr(mech)
    h = ffi.new("CK_OBJECT_HANDLE *")
    data = ffi.new("CK_BYTE[]", max(len(wrapped), 1))
    ffi.memmove(data, wrapped, len(wrapped))
    with Template(template) as t:
        check(module, module.f["C_UnwrapKey"](session, m, unwrapping_key, data, len(wrapped),
                                              t.array, t.count, h), "C_UnwrapKey")
    return int(h[0])


def generate_random(module: Module, session: int, n: int) -> bytes:
    buf = ffi.new("CK_BYTE[]", max(n, 1))
    check(module, module.f["C_GenerateRandom"](session, buf, n), "C_GenerateRandom")
    return bytes(ffi.buffer(buf, n))


# --------------------------------------------------------------------------- Session

class Session:
    """An open session on one token, with the helpers above as methods.  As a context
    manager it logs out (if it logged in) and closes the session on exit."""

    def __init__(self, module: Module, slot: int, rw: bool = True):
        self.module = module
        self.slot = slot
        self.h = open_session(module, slot, rw)
        self.logged_in = False

    def login(self, user_type: int, pin) -> None:
        login(self.module, self.h, user_type, pin)
        self.logged_in = True

    def logout(self) -> None:
        if self.logged_in:
            self.logged_in = False
            logout(self.module, self.h)

    def close(self) -> None:
        if self.h is None:
            return
        try:
            self.logout()
        except P11Error:
            pass
        try:
            close_session(self.module, self.h)
        except P11Error:
            pass
        self.h = None

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def find(self, template, limit=None):
        return find_objects(self.module, self.h, template, limit)

    def get(self, obj, types):
        return get_attributes(self.module, self.h, obj, types)

    def get1(self, obj, type_):
        return get_attribute(self.module, self.h, obj, type_)

    def set(self, obj, template):
        set_attributes(self.module, self.h, obj, template)

    def create(self, template):
        return create_object(self.module, self.h, template)

    def destroy(self, obj):
        destroy_object(self.module, self.h, obj)

    def generate_key(self, mech, template):
        return generate_key(self.module, self.h, mech, template)

    def generate_key_pair(self, mech, public, private):
        return generate_key_pair(self.module, self.h, mech, public, private)

    def wrap(self, mech, wrapping_key, key):
        return wrap_key(self.module, self.h, mech, wrapping_key, key)

    def unwrap(self, mech, unwrapping_key, wrapped, template):
        return unwrap_key(self.module, self.h, mech, unwrapping_key, wrapped, template)

    def random(self, n):
        return generate_random(self.module, self.h, n)


@contextmanager
def session(module: Module, slot: int, rw: bool = True) -> Iterator[Session]:
    s = Session(module, slot, rw)
    try:
        yield s
    finally:
        s.close()
