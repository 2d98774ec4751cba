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

from tests.clients import OPENSSL, Target, result, run, run_py

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
