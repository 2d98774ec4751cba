"""``hashim demo``: three SoftHSM2 tokens behind one HA slot, used by real clients.

On a machine with SoftHSM2 (``softhsm2-util``), OpenSC's ``pkcs11-tool`` and python-pkcs11,
with no arguments and in a temporary directory (or ``--dir DIR``; removed at the end unless
``--keep``), it:

1. creates three SoftHSM2 tokens hsm-a, hsm-b, hsm-c with ``softhsm2-util``, each with its own
   ``softhsm2.conf`` (user PIN 1234, SO PIN 5678: demo tokens);
2. writes a ``hashim.toml`` (group "demo-ha", the three members, each ``private_instance``
   so that the module loads its own copy of libsofthsm2 per member);
3. creates the group's domain key on the three tokens (what ``hashim domain init`` does);
4. lists the slots through the HA module with ``pkcs11-tool -L`` (one HA slot);
5. generates an EC P-256 key pair through the HA slot (``pkcs11-tool --keypairgen``);
6. signs a SHA-256 digest and verifies the signature through the HA slot (pkcs11-tool);
7. lists each member token *directly* (``pkcs11-tool -O`` on the member's own module and
   ``SOFTHSM2_CONF``, bypassing hashim) and says on which members the key is — what it
   observes, not what it hopes;
8. signs and verifies in 4 threads through the HA slot with python-pkcs11.

Every step prints what it ran and what happened, in plain words.  Exit status 0 when every
step worked, 1 when one failed (it stops there), 2 on a usage error.  ``--config`` and
``$HASHIM_CONF`` are ignored: the demo uses only its own files.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

GROUP = "demo-ha"
MEMBERS = ("hsm-a", "hsm-b", "hsm-c")
PIN = "1234"
SO_PIN = "5678"
KEY_LABEL = "demo-ec"
KEY_ID = "de01"
THREADS = 4
PER_THREAD = 25
STEP_TIMEOUT = 30.0

SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/lib/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
# variables that select a module, token or config: a client starts without them
CLEAN_VARS = ("SOFTHSM2_CONF", "HASHIM_CONF", "HASHIM_PIN", "HASHIM_SO_PIN",
              "PKCS11_MODULE_PATH", "P11_KIT_SERVER_ADDRESS")

THREADS_SNIPPET = textwrap.dedent("""
    import hashlib, json, sys, threading, time
    import pkcs11
    from pkcs11 import Mechanism, ObjectClass
    module, label, pin, key_label, n_threads, per = sys.argv[1:7]
    n_threads, per = int(n_threads), int(per)
    token = pkcs11.lib(module).get_token(token_label=label)
    done, errors = [], []

    def work(i):
        try:
            with token.open() as s:      # logged in: the login session below is open
                priv = s.get_key(object_class=ObjectClass.PRIVATE_KEY, label=key_label)
                pub = s.get_key(object_class=ObjectClass.PUBLIC_KEY, label=key_label)
                ok = 0
                for j in range(per):
                    d = hashlib.sha256(f"thread {i} message {j}".encode()).digest()
                    sig = priv.sign(d, mechanism=Mechanism.ECDSA)
                    ok += bool(pub.verify(d, sig, mechanism=Mechanism.ECDSA))
                done.append(ok)
        except Exception as e:
            errors.append(f"thread {i}: {type(e).__name__}: {e}")

    login = token.open(user_pin=pin)
    t0 = time.monotonic()
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n_threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - t0
    login.close()
    print(json.dumps({"threads": len(done), "verified": sum(done), "errors": errors,
                      "seconds": seconds}))
""")


class StepFailed(Exception):
    pass


class Usage(Exception):
    pass


def add_arguments(name: str, parser: argparse.ArgumentParser) -> None:
    if name != "demo":
        return
    parser.add_argument("--dir", metavar="DIR",
                        help="work in DIR (new or empty) instead of a temporary directory")
    parser.add_argument("--keep", action="store_true",
                        help="keep the directory (tokens, config) at the end")
    parser.add_argument("--softhsm", metavar="PATH",
                        help="libsofthsm2.so to use (default: the first found in the usual "
                             "places)")


# --------------------------------------------------------------------------- output

def say(text: str = "", indent: int = 0) -> None:
    pad = " " * indent
    for line in (text.splitlines() or [""]):
        print(pad + line)
    sys.stdout.flush()


def show_cmd(cmd: list[str], env_extra: dict[str, str] | None = None) -> None:
    prefix = " ".join(f"{k}={shlex.quote(v)}" for k, v in (env_extra or {}).items())
    say("$ " + (prefix + " " if prefix else "") + shlex.join(cmd), 6)


def client_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_VARS}
    env.update(extra)
    return env


def run(cmd: list[str], env_extra: dict[str, str] | None = None, *, show: bool = True,
        input: bytes | None = None) -> subprocess.CompletedProcess:
    if show:
        show_cmd(cmd, env_extra)
    try:
        r = subprocess.run(cmd, env=client_env(**(env_extra or {})), capture_output=True,
                           input=input, timeout=STEP_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise StepFailed(f"{os.path.basename(cmd[0])} did not finish within "
                         f"{STEP_TIMEOUT:g} s") from None
    except OSError as e:
        raise StepFailed(f"cannot run {cmd[0]}: {e.strerror or e}") from None
    r.stdout_text = r.stdout.decode("utf-8", "replace")      # type: ignore[attr-defined]
    r.stderr_text = r.stderr.decode("utf-8", "replace")      # type: ignore[attr-defined]
    return r


def fail_with_output(r, what: str) -> None:
    tail = (r.stdout_text + r.stderr_text).strip().splitlines()[-12:]
    raise StepFailed(f"{what} (exit status {r.returncode})"
                     + ("\n" + "\n".join(tail) if tail else ""))


NOISE = ("Using slot ", "Using signature algorithm", "Key pair generated")


def hashim_said(r) -> None:
    """Show what the HA module logged on stderr (warnings), beyond the client's noise."""
    lines = [l for l in r.stderr_text.splitlines() if l.strip() and not l.startswith(NOISE)]
    for l in lines[:8]:
        say("stderr: " + l, 8)


# --------------------------------------------------------------------------- the demo

class Demo:
    def __init__(self, base: str, softhsm: str, module: str):
        self.base = base
        self.softhsm = softhsm
        self.module = module
        self.conf = os.path.join(base, "hashim.toml")
        self.ha_env = {"HASHIM_CONF": self.conf}

    def member_dir(self, name: str) -> str:
        return os.path.join(self.base, name)

    def member_conf(self, name: str) -> str:
        return os.path.join(self.member_dir(name), "softhsm2.conf")

    def tool(self) -> list[str]:
        return [shutil.which("pkcs11-tool") or "pkcs11-tool", "--module", self.module]

    # 1
    def tokens(self) -> None:
        util = shutil.which("softhsm2-util")
        for name in MEMBERS:
            d = self.member_dir(name)
            tokdir = os.path.join(d, "tokens")
            os.makedirs(tokdir, mode=0o700)
            with open(self.member_conf(name), "w") as f:
                f.write(f"directories.tokendir = {tokdir}\n"
                        "objectstore.backend = file\n"
                        "log.level = ERROR\n"
                        "slots.removable = false\n")
            cmd = [util, "--init-token", "--free", "--label", name,
                   "--pin", PIN, "--so-pin", SO_PIN]
            r = run(cmd, {"SOFTHSM2_CONF": self.member_conf(name)},
                    show=(name == MEMBERS[0]))
            if r.returncode != 0:
                fail_with_output(r, f"softhsm2-util could not create token {name}")
        say(f"(likewise for {', '.join(MEMBERS[1:])})", 6)
        say(f"created tokens {', '.join(MEMBERS)} (one directory and softhsm2.conf each, "
            f"under {self.base}; user PIN {PIN}, SO PIN {SO_PIN})", 6)

    # 2
    def config(self) -> None:
        from . import config as cfg

        def q(s: str) -> str:
            return json.dumps(s)
        lines = ["# written by 'hashim demo'", "[group]", f"label = {q(GROUP)}",
                 f"state_dir = {q(os.path.join(self.base, 'state'))}",
                 f"log = {q(os.path.join(self.base, 'ha.log'))}"]
        for name in MEMBERS:
            lines += ["", "[[member]]", f"name = {q(name)}", f"module = {q(self.softhsm)}",
                      f"token_label = {q(name)}", "private_instance = true",
                      f"env = {{ SOFTHSM2_CONF = {q(self.member_conf(name))} }}"]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        c = cfg.load(self.conf, check_files=True)
        say(f"wrote {self.conf}: group '{c.group.label}', members "
            f"{', '.join(c.member_names)} (each a private instance of {self.softhsm})", 6)

    # 3
    def domain(self) -> None:
        from . import config as cfg
        from . import domain
        c = cfg.load(self.conf, check_files=True)
        pin = bytearray(SO_PIN.encode())
        say("(what 'hashim domain init' does, with the SO PIN the demo chose)", 6)
        try:
            kcvs = domain.init_domain(c, pin, os.path.join(self.base, "cache"),
                                      out=lambda l: say(l, 6))
        except (domain._Failed, domain._Usage) as e:
            raise StepFailed(str(e)) from None
        finally:
            domain.u.wipe(pin)
        if len(set(kcvs.values())) != 1:
            raise StepFailed("the members report different check values")

    # 4
    def list_slots(self) -> None:
        r = run(self.tool() + ["-L"], self.ha_env)
        if r.returncode != 0:
            fail_with_output(r, "pkcs11-tool -L failed")
        slots = [l for l in r.stdout_text.splitlines() if l.startswith("Slot ")]
        labels = [l.split(":", 1)[1].strip() for l in r.stdout_text.splitlines()
                  if l.strip().startswith("token label")]
        hashim_said(r)
        say(f"pkcs11-tool sees {len(slots)} slot(s): "
            + "; ".join(s.split(":", 1)[0] + " token '" + (labels[i] if i < len(labels)
                                                             else "?") + "'"
                        for i, s in enumerate(slots)), 6)
        if len(slots) != 1 or labels[:1] != [GROUP]:
            raise StepFailed(f"expected one HA slot with token '{GROUP}'")

    # 5
    def keygen(self) -> None:
        r = run(self.tool() + ["--token-label", GROUP, "--login", "--pin", PIN,
                               "--keypairgen", "--key-type", "EC:prime256v1",
                               "--id", KEY_ID, "--label", KEY_LABEL], self.ha_env)
        hashim_said(r)
        if r.returncode != 0:
            fail_with_output(r, "key pair generation through the HA slot failed")
        say(f"generated EC P-256 key pair '{KEY_LABEL}' (id {KEY_ID}) through the HA slot", 6)

    # 6
    def sign_verify(self) -> None:
        data = b"hashim demo: signed through the HA slot\n"
        digest = os.path.join(self.base, "digest.bin")
        sig = os.path.join(self.base, "signature.bin")
        with open(digest, "wb") as f:
            f.write(hashlib.sha256(data).digest())
        say("(SoftHSM2 has no CKM_ECDSA_SHA256: the SHA-256 digest is signed with ECDSA)", 6)
        r = run(self.tool() + ["--token-label", GROUP, "--login", "--pin", PIN, "--sign",
                               "-m", "ECDSA", "--id", KEY_ID, "-i", digest, "-o", sig],
                self.ha_env)
        hashim_said(r)
        if r.returncode != 0 or not os.path.exists(sig):
            fail_with_output(r, "signing through the HA slot failed")
        n = os.path.getsize(sig)
        r = run(self.tool() + ["--token-label", GROUP, "--verify", "-m", "ECDSA", "--id",
                               KEY_ID, "-i", digest, "--signature-file", sig], self.ha_env)
        hashim_said(r)
        if r.returncode != 0 or "Signature is valid" not in r.stdout_text:
            fail_with_output(r, "the signature did not verify through the HA slot")
        say(f"signed ({n}-byte ECDSA signature) and verified: Signature is valid", 6)

    # 7
    def per_member(self) -> dict[str, str]:
        seen: dict[str, str] = {}
        tool = shutil.which("pkcs11-tool") or "pkcs11-tool"
        for name in MEMBERS:
            r = run([tool, "--module", self.softhsm, "--token-label", name, "--login",
                     "--pin", PIN, "-O"], {"SOFTHSM2_CONF": self.member_conf(name)},
                    show=(name == MEMBERS[0]))
            if r.returncode != 0:
                fail_with_output(r, f"listing the objects of {name} failed")
            if name == MEMBERS[0]:
                say(f"(likewise for {', '.join(MEMBERS[1:])}, each with its own "
                    "SOFTHSM2_CONF)", 6)
            kinds = objects_with_label(r.stdout_text, KEY_LABEL)
            has_priv, has_pub = "Private Key" in kinds, "Public Key" in kinds
            seen[name] = ("yes" if has_priv and has_pub else
                          "private key only" if has_priv else
                          "no (public key only)" if has_pub else "no")
            domain_key = "Secret Key" in objects_with_label(r.stdout_text, "hashim-domain")
            say(f"{name}: private key {'yes' if has_priv else 'no'}, public key "
                f"{'yes' if has_pub else 'no'}; domain key {'yes' if domain_key else 'no'}", 6)
        say("key on " + ", ".join(f"{n}: {v}" for n, v in seen.items()), 6)
        on = [n for n, v in seen.items() if v == "yes"]
        if not on:
            raise StepFailed(f"the key '{KEY_LABEL}' is on no member token")
        if len(on) < len(MEMBERS):
            say(f"-> the key pair is on {len(on)} of {len(MEMBERS)} members: the HA slot "
                "did not replicate it to the others", 6)
        else:
            say("-> the key pair was replicated to every member: any of them can serve it",
                6)
        return seen

    # 8
    def threads(self) -> None:
        try:
            import pkcs11  # noqa: F401
        except ImportError:
            raise StepFailed("python-pkcs11 is not installed for "
                             f"{sys.executable} (pip install python-pkcs11)") from None
        cmd = [sys.executable, "-c", THREADS_SNIPPET, self.module, GROUP, PIN, KEY_LABEL,
               str(THREADS), str(PER_THREAD)]
        show_cmd([sys.executable, "-c", "<python-pkcs11: 4 threads, each its own session, "
                  f"{PER_THREAD} ECDSA sign+verify>"], self.ha_env)
        r = run(cmd, self.ha_env, show=False)
        hashim_said(r)
        try:
            res = json.loads(r.stdout_text.strip().splitlines()[-1])
        except (ValueError, IndexError):
            fail_with_output(r, "the python-pkcs11 run gave no result")
        if r.returncode != 0 or res["errors"]:
            raise StepFailed("python-pkcs11: " + "; ".join(res["errors"][:4]))
        total = THREADS * PER_THREAD
        say(f"python-pkcs11: {res['threads']} threads signed {total} digests through the HA "
            f"slot in {res['seconds']:.2f} s; {res['verified']} of {total} signatures "
            "verify", 6)
        if res["threads"] != THREADS or res["verified"] != total:
            raise StepFailed(f"only {res['verified']} of {total} signatures verified")


def objects_with_label(listing: str, label: str) -> set[str]:
    """Kinds ("Private Key", "Public Key", "Secret Key", ...) of the objects in a
    ``pkcs11-tool -O`` listing that carry ``label``."""
    kinds: set[str] = set()
    current = None
    for line in listing.splitlines():
        if line and not line.startswith(" ") and " Object" in line:
            current = line.split(" Object", 1)[0].strip()
        elif current and line.strip().startswith("label:"):
            if line.split(":", 1)[1].strip() == label:
                kinds.add(current)
    return kinds


def find_softhsm(explicit: str | None) -> str:
    if explicit:
        if not os.path.isfile(explicit):
            raise Usage(f"--softhsm {explicit}: no such file; give the path of "
                        "libsofthsm2.so")
        return os.path.abspath(explicit)
    for c in SOFTHSM_CANDIDATES:
        if os.path.isfile(c):
            return c
    raise StepFailed("libsofthsm2.so not found: install SoftHSM2 (Debian: apt install "
                     "softhsm2) or give --softhsm PATH")


def _prepare_dir(d: str | None) -> tuple[str, bool]:
    """(directory, created by us)."""
    if d is None:
        return tempfile.mkdtemp(prefix="hashim-demo-"), True
    d = os.path.abspath(d)
    if os.path.exists(d):
        if not os.path.isdir(d):
            raise Usage(f"--dir {d}: not a directory")
        if os.listdir(d):
            raise Usage(f"--dir {d}: not empty; give a new or empty directory")
        return d, False
    os.makedirs(d, mode=0o700)
    return d, True


def main(args) -> int:
    t_start = time.monotonic()
    try:
        return _main(args, t_start)
    except Usage as e:
        sys.stderr.write(f"hashim: {' '.join(str(e).split())}\n")
        return 2


def _main(args, t_start: float) -> int:
    import shim
    missing = [t for t in ("softhsm2-util", "pkcs11-tool") if not shutil.which(t)]
    if missing:
        sys.stderr.write(f"hashim: demo: {', '.join(missing)} not found: install SoftHSM2 "
                         "and OpenSC (Debian: apt install softhsm2 opensc)\n")
        return 1
    try:
        softhsm = find_softhsm(getattr(args, "softhsm", None))
    except StepFailed as e:
        sys.stderr.write(f"hashim: demo: {e}\n")
        return 1
    module = shim.module_path()
    if not os.path.isfile(module):
        sys.stderr.write(f"hashim: demo: the module {module} is not built\n")
        return 1
    base, created = _prepare_dir(getattr(args, "dir", None))
    keep = bool(getattr(args, "keep", False))
    demo = Demo(base, softhsm, module)
    steps = [
        ("Three SoftHSM2 tokens", demo.tokens),
        ("The group's configuration", demo.config),
        ("The domain key on every member", demo.domain),
        ("Slots seen through the HA module (pkcs11-tool -L)", demo.list_slots),
        ("An EC P-256 key pair generated through the HA slot", demo.keygen),
        ("Sign and verify through the HA slot (pkcs11-tool)", demo.sign_verify),
        ("Where the key is: each member token listed directly, bypassing hashim",
         demo.per_member),
        (f"python-pkcs11: {THREADS} threads signing through the HA slot", demo.threads),
    ]
    say("hashim demo: three SoftHSM2 tokens behind one HA slot, used by real clients")
    say(f"  module:    {module}")
    say(f"  directory: {base}" + ("" if keep else " (removed at the end; --keep keeps it)"))
    failed = None
    try:
        for i, (title, fn) in enumerate(steps, 1):
            say()
            say(f"[{i}/{len(steps)}] {title}")
            t0 = time.monotonic()
            try:
                fn()
            except StepFailed as e:
                first, *rest = str(e).splitlines() or [""]
                say(f"FAILED: {first}", 6)
                for line in rest:
                    say("| " + line, 8)
                failed = (i, title, first)
                break
            except Exception as e:  # noqa: BLE001 - a demo step must report, not crash
                if os.environ.get("HASHIM_DEBUG"):
                    raise
                say(f"FAILED: {type(e).__name__}: {e}", 6)
                failed = (i, title, f"{type(e).__name__}: {e}")
                break
            say(f"ok ({time.monotonic() - t0:.2f} s)", 6)
    finally:
        say()
        if keep:
            say(f"kept {base}; try: HASHIM_CONF={shlex.quote(demo.conf)} pkcs11-tool "
                f"--module {shlex.quote(module)} -L")
        else:
            _cleanup(base, created)
    total = time.monotonic() - t_start
    if failed:
        i, title, why = failed
        say(f"demo FAILED at step {i} ({title}) after {total:.1f} s")
        sys.stderr.write(f"hashim: demo failed at step {i} ({title}): {why}\n")
        return 1
    say(f"demo ok: all {len(steps)} steps worked ({total:.1f} s)")
    return 0


def _cleanup(base: str, created: bool) -> None:
    if created:
        shutil.rmtree(base, ignore_errors=True)
        return
    for name in os.listdir(base):
        p = os.path.join(base, name)
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            try:
                os.unlink(p)
            except OSError:
                pass
