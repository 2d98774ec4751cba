"""The group's domain key: ``hashim domain init | check | add-member``.

The domain key is an AES-256 secret key present on every member token.  The engine wraps
secret and private keys under it (CKM_AES_KEY_WRAP_PAD) to copy them between members; keys
generated through the HA slot are wrap-with-trusted, so nothing but a *trusted* key (the
domain key) can export them.  Engine API: :data:`DOMAIN_LABEL`, :data:`DOMAIN_ID`,
:func:`find_domain_key`, :func:`check_value`, :func:`domain_key_template`.

Attributes (created by a security-officer session, the only one allowed to set
CKA_TRUSTED; such a session can create public objects only)::

    CKA_CLASS=CKO_SECRET_KEY  CKA_KEY_TYPE=CKK_AES  CKA_VALUE_LEN=32 (see below)
    CKA_TOKEN=TRUE  CKA_PRIVATE=FALSE  CKA_LABEL="hashim-domain"  CKA_ID=b"hashim-domain"
    CKA_TRUSTED=TRUE  CKA_WRAP=TRUE  CKA_UNWRAP=TRUE
    CKA_ENCRYPT=CKA_DECRYPT=CKA_SIGN=CKA_VERIFY=CKA_DERIVE=FALSE
    CKA_SENSITIVE=TRUE  CKA_EXTRACTABLE=TRUE  CKA_WRAP_WITH_TRUSTED=TRUE
    CKA_MODIFIABLE=FALSE  CKA_DESTROYABLE=FALSE  CKA_COPYABLE=FALSE (init) / TRUE (add-member)

Being public, the key is found and its CKA_CHECK_VALUE read without a login.  It is
extractable only wrapped under another trusted key (that is how add-member copies it), and
it cannot be repurposed: not modifiable (CKA_ENCRYPT/DECRYPT cannot be turned on to undo the
key wrap with raw AES), not destroyable (an application sweeping "all objects" through a
member cannot break the group; removing it takes re-initialising the token), not copyable
where the token allows (see below).

``domain init`` creates the key from 32 bytes of ``os.urandom`` (a bytearray, wiped after;
the key is written nowhere but the tokens) on every member with C_CreateObject, after
checking that no member holds one, that the SO PIN logs in on every member, and that every
member accepts the template (a session-object dry run): a failure leaves no token changed.

``domain add-member`` copies the key without it ever leaving a token in the clear: an
RSA-2048 transport key pair is generated as session objects on the NEW token (SO session);
its public key is imported on the SOURCE token as a session object with CKA_TRUSTED=TRUE and
CKA_WRAP=TRUE (SO session); the domain key is wrapped there with CKM_RSA_PKCS_OAEP
(SHA-1 / MGF1-SHA1, the only OAEP parameters SoftHSM2 2.6.1 takes) and unwrapped on the new
token with the transport private key; the check values are compared; the transport keys
are destroyed (they are session objects and die with the sessions anyway).

What SoftHSM2 2.6.1 allowed and refused (found by experiment, confirmed in its source):

* SO login fails with CKR_SESSION_READ_ONLY_EXISTS while the process has a read-only
  session on that token: close them first.
* C_CreateObject in an SO session: every attribute above is accepted (CKA_TRUSTED only in an
  SO session, else CKR_ATTRIBUTE_READ_ONLY); CKA_CHECK_VALUE (3 bytes) and CKA_VALUE_LEN
  are computed by the token.
* A trusted, WRAP=TRUE RSA public *session* object imported in an SO session wraps the
  domain key with OAEP; an untrusted one gets CKR_KEY_NOT_WRAPPABLE.
* C_UnwrapKey refuses CKA_MODIFIABLE=FALSE in the template (CKR_ATTRIBUTE_READ_ONLY: the
  attributes after it in template order become read-only, and it applies the template
  before storing the value), as well as CKA_VALUE_LEN and a non-empty CKA_CHECK_VALUE.
  An unwrapped secret key gets *no* CKA_CHECK_VALUE (empty) and CKA_VALUE_LEN = 0 — the
  value is stored behind the attribute layer.  This holds for every AES key unwrapped on
  SoftHSM2 2.6.1, keys replicated under the domain key included.
* C_SetAttributeValue(CKA_CHECK_VALUE) on a modifiable secret key is accepted only when the
  value matches the key (else CKR_ATTRIBUTE_VALUE_INVALID): a proof that the copy is right.
* C_CopyObject may change CKA_TOKEN, CKA_MODIFIABLE, CKA_DESTROYABLE (applied in template
  order); CKA_COPYABLE can be set to FALSE only when an object is created, generated or
  unwrapped.  A copy of a non-modifiable object cannot change any attribute
  (CKR_ATTRIBUTE_READ_ONLY), so a COPYABLE but non-modifiable key can only be cloned as it is.
* CKA_DESTROYABLE=FALSE makes C_DestroyObject return CKR_ACTION_PROHIBITED, for users and
  the SO alike.

So add-member first tries the straightforward way (unwrap straight into a token object with
the full template; a token that computes the check value itself is done there), and on
SoftHSM2 falls back to: unwrap into a modifiable *session* object, set CKA_CHECK_VALUE to the
source's (the token verifies it), C_CopyObject it to a token object with CKA_MODIFIABLE=FALSE
and CKA_DESTROYABLE=FALSE.  The result there: CKA_COPYABLE=TRUE (harmless, see above) and
CKA_VALUE_LEN=0.

Secrets: the SO PIN comes from ``--so-pin-file FILE``, else ``$HASHIM_SO_PIN``, else a
terminal prompt (getpass); the user PIN likewise from ``--pin-file`` / ``$HASHIM_PIN`` /
prompt.  They are held in bytearrays, wiped after use, and never printed, logged or put in
an error message.
"""
from __future__ import annotations

import argparse
import getpass
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from . import p11util as u
from .config import Config, MemberConfig
from .errors import P11Error, rv_name
from .spec.constants import (CKA_CHECK_VALUE, CKA_CLASS, CKA_COPYABLE, CKA_DECRYPT,
                             CKA_DERIVE, CKA_DESTROYABLE, CKA_ENCRYPT, CKA_EXTRACTABLE,
                             CKA_ID, CKA_KEY_TYPE, CKA_LABEL, CKA_MODIFIABLE, CKA_MODULUS,
                             CKA_MODULUS_BITS, CKA_PRIVATE, CKA_PUBLIC_EXPONENT,
                             CKA_SENSITIVE, CKA_SIGN, CKA_TOKEN, CKA_TRUSTED, CKA_UNWRAP,
                             CKA_VALUE, CKA_VALUE_LEN, CKA_VERIFY, CKA_WRAP,
                             CKA_WRAP_WITH_TRUSTED, CKK_AES, CKK_RSA,
                             CKM_RSA_PKCS_KEY_PAIR_GEN, CKO_PUBLIC_KEY, CKO_SECRET_KEY, CKR,
                             CKU_SO, CKU_USER)

DOMAIN_LABEL = "hashim-domain"
DOMAIN_ID = b"hashim-domain"
DOMAIN_KEY_BYTES = 32
TRANSPORT_BITS = 2048
CHECK_TIMEOUT = 30.0

SO_PIN_ENV = "HASHIM_SO_PIN"
PIN_ENV = "HASHIM_PIN"

__all__ = ["DOMAIN_LABEL", "DOMAIN_ID", "find_domain_key", "check_value",
           "domain_key_template", "domain_key_info", "main", "add_arguments",
           "init_domain", "check_new_member", "read_secret"]


# --------------------------------------------------------------------------- errors

class _Usage(Exception):
    """Usage error (exit 2)."""


class _Failed(Exception):
    """Operation failed (exit 1)."""


def _report(exc: Exception) -> int:
    """One line on stderr; the exit code (2 usage, 1 failure).  Printed here rather than
    raised as shim.cli's exceptions, which are other classes when the CLI runs as
    ``python -m shim.cli``."""
    sys.stdout.flush()
    sys.stderr.write("hashim: " + " ".join(str(exc).split()) + "\n")
    sys.stderr.flush()
    return 2 if isinstance(exc, _Usage) else 1


# --------------------------------------------------------------------------- the key

def domain_key_template(token: bool = True, *, modifiable: bool = False,
                        copyable: bool = False, destroyable: bool = False) -> dict[int, object]:
    """The domain key's attributes (without CKA_VALUE).  Order matters on SoftHSM2: the
    CKA_MODIFIABLE entry comes last (attributes after a FALSE one would be read-only)."""
    return {
        CKA_CLASS: CKO_SECRET_KEY,
        CKA_KEY_TYPE: CKK_AES,
        CKA_TOKEN: token,
        CKA_PRIVATE: False,
        CKA_LABEL: DOMAIN_LABEL,
        CKA_ID: DOMAIN_ID,
        CKA_TRUSTED: True,
        CKA_WRAP: True,
        CKA_UNWRAP: True,
        CKA_ENCRYPT: False,
        CKA_DECRYPT: False,
        CKA_SIGN: False,
        CKA_VERIFY: False,
        CKA_DERIVE: False,
        CKA_SENSITIVE: True,
        CKA_EXTRACTABLE: True,
        CKA_WRAP_WITH_TRUSTED: True,
        CKA_COPYABLE: copyable,
        CKA_DESTROYABLE: destroyable,
        CKA_MODIFIABLE: modifiable,
    }


def find_domain_key(module, session: int) -> int | None:
    """Handle of the domain key on the session's token (a token object), or None.  Works in
    any session, logged in or not (the key is a public object)."""
    found = u.find_objects(module, session, {CKA_CLASS: CKO_SECRET_KEY, CKA_TOKEN: True,
                                             CKA_ID: DOMAIN_ID, CKA_LABEL: DOMAIN_LABEL}, 2)
    return found[0] if found else None


def check_value(module, session: int, handle: int) -> bytes:
    """CKA_CHECK_VALUE of the key (b"" when the token gives none)."""
    return u.get_attribute(module, session, handle, CKA_CHECK_VALUE) or b""


_INFO_ATTRS = {
    "trusted": CKA_TRUSTED, "wrap": CKA_WRAP, "unwrap": CKA_UNWRAP, "encrypt": CKA_ENCRYPT,
    "decrypt": CKA_DECRYPT, "sign": CKA_SIGN, "verify": CKA_VERIFY, "derive": CKA_DERIVE,
    "sensitive": CKA_SENSITIVE, "extractable": CKA_EXTRACTABLE,
    "wrap_with_trusted": CKA_WRAP_WITH_TRUSTED, "modifiable": CKA_MODIFIABLE,
    "copyable": CKA_COPYABLE, "destroyable": CKA_DESTROYABLE, "private": CKA_PRIVATE,
    "token": CKA_TOKEN,
}


def domain_key_info(module, session: int, handle: int) -> dict[str, object]:
    """The key's public attributes as a dict (booleans, ``check_value`` hex,
    ``value_len``)."""
    vals = u.get_attributes(module, session, handle,
                            list(_INFO_ATTRS.values()) + [CKA_CHECK_VALUE, CKA_VALUE_LEN,
                                                          CKA_KEY_TYPE])
    out: dict[str, object] = {k: u.as_bool(vals[a]) for k, a in _INFO_ATTRS.items()}
    out["check_value"] = (vals[CKA_CHECK_VALUE] or b"").hex()
    out["value_len"] = u.as_ulong(vals[CKA_VALUE_LEN])
    out["key_type_aes"] = u.as_ulong(vals[CKA_KEY_TYPE]) == CKK_AES
    return out


def _hex(kcv: bytes) -> str:
    return kcv.hex() if kcv else "(none)"


# --------------------------------------------------------------------------- secrets

def read_secret(file: str | None, env: str, what: str, option: str) -> bytearray | None:
    """A PIN from ``file`` (first line), else ``$env``, else a terminal prompt; None when
    there is none.  Raises _Usage when the file cannot be read."""
    if file:
        try:
            with open(file, "rb") as f:
                data = bytearray(f.read())
        except OSError as e:
            raise _Usage(f"{option} {file}: cannot read it ({e.strerror or e}); give a "
                         f"readable file holding the {what}") from None
        nl = data.find(b"\n")
        if nl >= 0:
            u.wipe(data[nl:])
            del data[nl:]
        if data.endswith(b"\r"):
            del data[-1:]
        if not data:
            raise _Usage(f"{option} {file}: the file is empty; put the {what} on its first "
                         "line")
        return data
    v = os.environ.get(env)
    if v:
        return bytearray(v.encode("utf-8"))
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            p = getpass.getpass(f"{what}: ")
        except (EOFError, OSError):
            return None
        if p:
            return bytearray(p.encode("utf-8"))
    return None


def _so_pin(args) -> bytearray:
    pin = read_secret(getattr(args, "so_pin_file", None), SO_PIN_ENV,
                      "security officer PIN", "--so-pin-file")
    if pin is None:
        raise _Usage(f"no security officer PIN: set {SO_PIN_ENV}, give --so-pin-file FILE, "
                     "or run on a terminal to be prompted")
    return pin


# --------------------------------------------------------------------------- members

def _member_options(m: MemberConfig) -> str:
    """The MEMBER-OPTIONS that describe a configured member (for messages)."""
    parts = [f"--module {_q(m.module)}"]
    if m.token_label is not None:
        parts.append(f"--token-label {_q(m.token_label)}")
    else:
        parts.append(f"--token-serial {_q(m.token_serial or '')}")
    for k, v in m.env.items():
        parts.append(f"--env {_q(k + '=' + v)}")
    if m.private_instance:
        parts.append("--private-instance")
    if m.isolate:
        parts.append("--isolate")
    return " ".join(parts)


def _q(s: str) -> str:
    import shlex
    return shlex.quote(s)


def _load_config(args) -> Config:
    from . import config as cfg
    c = cfg.load(args.config_path, check_files=True)
    return c


@dataclass
class _Seen:
    name: str
    handle: int | None = None
    kcv: bytes = b""
    trusted: bool | None = None
    error: str | None = None


def _inspect(loader: u.MemberLoader, m: MemberConfig) -> _Seen:
    """Load a member and look for its domain key (no login)."""
    seen = _Seen(m.name)
    try:
        module, slot = loader.load(m)
        with u.session(module, slot, rw=False) as s:
            h = find_domain_key(module, s.h)
            if h is not None:
                seen.handle = h
                vals = s.get(h, [CKA_CHECK_VALUE, CKA_TRUSTED])
                seen.kcv = vals[CKA_CHECK_VALUE] or b""
                seen.trusted = u.as_bool(vals[CKA_TRUSTED])
    except P11Error as e:
        seen.error = e.reason or str(e)
        if rv_name(e.rv) not in seen.error:
            seen.error += f" ({rv_name(e.rv)})"
    return seen


def _so_session(module, slot: int, pin: bytearray, name: str) -> u.Session:
    s = u.Session(module, slot, rw=True)
    try:
        s.login(CKU_SO, pin)
    except P11Error as e:
        s.close()
        hint = {
            CKR.PIN_INCORRECT: "check the security officer PIN (the same on every member)",
            CKR.PIN_LOCKED: "the SO PIN is locked on this token",
            CKR.SESSION_READ_ONLY_EXISTS: "close other sessions of this process",
            CKR.USER_ANOTHER_ALREADY_LOGGED_IN: "log the user out of this token first",
        }.get(e.rv, "check the token and the SO PIN")
        raise _Failed(f"member '{name}': security officer login refused "
                      f"({rv_name(e.rv)}); {hint}") from None
    return s


# --------------------------------------------------------------------------- init

def init_domain(config: Config, so_pin: bytearray, cache_dir: str,
                out=print) -> dict[str, bytes]:
    """Create the domain key on every member of ``config``.  Refuses (``_Failed``, nothing
    written) if a member cannot be reached, already holds a domain key, refuses the SO
    login or the template.  Returns {member: check value}."""
    with u.MemberLoader(cache_dir) as loader:
        seen = [_inspect(loader, m) for m in config.members]
        for s in seen:
            if s.error:
                raise _Failed(f"member '{s.name}': {s.error}; nothing written")
        holders = [s for s in seen if s.handle is not None]
        if holders:
            h = holders[0]
            raise _Failed(f"member '{h.name}' already holds a domain key (check value "
                          f"{_hex(h.kcv)}); nothing written: run 'hashim domain check' to "
                          "compare the members, or 'hashim domain add-member NAME ...' to "
                          "copy the key to a token that lacks it")
        sessions: list[tuple[MemberConfig, u.Session]] = []
        value = bytearray(os.urandom(DOMAIN_KEY_BYTES))
        try:
            # every login and a dry run (session object) first: a failure writes nothing
            for m in config.members:
                module, slot = loader.load(m)
                sessions.append((m, _so_session(module, slot, so_pin, m.name)))
            dummy = bytearray(os.urandom(DOMAIN_KEY_BYTES))
            try:
                for m, s in sessions:
                    try:
                        s.create({**domain_key_template(token=False), CKA_VALUE: dummy})
                    except P11Error as e:
                        raise _Failed(f"member '{m.name}' refuses the domain key template "
                                      f"({rv_name(e.rv)}); nothing written") from None
            finally:
                u.wipe(dummy)
            done: dict[str, bytes] = {}
            for m, s in sessions:
                try:
                    h = s.create({**domain_key_template(token=True), CKA_VALUE: value})
                    kcv = check_value(s.module, s.h, h)
                except P11Error as e:
                    made = ", ".join(done) or "none"
                    src = next(iter(done), None)
                    fix = (f"run 'hashim domain add-member {m.name} {_member_options(m)} "
                           f"--from {src}' to copy it" if src else "fix it and run "
                           "'hashim domain init' again")
                    raise _Failed(f"member '{m.name}': creating the domain key failed "
                                  f"({rv_name(e.rv)}); created on: {made}; {fix}") from None
                done[m.name] = kcv
                out(f"{m.name}: domain key created (check value {_hex(kcv)})")
            return done
        finally:
            u.wipe(value)
            for _, s in sessions:
                s.close()


def cmd_init(args) -> int:
    c = _load_config(args)
    pin = _so_pin(args)
    try:
        with tempfile.TemporaryDirectory(prefix="hashim-domain-") as cache:
            kcvs = init_domain(c, pin, cache)
    finally:
        u.wipe(pin)
    vals = set(kcvs.values())
    print(f"ok: domain key created on {len(kcvs)} members of group '{c.group.label}' "
          f"(check value {_hex(next(iter(vals)))})")
    return 0


# --------------------------------------------------------------------------- check

def check_members(config: Config, cache_dir: str) -> tuple[list[str], list[str]]:
    """(lines describing each member, problems).  No login needed."""
    lines: list[str] = []
    problems: list[str] = []
    with u.MemberLoader(cache_dir) as loader:
        seen = [(m, _inspect(loader, m)) for m in config.members]
    ref = next(((m, s) for m, s in seen if s.handle is not None and s.kcv), None)
    for m, s in seen:
        if s.error:
            lines.append(f"{m.name}: cannot check: {s.error}")
            problems.append(f"member '{m.name}' cannot be checked: {s.error}")
        elif s.handle is None:
            lines.append(f"{m.name}: no domain key")
            src = f" --from {ref[0].name}" if ref else ""
            fix = (f"run 'hashim domain add-member {m.name} {_member_options(m)}{src}'"
                   if ref else "run 'hashim domain init'")
            problems.append(f"member '{m.name}' has no domain key: {fix}")
        elif not s.kcv:
            lines.append(f"{m.name}: domain key without a check value")
            problems.append(f"member '{m.name}' holds a domain key without CKA_CHECK_VALUE, "
                            "so it cannot be compared: re-initialise that token and run "
                            f"'hashim domain add-member {m.name} ...'")
        elif ref is not None and s.kcv != ref[1].kcv:
            lines.append(f"{m.name}: DIFFERENT domain key (check value {_hex(s.kcv)}, "
                         f"{ref[0].name} has {_hex(ref[1].kcv)})")
            problems.append(f"member '{m.name}' holds a different domain key (check value "
                            f"{_hex(s.kcv)}, expected {_hex(ref[1].kcv)} as on "
                            f"'{ref[0].name}'): keys cannot be copied between them; "
                            f"re-initialise that token and run 'hashim domain add-member "
                            f"{m.name} {_member_options(m)} --from {ref[0].name}'")
        elif not s.trusted:
            lines.append(f"{m.name}: domain key present but NOT trusted (check value "
                         f"{_hex(s.kcv)})")
            problems.append(f"member '{m.name}' holds the domain key without CKA_TRUSTED: "
                            "it cannot export keys; re-create it with 'hashim domain "
                            "add-member' after re-initialising that token")
        else:
            lines.append(f"{m.name}: domain key present, trusted (check value "
                         f"{_hex(s.kcv)})")
    return lines, problems


def cmd_check(args) -> int:
    c = _load_config(args)
    with tempfile.TemporaryDirectory(prefix="hashim-domain-") as cache:
        lines, problems = check_members(c, cache)
    for line in lines:
        print(line)
    sys.stdout.flush()
    if problems:
        for p in problems:
            sys.stderr.write("hashim: " + " ".join(p.split()) + "\n")
        return 1
    print(f"ok: all {len(c.members)} members of group '{c.group.label}' hold the same "
          "trusted domain key")
    return 0


# --------------------------------------------------------------------------- add-member

def _transport_pair(s: u.Session) -> tuple[int, int]:
    """An RSA transport key pair as public session objects (an SO session may create only
    public objects).  The private half can unwrap and do nothing else."""
    return s.generate_key_pair(
        CKM_RSA_PKCS_KEY_PAIR_GEN,
        {CKA_TOKEN: False, CKA_PRIVATE: False, CKA_MODULUS_BITS: TRANSPORT_BITS,
         CKA_PUBLIC_EXPONENT: b"\x01\x00\x01", CKA_WRAP: True, CKA_ENCRYPT: False,
         CKA_VERIFY: False, CKA_LABEL: "hashim-transport"},
        {CKA_TOKEN: False, CKA_PRIVATE: False, CKA_SENSITIVE: True, CKA_EXTRACTABLE: False,
         CKA_UNWRAP: True, CKA_DECRYPT: False, CKA_SIGN: False,
         CKA_LABEL: "hashim-transport"})


def _unwrap_domain_key(dst: u.Session, priv: int, wrapped: bytes, kcv: bytes,
                       notes: list[str]) -> int:
    """Unwrap the domain key into a token object on ``dst`` whose check value equals
    ``kcv``; see the module docstring for the two ways tried."""
    mech = u.rsa_oaep_sha1()
    # 1. the full template.  Tried as a session object first (it dies with the session):
    #    a token object that turned out wrong could not be destroyed (CKA_DESTROYABLE=FALSE).
    try:
        probe = dst.unwrap(mech, priv, wrapped, domain_key_template(token=False))
    except P11Error as e:
        notes.append(f"unwrap with CKA_MODIFIABLE=FALSE refused ({rv_name(e.rv)})")
    else:
        got = check_value(dst.module, dst.h, probe)
        if got and got != kcv:
            raise _Failed(f"the key unwrapped on the new token has check value {_hex(got)}, "
                          f"expected {_hex(kcv)}: nothing written")
        if got == kcv:
            h = dst.unwrap(mech, priv, wrapped, domain_key_template(token=True))
            got = check_value(dst.module, dst.h, h)
            if got != kcv:
                raise _Failed(f"the domain key unwrapped on the new token has check value "
                              f"{_hex(got)}, expected {_hex(kcv)}: re-initialise that token")
            notes.append("unwrapped straight into a token object")
            return h
        notes.append("the token computes no check value on unwrap")
    # 2. session object (modifiable, copyable) -> set and verify the check value -> copy
    #    to a token object made non-modifiable and non-destroyable
    tmp = dst.unwrap(mech, priv, wrapped,
                     domain_key_template(token=False, modifiable=True, copyable=True,
                                         destroyable=True))
    try:
        try:
            dst.set(tmp, {CKA_CHECK_VALUE: kcv})
        except P11Error as e:
            if e.rv == CKR.ATTRIBUTE_VALUE_INVALID:
                raise _Failed("the key unwrapped on the new token does not match the "
                              "source's check value: nothing written") from None
            raise
        got = check_value(dst.module, dst.h, tmp)
        if got != kcv:
            raise _Failed(f"the key unwrapped on the new token has check value "
                          f"{_hex(got)}, expected {_hex(kcv)}: nothing written")
        notes.append("unwrapped into a session object, check value set (verified by the "
                     "token), copied to a token object")
        return _copy_object(dst, tmp, {CKA_TOKEN: True, CKA_DESTROYABLE: False,
                                       CKA_MODIFIABLE: False})
    finally:
        try:
            dst.destroy(tmp)
        except P11Error:
            pass


def _copy_object(s: u.Session, obj: int, template: dict) -> int:
    h = u.ffi.new("CK_OBJECT_HANDLE *")
    with u.Template(template) as t:
        u.check(s.module, s.module.f["C_CopyObject"](s.h, obj, t.array, t.count, h),
                "C_CopyObject")
    return int(h[0])


def add_member_key(source: MemberConfig, new: MemberConfig, so_pin: bytearray,
                   cache_dir: str) -> tuple[bytes, bool, list[str]]:
    """Copy the domain key from ``source`` to ``new``'s token.  Returns (check value,
    copied? (False: the new token already held it), notes)."""
    notes: list[str] = []
    with u.MemberLoader(cache_dir) as loader:
        src_seen = _inspect(loader, source)
        if src_seen.error:
            raise _Failed(f"source member '{source.name}': {src_seen.error}")
        if src_seen.handle is None:
            raise _Failed(f"source member '{source.name}' holds no domain key; choose "
                          "another with --from")
        if not src_seen.kcv:
            raise _Failed(f"the domain key on '{source.name}' has no check value; choose "
                          "another member with --from")
        kcv = src_seen.kcv
        dst_seen = _inspect(loader, new)
        if dst_seen.error:
            raise _Failed(f"new member '{new.name}': {dst_seen.error}")
        if dst_seen.handle is not None:
            if dst_seen.kcv == kcv:
                return kcv, False, notes
            raise _Failed(f"the token of '{new.name}' already holds a different domain key "
                          f"(check value {_hex(dst_seen.kcv)}, the group's is {_hex(kcv)}): "
                          "re-initialise that token first")
        src_mod, src_slot = loader.load(source)
        dst_mod, dst_slot = loader.load(new)
        dst = _so_session(dst_mod, dst_slot, so_pin, new.name)
        try:
            src = _so_session(src_mod, src_slot, so_pin, source.name)
            try:
                try:
                    pub, priv = _transport_pair(dst)
                    pub_attrs = dst.get(pub, [CKA_MODULUS, CKA_PUBLIC_EXPONENT])
                except P11Error as e:
                    raise _Failed(f"new member '{new.name}': cannot generate the RSA-"
                                  f"{TRANSPORT_BITS} transport key ({rv_name(e.rv)})") from None
                try:
                    wk = src.create({CKA_CLASS: CKO_PUBLIC_KEY, CKA_KEY_TYPE: CKK_RSA,
                                     CKA_TOKEN: False, CKA_PRIVATE: False,
                                     CKA_LABEL: "hashim-transport",
                                     CKA_MODULUS: pub_attrs[CKA_MODULUS],
                                     CKA_PUBLIC_EXPONENT: pub_attrs[CKA_PUBLIC_EXPONENT],
                                     CKA_TRUSTED: True, CKA_WRAP: True, CKA_ENCRYPT: False,
                                     CKA_VERIFY: False})
                except P11Error as e:
                    raise _Failed(f"source member '{source.name}': cannot import the "
                                  f"transport key as a trusted key ({rv_name(e.rv)})") from None
                # handles do not outlive the sessions of a token (SoftHSM2 forgets them
                # when its last session closes): look the key up again
                key = find_domain_key(src.module, src.h)
                if key is None or check_value(src.module, src.h, key) != kcv:
                    raise _Failed(f"source member '{source.name}': the domain key changed "
                                  "while it was being copied")
                try:
                    wrapped = src.wrap(u.rsa_oaep_sha1(), wk, key)
                except P11Error as e:
                    raise _Failed(f"source member '{source.name}': cannot wrap the domain key "
                                  f"with RSA-OAEP ({rv_name(e.rv)})") from None
                finally:
                    try:
                        src.destroy(wk)
                    except P11Error:
                        pass
            finally:
                src.close()
            try:
                _unwrap_domain_key(dst, priv, wrapped, kcv, notes)
            except P11Error as e:
                raise _Failed(f"new member '{new.name}': cannot unwrap the domain key "
                              f"({rv_name(e.rv)}); nothing written") from None
            finally:
                for h in (pub, priv):
                    try:
                        dst.destroy(h)
                    except P11Error:
                        pass
        finally:
            dst.close()
        # confirm from a fresh session
        seen = _inspect(loader, new)
        if seen.handle is None or seen.kcv != kcv:
            raise _Failed(f"new member '{new.name}': the domain key is not found with check "
                          f"value {_hex(kcv)} after the copy")
    return kcv, True, notes


def cmd_add_member(args) -> int:
    from . import cli
    c = _load_config(args)
    new = cli._member_from_args(args, c.path, check_files=True)
    if args.from_member is not None:
        if args.from_member not in c.member_names:
            raise _Usage(f"--from {args.from_member}: no such member in {c.path}; members "
                         "are: " + ", ".join(c.member_names))
        if args.from_member == new.name:
            raise _Usage(f"--from {args.from_member}: the source must be another member")
        candidates = [c.member(args.from_member)]
    else:
        candidates = [m for m in c.members if m.name != new.name]
        if not candidates:
            raise _Usage(f"no member other than '{new.name}' in {c.path} to copy the domain "
                         "key from")
    pin = _so_pin(args)
    try:
        with tempfile.TemporaryDirectory(prefix="hashim-domain-") as cache:
            source = candidates[0]
            if args.from_member is None:
                # the first configured member that holds the key
                with u.MemberLoader(cache) as loader:
                    for m in candidates:
                        s = _inspect(loader, m)
                        if s.handle is not None and s.kcv:
                            source = m
                            break
                    else:
                        raise _Failed("no member of the group holds a domain key: run "
                                      "'hashim domain init' first")
            kcv, copied, notes = add_member_key(source, new, pin, cache)
    finally:
        u.wipe(pin)
    if not copied:
        print(f"{new.name}: already holds the group's domain key (check value {_hex(kcv)});"
              " nothing to do")
    else:
        print(f"{new.name}: domain key copied from {source.name} (check value {_hex(kcv)})")
    if new.name not in c.member_names:
        print(f"next: hashim group add-member {new.name} {_member_options(new)}")
    return 0


# --------------------------------------------------------------------------- new member

def _member_to_json(m: MemberConfig) -> dict:
    return {"name": m.name, "module": m.module, "token_label": m.token_label,
            "token_serial": m.token_serial, "private_instance": m.private_instance,
            "env": dict(m.env), "isolate": m.isolate}


def check_new_member(member_config: MemberConfig, *, pin: bytearray | None = None,
                     timeout: float = CHECK_TIMEOUT) -> list[str]:
    """Problems with a member about to be added (empty: fine): its module loads (private
    instance and env honoured), its token is present, the user PIN ($HASHIM_PIN, or a
    prompt on a terminal) logs in, and the domain key is there and trusted.  The module is
    driven in a child process (a crash or a hang cannot take the caller down), killed
    after ``timeout`` seconds."""
    m = member_config
    problems: list[str] = []
    own_pin = pin is None
    if pin is None:
        pin = read_secret(None, PIN_ENV, f"user PIN of the token of '{m.name}'", "")
    if pin is None:
        problems.append(f"no user PIN to test the login with: set {PIN_ENV} (or run on a "
                        "terminal to be prompted)")
    # one JSON line (no secret), then the PIN's bytes
    data = bytearray(json.dumps({"member": _member_to_json(m),
                                 "pin": pin is not None}).encode() + b"\n")
    if pin is not None:
        data += pin
        if own_pin:
            u.wipe(pin)
    env = dict(os.environ)
    pkg_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = pkg_root + (os.pathsep + env["PYTHONPATH"]
                                    if env.get("PYTHONPATH") else "")
    env.pop(PIN_ENV, None)
    env.pop(SO_PIN_ENV, None)
    try:
        r = subprocess.run([sys.executable, "-c",
                            "import shim.domain as d; d._check_child()"],
                           input=data, capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return problems + [f"the module {m.module} did not answer within {timeout:g} s "
                           "(hung?)"]
    finally:
        u.wipe(data)
    if r.returncode != 0:
        if r.returncode < 0:
            how = f"killed by signal {-r.returncode}"
        else:
            how = f"exit status {r.returncode}"
        return problems + [f"the module {m.module} crashed while being checked ({how})"]
    try:
        problems += json.loads(r.stdout.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        problems.append(f"checking the module {m.module} gave no answer")
    return problems


def _check_child() -> None:
    """Child side of :func:`check_new_member`: request on stdin, JSON list on stdout."""
    raw = bytearray(sys.stdin.buffer.read())
    nl = raw.index(b"\n")
    req = json.loads(bytes(raw[:nl]))
    md = req["member"]
    m = MemberConfig(md["name"], md["module"], md["token_label"], md["token_serial"],
                     md["private_instance"], md["env"], md["isolate"])
    pin = bytearray(raw[nl + 1:]) if req.get("pin") else None
    u.wipe(raw)
    problems: list[str] = []
    tok = (f"label '{m.token_label}'" if m.token_label is not None
           else f"serial '{m.token_serial}'")
    with tempfile.TemporaryDirectory(prefix="hashim-check-") as cache:
        try:
            module = u.load_member(m, cache)
        except P11Error as e:
            problems.append(e.reason or str(e))
            module = None
        if module is not None:
            try:
                slot = module.find_slot(m.token_label, m.token_serial)
            except P11Error as e:
                problems.append(e.reason or str(e))
                slot = None
            if slot is not None:
                try:
                    with u.session(module, slot, rw=False) as s:
                        h = find_domain_key(module, s.h)
                        if h is None:
                            problems.append(
                                f"no domain key on the token with {tok}: run 'hashim domain "
                                f"add-member {m.name} {_member_options(m)}' first")
                        elif not u.as_bool(s.get1(h, CKA_TRUSTED)):
                            problems.append(f"the domain key on the token with {tok} is not "
                                            "trusted")
                        if pin is not None:
                            try:
                                s.login(CKU_USER, pin)
                            except P11Error as e:
                                problems.append(f"the user PIN does not log in to the token "
                                                f"with {tok} ({rv_name(e.rv)})")
                except P11Error as e:
                    problems.append(e.reason or str(e))
            module.finalize()
    if pin is not None:
        u.wipe(pin)
    sys.stdout.write(json.dumps(problems) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- CLI

def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    """No options beyond the documented ones."""
    return None


def main(args) -> int:
    cmd = getattr(args, "domain_command", None)
    fn = {"init": cmd_init, "check": cmd_check, "add-member": cmd_add_member}.get(cmd)
    if fn is None:
        return _report(_Usage(f"unknown domain command {cmd!r}"))
    try:
        return fn(args)
    except (_Usage, _Failed) as e:
        return _report(e)
    except P11Error as e:
        return _report(_Failed(e.reason or str(e)))
    except Exception as e:
        # shim.cli's own exceptions (from _member_from_args), whatever copy of it raised them
        kind = type(e).__name__
        if kind == "UsageError":
            return _report(_Usage(str(e)))
        if kind == "OperationFailed":
            return _report(_Failed(str(e)))
        raise
