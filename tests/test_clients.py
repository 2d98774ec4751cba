"""Real hosts against the ``target`` fixture: each test runs once against the
token's own SoftHSM2 library ("direct") and once through hashim over a
one-member group on an identical fresh token ("hashim").

Hosts: pkcs11-tool (OpenSC), python-pkcs11, PyKCS11, Java 17 SunPKCS11,
OpenSSL 3 + libengine-pkcs11-openssl, and a small threaded C host.  Every
module load happens in a child process (tests/clients.py)."""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.clients import OPENSSL, PKCS11_TOOL, Target, base_env, result, run, run_py

HERE = Path(__file__).resolve().parent
DATA = b"hashim says hello to every host\n" * 8
IV = "000102030405060708090a0b0c0d0e0f"
ENGINE = "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so"


def ossl(*args, env=None, **kw):
    return run([OPENSSL, *map(str, args)], env or dict(os.environ), **kw)


def write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def gen_rsa(t: Target, id_: str = "01", label: str = "rsa", bits: int = 2048):
    return t.tool("--keypairgen", "--key-type", f"rsa:{bits}", "--id", id_, "--label", label,
                  login=True)


def gen_ec(t: Target, id_: str = "02", label: str = "ec"):
    return t.tool("--keypairgen", "--key-type", "EC:prime256v1", "--id", id_, "--label", label,
                  login=True)


def export_pub(t: Target, id_: str, out: Path) -> Path:
    """The public key as PEM, read through the target with pkcs11-tool."""
    der = out.with_suffix(".der")
    t.tool("--read-object", "--type", "pubkey", "--id", id_, "-o", der)
    ossl("pkey", "-pubin", "-inform", "DER", "-in", der, "-out", out)
    return out


# ---------------------------------------------------------------------------
# pkcs11-tool
# ---------------------------------------------------------------------------
def test_tool_list_slots_mechanisms(target: Target):
    out = target.tool("-L").stdout
    assert re.search(rf"token label\s*:\s*{re.escape(target.label)}\s*$", out, re.M), out
    assert "PIN initialized" in out and "login required" in out, out
    mechs = target.tool("-M").stdout
    for m in ("RSA-PKCS,", "SHA256-RSA-PKCS,", "RSA-PKCS-PSS", "RSA-PKCS-OAEP", "ECDSA,",
              "ECDSA-KEY-PAIR-GEN", "AES-CBC-PAD", "AES-GCM", "AES-KEY-WRAP", "SHA256,",
              "RSA-PKCS-KEY-PAIR-GEN", "AES-KEY-GEN"):
        assert m in mechs, (m, mechs)
    # -I: library info goes through C_GetInfo
    assert "Cryptoki version" in target.tool("-I").stdout


def test_tool_keypairgen_and_list_objects(target: Target):
    gen_rsa(target)
    gen_ec(target)
    target.tool("--keygen", "--key-type", "AES:32", "--id", "03", "--label", "aes", login=True)
    out = target.tool("-O", login=True).stdout
    assert out.count("Private Key Object") == 2, out
    assert re.search(r"Public Key Object; RSA 2048 bits\s+label:\s+rsa\s+ID:\s+01", out), out
    assert re.search(r"Public Key Object; EC\s+EC_POINT 256 bits", out), out
    assert re.search(r"Secret Key Object; AES length 32\s+label:\s+aes\s+ID:\s+03", out), out
    assert "06082a8648ce3d030107" in out  # prime256v1 EC_PARAMS
    # without a login the private keys are not visible
    public = target.tool("-O").stdout
    assert "Private Key Object" not in public, public
    assert public.count("Public Key Object") == 2, public
    # the keys live on the real token: its own module sees the same objects
    tok = target.token
    direct = run([PKCS11_TOOL, "--module", tok.lib, "--token-label", tok.label, "-O", "--login",
                  "--pin", tok.pin], base_env(**tok.env)).stdout
    for kind in ("Private Key Object; RSA", "Private Key Object; EC", "Public Key Object; RSA 2048",
                 "Secret Key Object; AES length 32"):
        assert kind in direct, (kind, direct)


def test_tool_rsa_sign_verify(target: Target, tmp_path):
    gen_rsa(target)
    msg = write(tmp_path / "msg", DATA)
    pub = export_pub(target, "01", tmp_path / "rsa.pem")
    digest = write(tmp_path / "msg.sha256", hashlib.sha256(DATA).digest())

    # SHA256-RSA-PKCS: pkcs11-tool verifies, openssl verifies with the exported key
    target.tool("--sign", "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", msg,
                "-o", tmp_path / "s1", login=True)
    assert (tmp_path / "s1").stat().st_size == 256
    v = target.tool("--verify", "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", msg,
                    "--signature-file", tmp_path / "s1", login=True)
    assert "Signature is valid" in v.stdout, v.stdout + v.stderr
    ossl("dgst", "-sha256", "-verify", pub, "-signature", tmp_path / "s1", msg)

    # raw RSA-PKCS over a DigestInfo is the same signature (deterministic padding)
    di = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(DATA).digest()
    write(tmp_path / "di", di)
    target.tool("--sign", "--id", "01", "-m", "RSA-PKCS", "-i", tmp_path / "di",
                "-o", tmp_path / "s2", login=True)
    assert (tmp_path / "s2").read_bytes() == (tmp_path / "s1").read_bytes()
    v = target.tool("--verify", "--id", "01", "-m", "RSA-PKCS", "-i", tmp_path / "di",
                    "--signature-file", tmp_path / "s2", login=True)
    assert "Signature is valid" in v.stdout

    # PSS, checked by openssl
    target.tool("--sign", "--id", "01", "-m", "RSA-PKCS-PSS", "--hash-algorithm", "SHA256",
                "--mgf", "MGF1-SHA256", "--salt-len", "32", "-i", digest,
                "-o", tmp_path / "s3", login=True)
    ossl("pkeyutl", "-verify", "-pubin", "-inkey", pub, "-in", digest, "-sigfile", tmp_path / "s3",
         "-pkeyopt", "rsa_padding_mode:pss", "-pkeyopt", "rsa_pss_saltlen:32",
         "-pkeyopt", "digest:sha256")

    # a corrupted signature is reported invalid
    bad = bytearray((tmp_path / "s1").read_bytes())
    bad[-1] ^= 1
    write(tmp_path / "bad", bytes(bad))
    v = target.tool("--verify", "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", msg,
                    "--signature-file", tmp_path / "bad", login=True, check=False)
    assert "Invalid signature" in v.stdout + v.stderr, v.stdout + v.stderr


def test_tool_ecdsa_sign_verify(target: Target, tmp_path):
    gen_ec(target)
    pub = export_pub(target, "02", tmp_path / "ec.pem")
    digest = write(tmp_path / "h", hashlib.sha256(DATA).digest())  # no CKM_ECDSA_SHA256 here
    target.tool("--sign", "--id", "02", "-m", "ECDSA", "-i", digest, "-o", tmp_path / "rs",
                login=True)
    assert (tmp_path / "rs").stat().st_size == 64
    v = target.tool("--verify", "--id", "02", "-m", "ECDSA", "-i", digest,
                    "--signature-file", tmp_path / "rs", login=True)
    assert "Signature is valid" in v.stdout, v.stdout + v.stderr
    target.tool("--sign", "--id", "02", "-m", "ECDSA", "-i", digest, "-o", tmp_path / "der",
                "--signature-format", "openssl", login=True)
    ossl("pkeyutl", "-verify", "-pubin", "-inkey", pub, "-in", digest,
         "-sigfile", tmp_path / "der")
    bad = bytearray((tmp_path / "rs").read_bytes())
    bad[5] ^= 0x40
    write(tmp_path / "bad", bytes(bad))
    v = target.tool("--verify", "--id", "02", "-m", "ECDSA", "-i", digest,
                    "--signature-file", tmp_path / "bad", login=True, check=False)
    assert "Invalid signature" in v.stdout + v.stderr, v.stdout + v.stderr


def test_tool_rsa_oaep_decrypt(target: Target, tmp_path):
    # pkcs11-tool 0.23 encrypts with secret keys only: encrypt with openssl using the
    # exported public key; SoftHSM2 2.6.1 does OAEP with SHA-1/MGF1-SHA1 only.
    gen_rsa(target)
    pub = export_pub(target, "01", tmp_path / "rsa.pem")
    plain = write(tmp_path / "plain", b"top secret 0123456789")
    ossl("pkeyutl", "-encrypt", "-pubin", "-inkey", pub, "-in", plain, "-out", tmp_path / "ct",
         "-pkeyopt", "rsa_padding_mode:oaep", "-pkeyopt", "rsa_oaep_md:sha1")
    target.tool("--decrypt", "--id", "01", "-m", "RSA-PKCS-OAEP", "--hash-algorithm", "SHA-1",
                "--mgf", "MGF1-SHA1", "-i", tmp_path / "ct", "-o", tmp_path / "pt", login=True)
    assert (tmp_path / "pt").read_bytes() == plain.read_bytes()
    # PKCS#1 v1.5 as well
    ossl("pkeyutl", "-encrypt", "-pubin", "-inkey", pub, "-in", plain, "-out", tmp_path / "ct2")
    target.tool("--decrypt", "--id", "01", "-m", "RSA-PKCS", "-i", tmp_path / "ct2",
                "-o", tmp_path / "pt2", login=True)
    assert (tmp_path / "pt2").read_bytes() == plain.read_bytes()


def test_tool_aes_keygen_encrypt_decrypt(target: Target, tmp_path):
    # this pkcs11-tool (OpenSC 0.23) has no AES-GCM for --encrypt: AES-CBC-PAD and AES-CBC
    target.tool("--keygen", "--key-type", "AES:32", "--id", "03", "--label", "aes", login=True)
    plain = write(tmp_path / "plain", DATA + b"odd length")
    target.tool("--encrypt", "--id", "03", "-m", "AES-CBC-PAD", "--iv", IV, "-i", plain,
                "-o", tmp_path / "ct", login=True)
    ct = (tmp_path / "ct").read_bytes()
    assert len(ct) == (len(plain.read_bytes()) // 16 + 1) * 16 and ct != plain.read_bytes()
    target.tool("--decrypt", "--id", "03", "-m", "AES-CBC-PAD", "--iv", IV, "-i", tmp_path / "ct",
                "-o", tmp_path / "pt", login=True)
    assert (tmp_path / "pt").read_bytes() == plain.read_bytes()
    # AES-CBC without padding on block-aligned data
    write(tmp_path / "blocks", DATA)
    target.tool("--encrypt", "--id", "03", "-m", "AES-CBC", "--iv", IV, "-i", tmp_path / "blocks",
                "-o", tmp_path / "ct2", login=True)
    assert (tmp_path / "ct2").read_bytes()[:16] == ct[:16]   # same key, IV and first block
    target.tool("--decrypt", "--id", "03", "-m", "AES-CBC", "--iv", IV, "-i", tmp_path / "ct2",
                "-o", tmp_path / "pt2", login=True)
    assert (tmp_path / "pt2").read_bytes() == DATA


def test_tool_hash_and_random(target: Target, tmp_path):
    msg = write(tmp_path / "msg", DATA)
    target.tool("--hash", "-m", "SHA256", "-i", msg, "-o", tmp_path / "h")
    assert (tmp_path / "h").read_bytes() == hashlib.sha256(DATA).digest()
    target.tool("--generate-random", "64", "-o", tmp_path / "r")
    assert len((tmp_path / "r").read_bytes()) == 64


def test_tool_self_test(target: Target):
    # `pkcs11-tool --test --login` on a token with an EC key pair and an AES key
    gen_ec(target)
    target.tool("--keygen", "--key-type", "AES:32", "--id", "03", "--label", "aes", login=True)
    p = target.tool("--test", login=True, check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "No errors" in p.stdout or "errors" not in p.stdout.lower(), p.stdout


def test_tool_self_test_rsa_oaep_limit(target: Target):
    # With an RSA key, OpenSC 0.23's self test asks SoftHSM2 for OAEP with SHA-256, which
    # SoftHSM2 2.6.1 refuses (CKR_ARGUMENTS_BAD) -> exit 1.  hashim must pass that through
    # unchanged: same exit code, same failing call and rv.
    gen_rsa(target)
    p = target.tool("--test", login=True, check=False)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "C_DecryptInit failed: rv = CKR_ARGUMENTS_BAD" in p.stdout + p.stderr, p.stdout + p.stderr


# ---------------------------------------------------------------------------
# python-pkcs11 and PyKCS11 (each in its own interpreter)
# ---------------------------------------------------------------------------
PY_PKCS11 = r'''
import hashlib
import pkcs11
from pkcs11 import Attribute, KeyType, Mechanism, MGF, ObjectClass
from pkcs11.mechanisms import GCMParams
from pkcs11.util.ec import encode_named_curve_parameters, encode_ec_public_key, encode_ecdsa_signature
from pkcs11.util.rsa import encode_rsa_public_key
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, utils
from tests.clients import emit

data = b"python-pkcs11 through the HA slot " * 40
out = {}
lib = pkcs11.lib(ARGS["module"])
out["manufacturer"] = bool(lib.manufacturer_id)
tok = lib.get_token(token_label=ARGS["label"])
out["token_label"] = tok.label
with tok.open(user_pin=ARGS["pin"], rw=True) as s:
    # RSA-PSS
    pub, priv = s.generate_keypair(KeyType.RSA, 2048, store=True, label="rsa", id=b"\x01")
    pss = dict(mechanism=Mechanism.SHA256_RSA_PKCS_PSS,
               mechanism_param=(Mechanism.SHA256, MGF.SHA256, 32))
    sig = priv.sign(data, **pss)
    out["pss_len"] = len(sig)
    out["pss_verify"] = pub.verify(data, sig, **pss)
    out["pss_verify_bad"] = pub.verify(data + b"x", sig, **pss)
    rsa_pub = serialization.load_der_public_key(encode_rsa_public_key(pub))
    rsa_pub.verify(sig, data, padding.PSS(padding.MGF1(hashes.SHA256()), 32), hashes.SHA256())
    out["pss_openssl"] = True

    # multi-part sign (C_SignUpdate / C_SignFinal) == single-part (PKCS#1 v1.5 is deterministic)
    chunks = [data[i:i + 100] for i in range(0, len(data), 100)]
    one = priv.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS)
    multi = priv.sign(iter(chunks), mechanism=Mechanism.SHA256_RSA_PKCS)
    out["multipart_equal"] = one == multi
    out["multipart_verify"] = pub.verify(iter(chunks), multi, mechanism=Mechanism.SHA256_RSA_PKCS)
    rsa_pub.verify(multi, data, padding.PKCS1v15(), hashes.SHA256())

    # ECDSA P-256 (SoftHSM2 has no CKM_ECDSA_SHA256: hash first)
    params = s.create_domain_parameters(
        KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
    epub, epriv = params.generate_keypair(store=True, label="ec", id=b"\x02")
    h = hashlib.sha256(data).digest()
    esig = epriv.sign(h, mechanism=Mechanism.ECDSA)
    out["ecdsa_len"] = len(esig)
    out["ecdsa_verify"] = epub.verify(h, esig, mechanism=Mechanism.ECDSA)
    ec_pub = serialization.load_der_public_key(encode_ec_public_key(epub))
    ec_pub.verify(encode_ecdsa_signature(esig), h, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
    out["ecdsa_openssl"] = True

    # AES-GCM
    aes = s.generate_key(KeyType.AES, 256, label="aes", store=False)
    gp = GCMParams(b"\x01" * 12, b"header", 128)
    ct = aes.encrypt(data, mechanism=Mechanism.AES_GCM, mechanism_param=gp)
    out["gcm_len"] = len(ct) - len(data)
    out["gcm_roundtrip"] = aes.decrypt(ct, mechanism=Mechanism.AES_GCM, mechanism_param=gp) == data
    try:
        bad = bytes([ct[0] ^ 1]) + ct[1:]
        aes.decrypt(bad, mechanism=Mechanism.AES_GCM, mechanism_param=gp)
        out["gcm_tamper"] = "accepted"
    except pkcs11.PKCS11Error as e:
        out["gcm_tamper"] = type(e).__name__

    # find objects
    out["privkeys"] = sorted(o.label for o in s.get_objects({Attribute.CLASS: ObjectClass.PRIVATE_KEY}))
    out["pubkeys"] = sorted(o.label for o in s.get_objects({Attribute.CLASS: ObjectClass.PUBLIC_KEY}))
    out["by_id"] = [o.object_class.name for o in s.get_objects({Attribute.ID: b"\x02"})]
    k = s.get_key(label="rsa", object_class=ObjectClass.PUBLIC_KEY)
    out["modulus_bits"] = k[Attribute.MODULUS_BITS]
    out["modulus_equal"] = k[Attribute.MODULUS] == pub[Attribute.MODULUS]
    out["priv_flags"] = [priv[Attribute.SENSITIVE], priv[Attribute.EXTRACTABLE], priv[Attribute.LOCAL]]
    try:
        priv[Attribute.PRIVATE_EXPONENT]
        out["sensitive"] = "readable"
    except pkcs11.AttributeSensitive:
        out["sensitive"] = "AttributeSensitive"

    # wrap / unwrap with AES key wrap (RFC 3394)
    kek = s.generate_key(KeyType.AES, 256, label="kek", store=False,
                         template={Attribute.WRAP: True, Attribute.UNWRAP: True})
    inner = s.generate_key(KeyType.AES, 128, label="inner", store=False,
                           template={Attribute.EXTRACTABLE: True, Attribute.SENSITIVE: True})
    wrapped = kek.wrap_key(inner, mechanism=Mechanism.AES_KEY_WRAP)
    out["wrapped_len"] = len(wrapped)
    back = kek.unwrap_key(ObjectClass.SECRET_KEY, KeyType.AES, wrapped, label="back",
                          mechanism=Mechanism.AES_KEY_WRAP, store=False,
                          template={Attribute.ENCRYPT: True, Attribute.DECRYPT: True})
    block = b"\x00" * 16
    out["unwrap_same_key"] = (inner.encrypt(block, mechanism=Mechanism.AES_ECB)
                              == back.encrypt(block, mechanism=Mechanism.AES_ECB))

    # digest (single and multi-part) and random
    out["sha256"] = s.digest(data, mechanism=Mechanism.SHA256) == hashlib.sha256(data).digest()
    out["sha256_multi"] = s.digest(iter(chunks), mechanism=Mechanism.SHA256) == hashlib.sha256(data).digest()
    r1, r2 = s.generate_random(256), s.generate_random(256)
    out["random"] = [len(r1), r1 != r2]
emit(out)
'''


def test_python_pkcs11(target: Target):
    out = result(run_py(PY_PKCS11, target.env, {"module": target.module, "label": target.label,
                                                "pin": target.pin}))
    assert out == {
        "manufacturer": True, "token_label": target.label,
        "pss_len": 256, "pss_verify": True, "pss_verify_bad": False, "pss_openssl": True,
        "multipart_equal": True, "multipart_verify": True,
        "ecdsa_len": 64, "ecdsa_verify": True, "ecdsa_openssl": True,
        "gcm_len": 16, "gcm_roundtrip": True,
        # SoftHSM2 2.6.1 reports a failed GCM tag check as CKR_GENERAL_ERROR; hashim must
        # return it as is (an application-level error, not a member failure)
        "gcm_tamper": "GeneralError",
        "privkeys": ["ec", "rsa"], "pubkeys": ["ec", "rsa"],
        "by_id": out["by_id"], "modulus_bits": 2048,
        "modulus_equal": True, "priv_flags": [True, False, True],
        "sensitive": "AttributeSensitive",
        "wrapped_len": 24, "unwrap_same_key": True,
        "sha256": True, "sha256_multi": True, "random": [32, True],
    }
    assert sorted(out["by_id"]) == ["PRIVATE_KEY", "PUBLIC_KEY"]


PY_PYKCS11 = r'''
import hashlib
import PyKCS11
from PyKCS11 import *
from PyKCS11.LowLevel import ckattrlist
from tests.clients import emit

data = b"PyKCS11 through the HA slot " * 40
out = {}
lib = PyKCS11Lib()
lib.load(ARGS["module"])
slots = [s for s in lib.getSlotList(tokenPresent=True)
         if lib.getTokenInfo(s).label.strip() == ARGS["label"]]
out["slots"] = len(slots)
slot = slots[0]
out["has_ecdsa"] = "CKM_ECDSA" in lib.getMechanismList(slot)
s = lib.openSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION)
try:
    s.getAttributeValue  # attribute exists
    s.findObjects([(CKA_CLASS, CKO_PRIVATE_KEY)])
    out["before_login"] = len(s.findObjects([(CKA_CLASS, CKO_PRIVATE_KEY)]))
    s.login(ARGS["pin"])
    out["state"] = s.getSessionInfo().state2text()

    # RSA key pair, RSA-PSS
    pubt = [(CKA_CLASS, CKO_PUBLIC_KEY), (CKA_TOKEN, CK_TRUE), (CKA_VERIFY, CK_TRUE),
            (CKA_ENCRYPT, CK_TRUE), (CKA_MODULUS_BITS, 2048),
            (CKA_PUBLIC_EXPONENT, (0x01, 0x00, 0x01)), (CKA_LABEL, "rsa"), (CKA_ID, (0x01,))]
    privt = [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_TOKEN, CK_TRUE), (CKA_PRIVATE, CK_TRUE),
             (CKA_SENSITIVE, CK_TRUE), (CKA_SIGN, CK_TRUE), (CKA_DECRYPT, CK_TRUE),
             (CKA_LABEL, "rsa"), (CKA_ID, (0x01,))]
    pub, priv = s.generateKeyPair(pubt, privt, mecha=MechanismRSAGENERATEKEYPAIR)
    m = RSA_PSS_Mechanism(CKM_SHA256_RSA_PKCS_PSS, CKM_SHA256, CKG_MGF1_SHA256, 32)
    sig = bytes(s.sign(priv, data, m))
    out["pss"] = [len(sig), s.verify(pub, data, sig, m), s.verify(pub, data + b"!", sig, m)]

    # RSA-OAEP (SHA-1: SoftHSM2 2.6.1's only OAEP hash)
    oaep = RSAOAEPMechanism(CKM_SHA_1, CKG_MGF1_SHA1)
    ct = bytes(s.encrypt(pub, b"secret", oaep))
    out["oaep"] = [len(ct), bytes(s.decrypt(priv, ct, oaep)) == b"secret"]

    # ECDSA
    ecparams = bytes.fromhex("06082a8648ce3d030107")
    epub, epriv = s.generateKeyPair(
        [(CKA_CLASS, CKO_PUBLIC_KEY), (CKA_TOKEN, CK_TRUE), (CKA_VERIFY, CK_TRUE),
         (CKA_EC_PARAMS, ecparams), (CKA_LABEL, "ec"), (CKA_ID, (0x02,))],
        [(CKA_CLASS, CKO_PRIVATE_KEY), (CKA_TOKEN, CK_TRUE), (CKA_PRIVATE, CK_TRUE),
         (CKA_SENSITIVE, CK_TRUE), (CKA_SIGN, CK_TRUE), (CKA_LABEL, "ec"), (CKA_ID, (0x02,))],
        mecha=MechanismECGENERATEKEYPAIR)
    h = hashlib.sha256(data).digest()
    esig = bytes(s.sign(epriv, h, Mechanism(CKM_ECDSA)))
    bad = bytes([esig[0] ^ 1]) + esig[1:]
    out["ecdsa"] = [len(esig), s.verify(epub, h, esig, Mechanism(CKM_ECDSA)),
                    s.verify(epub, h, bad, Mechanism(CKM_ECDSA))]

    # AES-GCM
    aes = s.generateKey([(CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_VALUE_LEN, 32),
                         (CKA_TOKEN, CK_FALSE), (CKA_ENCRYPT, CK_TRUE), (CKA_DECRYPT, CK_TRUE),
                         (CKA_LABEL, "aes")], mecha=MechanismAESGENERATEKEY)
    g = AES_GCM_Mechanism(b"\x02" * 12, b"aad", 128)
    ct = bytes(s.encrypt(aes, data, g))
    out["gcm"] = [len(ct) - len(data), bytes(s.decrypt(aes, ct, g)) == data]

    # multi-part encrypt / decrypt (AES-CBC-PAD) and multi-part digest
    cbc = Mechanism(CKM_AES_CBC_PAD, b"\x03" * 16)
    s.encryptInit(cbc, aes)
    parts = [bytes(s.encryptUpdate(data[i:i + 77])) for i in range(0, len(data), 77)]
    parts.append(bytes(s.encryptFinal()))
    ct2 = b"".join(parts)
    out["cbc_multi_equals_single"] = ct2 == bytes(s.encrypt(aes, data, cbc))
    s.decryptInit(cbc, aes)
    pt = b"".join(bytes(s.decryptUpdate(ct2[i:i + 50])) for i in range(0, len(ct2), 50))
    pt += bytes(s.decryptFinal())
    out["cbc_multi_roundtrip"] = pt == data
    d = s.digestSession(Mechanism(CKM_SHA256))
    for i in range(0, len(data), 64):
        d.update(data[i:i + 64])
    out["digest_multi"] = bytes(d.final()) == hashlib.sha256(data).digest()
    out["digest"] = bytes(s.digest(data, Mechanism(CKM_SHA256))) == hashlib.sha256(data).digest()

    # find objects and attributes (one sensitive: raw rv through the low-level call)
    out["find_priv"] = len(s.findObjects([(CKA_CLASS, CKO_PRIVATE_KEY)]))
    out["find_label"] = len(s.findObjects([(CKA_LABEL, "rsa")]))
    out["find_token"] = len(s.findObjects([(CKA_TOKEN, CK_TRUE)]))
    label, kid, mod = s.getAttributeValue(priv, [CKA_LABEL, CKA_ID, CKA_MODULUS])
    out["attrs"] = [label, bytes(kid).hex(), len(mod)]
    out["attrs_fragmented"] = [v is None for v in s.getAttributeValue(priv, [CKA_LABEL, CKA_PRIVATE_EXPONENT])]
    t = ckattrlist(1)
    t[0].SetType(CKA_PRIVATE_EXPONENT)
    out["sensitive_rv"] = CKR[s.lib.C_GetAttributeValue(s.session, priv, t)]

    # wrap / unwrap (AES key wrap)
    kek = s.generateKey([(CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_VALUE_LEN, 32),
                         (CKA_TOKEN, CK_FALSE), (CKA_WRAP, CK_TRUE), (CKA_UNWRAP, CK_TRUE)],
                        mecha=MechanismAESGENERATEKEY)
    inner = s.generateKey([(CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES), (CKA_VALUE_LEN, 16),
                           (CKA_TOKEN, CK_FALSE), (CKA_EXTRACTABLE, CK_TRUE), (CKA_ENCRYPT, CK_TRUE)],
                          mecha=MechanismAESGENERATEKEY)
    wrapped = bytes(s.wrapKey(kek, inner, Mechanism(CKM_AES_KEY_WRAP)))
    back = s.unwrapKey(kek, wrapped, [(CKA_CLASS, CKO_SECRET_KEY), (CKA_KEY_TYPE, CKK_AES),
                                      (CKA_TOKEN, CK_FALSE), (CKA_ENCRYPT, CK_TRUE)],
                       Mechanism(CKM_AES_KEY_WRAP))
    ecb = Mechanism(CKM_AES_ECB)
    out["wrap"] = [len(wrapped), bytes(s.encrypt(inner, b"\0" * 16, ecb)) == bytes(s.encrypt(back, b"\0" * 16, ecb))]

    r = bytes(s.generateRandom(48))
    out["random"] = len(r)
    s.destroyObject(aes)
    out["destroyed"] = len(s.findObjects([(CKA_LABEL, "aes")]))
    s.logout()
    out["after_logout"] = len(s.findObjects([(CKA_CLASS, CKO_PRIVATE_KEY)]))
finally:
    s.closeSession()
emit(out)
'''


def test_pykcs11(target: Target):
    out = result(run_py(PY_PYKCS11, target.env, {"module": target.module, "label": target.label,
                                                 "pin": target.pin}))
    assert out == {
        "slots": 1, "has_ecdsa": True, "before_login": 0, "state": "CKS_RW_USER_FUNCTIONS",
        "pss": [256, True, False], "oaep": [256, True], "ecdsa": [64, True, False],
        "gcm": [16, True], "cbc_multi_equals_single": True, "cbc_multi_roundtrip": True,
        "digest_multi": True, "digest": True,
        "find_priv": 2, "find_label": 2, "find_token": 4,
        "attrs": ["rsa", "01", 256], "attrs_fragmented": [False, True],
        "sensitive_rv": "CKR_ATTRIBUTE_SENSITIVE",
        "wrap": [24, True], "random": 48, "destroyed": 0, "after_logout": 0,
    }


# ---------------------------------------------------------------------------
# Java 17 SunPKCS11
# ---------------------------------------------------------------------------
def import_cert(t: Target, id_: str, label: str, tmp: Path) -> Path:
    """Give the key pair ``id_`` a certificate (same CKA_ID and label) on the token, so
    that SunPKCS11's keystore shows its private key.  The certificate is issued by a
    throw-away software CA over the token's public key."""
    d = tmp / f"cert-{label}"
    d.mkdir(exist_ok=True)
    pub = export_pub(t, id_, d / "pub.pem")
    ossl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", d / "ca.key", "-out", d / "ca.pem", "-subj", "/CN=hashim test CA", "-days", "2")
    ossl("req", "-new", "-key", d / "ca.key", "-subj", f"/CN={label}", "-out", d / "req.csr")
    ossl("x509", "-req", "-in", d / "req.csr", "-CA", d / "ca.pem", "-CAkey", d / "ca.key",
         "-CAcreateserial", "-force_pubkey", pub, "-days", "2", "-outform", "DER",
         "-out", d / "cert.der")
    t.tool("--write-object", d / "cert.der", "--type", "cert", "--id", id_, "--label", label,
           login=True)
    return d / "cert.der"


@pytest.fixture(scope="module")
def java_classes(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("java-classes")
    run(["javac", "-d", out, HERE / "java" / "SignThreads.java"], dict(os.environ))
    return out


def sunpkcs11_config(t: Target, tmp: Path) -> Path:
    cfg = tmp / "sunpkcs11.cfg"
    cfg.write_text(f"name = hashim\nlibrary = {t.module}\nslotListIndex = 0\n")
    return cfg


@pytest.fixture
def java_token(target: Target, tmp_path) -> Target:
    """The target's token with an RSA and an EC key pair, each with a certificate."""
    gen_rsa(target)
    gen_ec(target)
    import_cert(target, "01", "rsa", tmp_path)
    import_cert(target, "02", "ec", tmp_path)
    return target


def test_java_keytool_list(java_token: Target, tmp_path):
    cfg = sunpkcs11_config(java_token, tmp_path)
    p = run(["keytool", "-list", "-storetype", "PKCS11", "-providerclass",
             "sun.security.pkcs11.SunPKCS11", "-providerarg", cfg,
             "-storepass", java_token.pin], java_token.env)
    out = p.stdout
    assert "Your keystore contains 2 entries" in out, out
    assert re.search(r"^rsa, PrivateKeyEntry", out, re.M), out
    assert re.search(r"^ec, PrivateKeyEntry", out, re.M), out
    # a wrong store password is refused with the token's answer (CKR_PIN_INCORRECT)
    bad = run(["keytool", "-list", "-v", "-storetype", "PKCS11", "-providerclass",
               "sun.security.pkcs11.SunPKCS11", "-providerarg", cfg, "-storepass", "9999"],
              java_token.env, check=False)
    assert bad.returncode != 0 and "CKR_PIN_INCORRECT" in bad.stdout + bad.stderr, bad.stdout + bad.stderr


def test_java_sign_threads(java_token: Target, java_classes: Path, tmp_path):
    # 8 threads x 100 iterations, each signing with both keys: several threads from a native host
    cfg = sunpkcs11_config(java_token, tmp_path)
    p = run(["java", "-cp", java_classes, "SignThreads", cfg, java_token.pin, "8", "100"],
            java_token.env, timeout=300)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT")]
    assert line == ["RESULT keys=ec:SHA256withECDSA,rsa:SHA256withRSA signed=1600 verified=1600 "
                    "p11verified=160 failed=0 errors=0"], p.stdout + p.stderr


# ---------------------------------------------------------------------------
# OpenSSL 3 + libengine-pkcs11-openssl (libp11)
# ---------------------------------------------------------------------------
def engine_env(t: Target) -> dict[str, str]:
    assert Path(ENGINE).is_file(), f"{ENGINE} missing (apt install libengine-pkcs11-openssl)"
    return dict(t.env, PKCS11_MODULE_PATH=t.module)


def test_openssl_engine(target: Target, tmp_path):
    gen_rsa(target)
    gen_ec(target)
    env = engine_env(target)
    digest = write(tmp_path / "h", hashlib.sha256(DATA).digest())
    msg = write(tmp_path / "msg", DATA)
    uri = f"pkcs11:token={target.label};object=%s;type=private"

    # ECDSA, PIN through -passin
    ossl("pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey", uri % "ec",
         "-passin", f"pass:{target.pin}", "-sign", "-in", digest, "-out", tmp_path / "ec.sig",
         env=env)
    ecpub = export_pub(target, "02", tmp_path / "ec.pem")
    ossl("pkeyutl", "-verify", "-pubin", "-inkey", ecpub, "-in", digest,
         "-sigfile", tmp_path / "ec.sig")

    # RSA PKCS#1 v1.5 and PSS, PIN in the URI
    rsapub = export_pub(target, "01", tmp_path / "rsa.pem")
    ruri = uri % "rsa" + f";pin-value={target.pin}"
    ossl("pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey", ruri, "-sign",
         "-pkeyopt", "digest:sha256", "-in", digest, "-out", tmp_path / "rsa.sig", env=env)
    ossl("pkeyutl", "-verify", "-pubin", "-inkey", rsapub, "-pkeyopt", "digest:sha256",
         "-in", digest, "-sigfile", tmp_path / "rsa.sig")
    ossl("dgst", "-sha256", "-engine", "pkcs11", "-keyform", "engine", "-sign", ruri,
         "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32",
         "-out", tmp_path / "pss.sig", msg, env=env)
    ossl("dgst", "-sha256", "-verify", rsapub, "-sigopt", "rsa_padding_mode:pss",
         "-sigopt", "rsa_pss_saltlen:32", "-signature", tmp_path / "pss.sig", msg)

    # RSA decryption through the engine
    plain = write(tmp_path / "plain", b"engine decrypts this")
    ossl("pkeyutl", "-encrypt", "-pubin", "-inkey", rsapub, "-in", plain, "-out", tmp_path / "ct")
    ossl("pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey", ruri, "-decrypt",
         "-in", tmp_path / "ct", "-out", tmp_path / "pt", env=env)
    assert (tmp_path / "pt").read_bytes() == plain.read_bytes()

    # a self-signed certificate made with the token's EC key verifies with its public key
    ossl("req", "-new", "-x509", "-engine", "pkcs11", "-keyform", "engine",
         "-key", uri % "ec" + f";pin-value={target.pin}", "-subj", "/CN=hashim engine test",
         "-days", "1", "-out", tmp_path / "self.pem", env=env)
    ossl("verify", "-CAfile", tmp_path / "self.pem", tmp_path / "self.pem")
    certpub = ossl("x509", "-in", tmp_path / "self.pem", "-noout", "-pubkey").stdout
    assert certpub == ecpub.read_text()

    # a wrong PIN fails
    bad = ossl("pkeyutl", "-engine", "pkcs11", "-keyform", "engine", "-inkey", uri % "ec",
               "-passin", "pass:0000", "-sign", "-in", digest, "-out", tmp_path / "bad.sig",
               env=env, check=False)
    assert bad.returncode != 0, bad.stdout + bad.stderr


# ---------------------------------------------------------------------------
# A native multi-threaded host (tests/c/threads.c)
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def threads_bin(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("c-host") / "threads"
    run(["gcc", "-O2", "-Wall", "-Werror", "-pthread", "-I/usr/include/p11-kit-1",
         HERE / "c" / "threads.c", "-o", out, "-ldl"], dict(os.environ))
    return out


@pytest.mark.parametrize("mode", ["os", "null", "mutex"])
def test_c_threads(target: Target, threads_bin: Path, mode: str):
    # os: CKF_OS_LOCKING_OK; null: C_Initialize(NULL) with the host serialising its own
    # calls (from 8 OS threads); mutex: pthread CreateMutex/... callbacks, no flags
    gen_ec(target)
    p = run([threads_bin, target.module, target.label, target.pin, "ec", mode, "8", "200"],
            target.env, check=False, timeout=300)
    line = [l for l in p.stdout.splitlines() if l.startswith("RESULT ")]
    assert p.returncode == 0 and line, p.stdout + p.stderr
    res = dict(kv.split("=", 1) for kv in line[0].split()[1:])
    assert (res["mode"], res["threads"], res["iterations"], res["failures"]) == (mode, "8", "200", "0"), line
    # 8 threads x 200 iterations x (random, digest init+call, sign init+call, verify init+call)
    # + every 25th iteration a corrupted-signature check, + open/close session each
    assert int(res["ops"]) >= 8 * (200 * 7 + 8 * 2 + 2), line
    if mode == "mutex":
        assert res["locks"] == res["unlocks"] and res["mutexes_created"] == res["destroyed"], line
