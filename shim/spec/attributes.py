"""Attribute knowledge as data: how values are packed, which attributes identify an
object across members, which may be copied when an object is re-created on another
member, and which are never logged."""
from __future__ import annotations

import struct

from .constants import CKA, CKK, CKO

A = CKA
ULONG = struct.Struct("@L")

BOOL_ATTRS = {A.TOKEN, A.PRIVATE, A.MODIFIABLE, A.COPYABLE, A.DESTROYABLE, A.SENSITIVE,
              A.ENCRYPT, A.DECRYPT, A.WRAP, A.UNWRAP, A.SIGN, A.SIGN_RECOVER, A.VERIFY,
              A.VERIFY_RECOVER, A.DERIVE, A.EXTRACTABLE, A.LOCAL, A.NEVER_EXTRACTABLE,
              A.ALWAYS_SENSITIVE, A.WRAP_WITH_TRUSTED, A.TRUSTED, A.ALWAYS_AUTHENTICATE}
ULONG_ATTRS = {A.CLASS, A.KEY_TYPE, A.CERTIFICATE_TYPE, A.VALUE_LEN, A.MODULUS_BITS,
               A.KEY_GEN_MECHANISM, A.CERTIFICATE_CATEGORY, A.JAVA_MIDP_SECURITY_DOMAIN}
TEMPLATE_ATTRS = {A.WRAP_TEMPLATE, A.UNWRAP_TEMPLATE, A.DERIVE_TEMPLATE}

# Never written to a log or an error text.
SECRET_ATTRS = {A.VALUE, A.PRIVATE_EXPONENT, A.PRIME_1, A.PRIME_2, A.EXPONENT_1,
                A.EXPONENT_2, A.COEFFICIENT}

# Identity across members: these public attributes, plus the key material's public
# part (IDENTITY_MATERIAL). Secret keys are told apart by CKA_CHECK_VALUE.
IDENTITY = (A.CLASS, A.KEY_TYPE, A.ID, A.LABEL, A.CERTIFICATE_TYPE, A.APPLICATION)
IDENTITY_MATERIAL = {
    (CKO.PUBLIC_KEY, CKK.RSA): (A.MODULUS, A.PUBLIC_EXPONENT),
    (CKO.PRIVATE_KEY, CKK.RSA): (A.MODULUS, A.PUBLIC_EXPONENT),
    (CKO.PUBLIC_KEY, CKK.EC): (A.EC_PARAMS, A.EC_POINT),
    (CKO.PRIVATE_KEY, CKK.EC): (A.EC_PARAMS,),
    (CKO.SECRET_KEY, None): (A.CHECK_VALUE,),
    (CKO.CERTIFICATE, None): (A.VALUE,),
    (CKO.DATA, None): (A.VALUE, A.OBJECT_ID),
    (CKO.PUBLIC_KEY, None): (A.VALUE,),
}

COMMON = (A.TOKEN, A.PRIVATE, A.LABEL, A.MODIFIABLE, A.COPYABLE, A.DESTROYABLE)
KEY_COMMON = COMMON + (A.KEY_TYPE, A.ID, A.START_DATE, A.END_DATE, A.DERIVE,
                       A.ALLOWED_MECHANISMS)
# Attributes set when an object is re-created on another member. Public objects are
# re-created from these values; private and secret keys are unwrapped under the
# domain key with these as the template (their secret values travel wrapped).
COPY = {
    CKO.DATA: COMMON + (A.APPLICATION, A.OBJECT_ID, A.VALUE),
    CKO.CERTIFICATE: COMMON + (A.CERTIFICATE_TYPE, A.TRUSTED, A.CERTIFICATE_CATEGORY,
                               A.CHECK_VALUE, A.START_DATE, A.END_DATE, A.SUBJECT, A.ID,
                               A.ISSUER, A.SERIAL_NUMBER, A.VALUE, A.URL,
                               A.HASH_OF_SUBJECT_PUBLIC_KEY, A.HASH_OF_ISSUER_PUBLIC_KEY,
                               A.JAVA_MIDP_SECURITY_DOMAIN),
    CKO.PUBLIC_KEY: KEY_COMMON + (A.SUBJECT, A.ENCRYPT, A.VERIFY, A.VERIFY_RECOVER, A.WRAP,
                                  A.MODULUS, A.PUBLIC_EXPONENT, A.EC_PARAMS, A.EC_POINT,
                                  A.PRIME, A.SUBPRIME, A.BASE, A.VALUE, A.WRAP_TEMPLATE),
    CKO.PRIVATE_KEY: KEY_COMMON + (A.SUBJECT, A.SENSITIVE, A.DECRYPT, A.SIGN,
                                   A.SIGN_RECOVER, A.UNWRAP, A.EXTRACTABLE,
                                   A.WRAP_WITH_TRUSTED, A.ALWAYS_AUTHENTICATE,
                                   A.UNWRAP_TEMPLATE),
    CKO.SECRET_KEY: KEY_COMMON + (A.SENSITIVE, A.ENCRYPT, A.DECRYPT, A.SIGN, A.VERIFY,
                                  A.WRAP, A.UNWRAP, A.EXTRACTABLE, A.WRAP_WITH_TRUSTED,
                                  A.TRUSTED, A.VALUE_LEN, A.WRAP_TEMPLATE,
                                  A.UNWRAP_TEMPLATE),
}
# Read-only once set: never part of a template that re-creates an object.
NOT_SETTABLE = {A.LOCAL, A.NEVER_EXTRACTABLE, A.ALWAYS_SENSITIVE, A.KEY_GEN_MECHANISM,
                A.MODULUS_BITS}


def material_attrs(cls, key_type):
    return IDENTITY_MATERIAL.get((cls, key_type)) or IDENTITY_MATERIAL.get((cls, None), ())


def pack_ulong(v: int) -> bytes:
    return ULONG.pack(v)


def unpack_ulong(b: bytes) -> int:
    return ULONG.unpack(b)[0]


def pack_bool(v: bool) -> bytes:
    return b"\x01" if v else b"\x00"


def pack(attr: int, value) -> bytes:
    """A Python value as the bytes of an attribute."""
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if attr in BOOL_ATTRS or isinstance(value, bool):
        return pack_bool(value)
    if isinstance(value, int):
        return pack_ulong(value)
    if isinstance(value, str):
        return value.encode()
    raise TypeError(f"cannot pack attribute {attr:#x}")
