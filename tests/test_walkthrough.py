"""docs/replace-member.md, run: the operator's walk-through of replacing a failed member.

The commands are read from the document itself (every ``$ `` line of its ``console``
blocks, here-documents included) and run in order in one shell state (bash; variables
exported by one command are seen by the next), from the source directory, with
``HA`` (the walk-through's directory) set to a temporary directory and ``hashim`` being
this source tree's CLI. After each command the key lines of its output are checked: the
document cannot drift from what the commands do, nor the commands from what the document
shows.

    python tests/test_walkthrough.py --update-doc

runs the same commands with ``HA=/tmp/ha-demo`` (removed first) and writes their real
output into the document under each command.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "replace-member.md"
DOC_HA = "/tmp/ha-demo"
SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"

NEEDS = ("softhsm2-util", "pkcs11-tool", "cc", "bash")


def missing() -> list[str]:
    out = [t for t in NEEDS if not shutil.which(t)]
    if not os.path.exists(SOFTHSM_LIB):
        out.append(SOFTHSM_LIB)
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        out.append("python-pkcs11")
    return out


# --------------------------------------------------------------------------- the document

@dataclass
class Command:
    text: str                   # as in the document (a here-document included)
    line: int                   # index of its "$ " line in the document
    end: int                    # index after its recorded output
    output: list[str] = field(default_factory=list)


def parse(lines: list[str]) -> list[Command]:
    cmds: list[Command] = []
    i, in_block = 0, False
    while i < len(lines):
        line = lines[i]
        if line.startswith("```"):
            if in_block and cmds and cmds[-1].end == -1:
                cmds[-1].end = i
            in_block = line.strip() == "```console" if not in_block else False
            i += 1
            continue
        if in_block and line.startswith("$ "):
            if cmds and cmds[-1].end == -1:
                cmds[-1].end = i
            text = line[2:]
            m = re.search(r"<<'?(\w+)'?\s*$", text)
            j = i + 1
            if m:                                   # a here-document: up to its end word
                while lines[j] != m.group(1):
                    j += 1
                text = "\n".join([text] + lines[i + 1:j + 1])
                j += 1
            cmds.append(Command(text, i, -1))
            i = j
            continue
        if in_block and cmds and cmds[-1].end == -1:
            cmds[-1].output.append(line)
        i += 1
    return cmds


# --------------------------------------------------------------------------- running them

class Shell:
    """One shell state across commands: each command runs in ``bash`` after sourcing
    the variables the previous ones exported; background jobs are remembered."""

    def __init__(self, ha: str, work: Path):
        self.ha = ha
        self.work = work
        bindir = work / "bin"
        bindir.mkdir(parents=True, exist_ok=True)
        wrapper = bindir / "hashim"
        wrapper.write_text(f"#!/bin/sh\nPYTHONPATH={REPO} exec {sys.executable} -m shim.cli "
                           '"$@"\n')
        wrapper.chmod(0o755)
        self.state = work / "state.sh"
        self.bg = work / "background.pids"
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("HASHIM_", "SOFTHSM2_", "EMUHSM_", "PKCS11_"))
               and k not in ("HA", "PYTHONPATH")}
        env["PATH"] = f"{bindir}{os.pathsep}{os.path.dirname(sys.executable)}{os.pathsep}" \
            + env.get("PATH", "")
        self.env = env
        self.state.write_text("")

    def run(self, text: str, timeout: float = 180) -> subprocess.CompletedProcess:
        if text.startswith("export HA="):
            text = f"export HA={self.ha}"
        script = (f"source {self.state}\ncd {REPO}\n{text}\nrc=$?\n"
                  f'[ -n "$!" ] && echo $! >> {self.bg}\n'
                  f"export -p | grep -v -E ' (PWD|OLDPWD|SHLVL|_)=' > {self.state}\n"
                  "exit $rc\n")
        return subprocess.run(["bash", "-c", script], env=self.env, cwd=str(REPO),
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=timeout)

    def cleanup(self) -> None:
        """Stop the background application (by the pids the shell started)."""
        stop = Path(self.ha) / "sign-loop.stop"
        try:
            pids = [int(x) for x in self.bg.read_text().split()]
        except (OSError, ValueError):
            pids = []
        alive = [p for p in pids if _alive(p)]
        if not alive:
            return
        stop.parent.mkdir(parents=True, exist_ok=True)
        stop.touch()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(p) for p in alive):
            time.sleep(0.1)
        for p in alive:
            if _alive(p):
                os.kill(p, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:                                     # a zombie of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


# --------------------------------------------------------------------------- what to check
# (prefix of the command, function(output, ha, seen) -> None); seen keeps values across
# steps. Every command must exit 0.

class KnownEngineBug(AssertionError):
    """The application saw only CKR_OPERATION_ACTIVE errors: the engine bug below."""


STUCK_SESSION_BUG = (
    "engine bug: a session whose last operation ended in the C fast path on a member that "
    "then fails (or is removed) answers CKR_OPERATION_ACTIVE to every later C_SignInit "
    "(native/fastpath.c hashim_member_set_up() turns the ENDED route into NONE; "
    "VSession.sync() in shim/engine/sessions.py ends the engine's record only on ENDED); "
    "see the xfail in tests/test_admin.py")


def _signatures(out: str) -> tuple[int, int]:
    m = re.search(r"signatures,? (\d+) errors,? (\d+)", out) or \
        re.search(r"(\d+) signatures, (\d+) errors", out)
    assert m, out
    n, errors = int(m.group(1)), int(m.group(2))
    if errors and re.search(r"\{'OperationActive': \d+\}", out):
        raise KnownEngineBug(f"{STUCK_SESSION_BUG}:\n{out}")
    return n, errors


def _status_line(out: str, name: str) -> str:
    for line in out.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "*"):
            return line
    raise AssertionError(f"no line for {name}:\n{out}")


def check_demo(out, ha, seen):
    assert "demo ok: all 8 steps worked" in out, out
    assert "-> the key pair was replicated to every member" in out


def check_remove_c(out, ha, seen):
    assert out == (f"removed member 'hsm-c' from group 'demo-ha' in {ha}/hashim.toml; "
                   "members: hsm-a, hsm-b\n"), out


def check_add_c(out, ha, seen):
    assert out == (f"added member 'hsm-c' to group 'demo-ha' in {ha}/hashim.toml "
                   "(position 3 of 3)\n"), out


def check_first_tail(out, ha, seen):
    n, errors = _signatures(out)
    assert n > 0 and errors == 0, out
    seen["signatures"] = n


def check_show(out, ha, seen):
    assert "group:             'demo-ha'" in out and "primary candidate: hsm-a" in out, out
    assert f"3. hsm-c  token_label 'hsm-c'  {ha}/libemuhsm.so" in out, out
    assert f"env EMUHSM_CONTROL={ha}/hsm-c/fault.conf" in out


def check_status(out, ha, seen):
    phase = seen.setdefault("status", 0)
    seen["status"] += 1
    assert "group 'demo-ha'   primary: hsm-a   1 process" in out, out
    if phase == 0:                        # healthy
        for name in ("hsm-a", "hsm-b", "hsm-c"):
            assert " online " in _status_line(out, name), out
    elif phase == 1:                      # hsm-c failed
        line = _status_line(out, "hsm-c")
        assert "token not present" in line or "device error" in line, out
        assert " online " in _status_line(out, "hsm-b"), out
    else:                                 # replaced
        assert " online " in _status_line(out, "hsm-d"), out
        assert "hsm-c" not in out, out


def check_log_c(out, ha, seen):
    assert "member 'hsm-c' failed: " in out and "CKR_DEVICE_ERROR" in out, out
    assert "member 'hsm-c': recovery attempt 1 of 3" in out, out


def check_tail(out, ha, seen):
    n, errors = _signatures(out)
    assert errors == 0 and n > seen["signatures"], (out, seen)
    seen["signatures"] = n


def check_init_token(out, ha, seen):
    assert "The token has been initialized" in out, out


def check_domain(out, ha, seen):
    assert re.search(r"^hsm-d: domain key copied from hsm-a \(check value [0-9a-f]{6}\)$",
                     out, re.M), out
    assert "next: hashim group add-member hsm-d --module /usr/lib/softhsm/libsofthsm2.so" in out


def check_add_d(out, ha, seen):
    assert out == (f"added member 'hsm-d' to group 'demo-ha' in {ha}/hashim.toml "
                   "(position 3 of 3)\n"), out


def check_log_d(out, ha, seen):
    assert "sync: copied private key 'demo-ec' to member 'hsm-d'" in out, out
    assert "sync: copied public key 'demo-ec' to member 'hsm-d'" in out, out
    assert "member 'hsm-d' joined the group" in out, out


def check_objects(out, ha, seen):
    assert "Private Key Object; EC" in out and "Public Key Object; EC" in out, out
    assert out.count("label:      demo-ec") == 2, out
    assert "label:      hashim-domain" in out, out


def check_sync(out, ha, seen):
    assert out == ("synchronised group 'demo-ha': 3 of 3 members (hsm-a, hsm-b, hsm-d), "
                   "0 copied, 0 destroyed, 0 not copied; every member already held every "
                   "object\n"), out


def check_stop(out, ha, seen):
    assert re.fullmatch(r"stopped: \d+ signatures, \d+ errors.*\n", out), out
    n, errors = _signatures(out)
    assert errors == 0 and n > seen["signatures"], out


CHECKS = [
    ("hashim demo ", check_demo),
    ("hashim group remove-member hsm-c", check_remove_c),
    ("HASHIM_PIN=1234 hashim group add-member hsm-c", check_add_c),
    ("sleep 2; tail -n 1", check_first_tail),
    ("hashim group show", check_show),
    ("hashim status", check_status),
    ("sleep 3; hashim status", check_status),
    ("hashim log --member hsm-c -n 6", check_log_c),
    ("tail -n 1 $HA/sign-loop.log", check_tail),
    ("SOFTHSM2_CONF=$HA/hsm-d/softhsm2.conf softhsm2-util", check_init_token),
    ("HASHIM_SO_PIN=5678 hashim domain add-member hsm-d", check_domain),
    ("HASHIM_PIN=1234 hashim group add-member hsm-d", check_add_d),
    ("sleep 3; hashim log --member hsm-d", check_log_d),
    ("SOFTHSM2_CONF=$HA/hsm-d/softhsm2.conf pkcs11-tool", check_objects),
    ("HASHIM_PIN=1234 hashim group synchronize --now", check_sync),
    ("python3 $HA/sign-loop.py stop", check_stop),
]


def check_for(text: str):
    for prefix, fn in CHECKS:
        if text == prefix or text.startswith(prefix + " ") or (
                prefix.endswith(" ") and text.startswith(prefix)):
            return fn
    return None


def run_walkthrough(ha: str, work: Path, check: bool = True) -> list[tuple[Command, str]]:
    cmds = parse(DOC.read_text().split("\n"))
    sh = Shell(ha, work)
    seen: dict = {}
    done = []
    try:
        for c in cmds:
            r = sh.run(c.text)
            out = r.stdout
            assert r.returncode == 0, f"$ {c.text}\nexited {r.returncode}:\n{out}"
            if check:
                fn = check_for(c.text)
                if fn is not None:
                    fn(out, ha, seen)
            done.append((c, out))
    finally:
        sh.cleanup()
    return done


# --------------------------------------------------------------------------- the test

@pytest.mark.skipif(bool(missing()), reason=f"needs {', '.join(missing())}")
def test_walkthrough_commands_and_their_output(tmp_path):
    cmds = parse(DOC.read_text().split("\n"))
    texts = [c.text.split("\n")[0] for c in cmds]
    # every check has its command in the document, in the operator's order
    for prefix, _ in CHECKS:
        assert any(check_for(t) is not None and t.startswith(prefix.strip()) for t in texts), \
            prefix
    assert texts[0] == f"export HA={DOC_HA}"
    ha = str(tmp_path / "ha")
    try:
        done = run_walkthrough(ha, tmp_path / "work")
    except KnownEngineBug as e:
        pytest.xfail(str(e)[:2000])
    assert len(done) == len(cmds)
    # the document shows output with the same key lines (what varies -- times, pids,
    # counts -- aside): the checks pass on what it recorded too
    seen: dict = {}
    for c in cmds:
        fn = check_for(c.text)
        if fn is not None:
            assert c.output, f"no output recorded in the document under: $ {c.text}"
            fn("\n".join(c.output) + "\n", DOC_HA, seen)


# --------------------------------------------------------------------------- --update-doc

def update_doc() -> int:
    if missing():
        print("needs: " + ", ".join(missing()), file=sys.stderr)
        return 1
    for attempt in range(3):
        shutil.rmtree(DOC_HA, ignore_errors=True)
        with tempfile.TemporaryDirectory(prefix="hashim-walkthrough-") as work:
            try:
                done = run_walkthrough(DOC_HA, Path(work))
                break
            except KnownEngineBug as e:
                print(f"run {attempt + 1}: {e}", file=sys.stderr)
    else:
        return 1
    lines = DOC.read_text().split("\n")
    for c, out in reversed(done):
        body = out.rstrip("\n").split("\n") if out.strip() else []
        end = c.end if c.end != -1 else len(lines)
        first_after = c.line + 1 + c.text.count("\n")
        lines[first_after:end] = body
    DOC.write_text("\n".join(lines))
    print(f"rewrote {DOC} with the output of {len(done)} commands (HA={DOC_HA})")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--update-doc"]:
        sys.exit(update_doc())
    print(__doc__)
    sys.exit(2)
