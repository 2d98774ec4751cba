"""Real SoftHSM2 tokens for tests and benchmarks: one token directory, one
softhsm2.conf and (optionally) one private copy of libsofthsm2.so each.

Shared by tests/ and bench/ (import as ``tests.softhsm``)."""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

SOFTHSM_LIB = "/usr/lib/softhsm/libsofthsm2.so"
PIN = "1234"
SO_PIN = "5678"


@dataclass
class Token:
    label: str
    dir: Path
    conf: Path
    lib: str
    pin: str = PIN
    so_pin: str = SO_PIN
    serial: str = ""

    @property
    def env(self) -> dict[str, str]:
        return {"SOFTHSM2_CONF": str(self.conf)}


def make_token(base: Path, label: str, *, private_lib: bool = True,
               pin: str = PIN, so_pin: str = SO_PIN) -> Token:
    """Create and initialise a fresh SoftHSM2 token under ``base/label``."""
    d = Path(base) / label
    tokdir = d / "tokens"
    tokdir.mkdir(parents=True, exist_ok=True)
    conf = d / "softhsm2.conf"
    conf.write_text(
        f"directories.tokendir = {tokdir}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n")
    lib = SOFTHSM_LIB
    if private_lib:
        lib = str(d / "libsofthsm2.so")
        shutil.copyfile(SOFTHSM_LIB, lib)
    env = dict(os.environ, SOFTHSM2_CONF=str(conf))
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", label,
                    "--pin", pin, "--so-pin", so_pin],
                   env=env, check=True, capture_output=True)
    out = subprocess.run(["softhsm2-util", "--show-slots"], env=env, check=True,
                         capture_output=True, text=True).stdout
    serial = ""
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("Serial number:") and not serial:
            serial = line.split(":", 1)[1].strip()
    return Token(label=label, dir=d, conf=conf, lib=lib, pin=pin, so_pin=so_pin,
                 serial=serial)


def toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config(path: Path, tokens: list[Token], *, label: str = "hashim-test",
                 **group) -> Path:
    """Write a hashim.toml with one [[member]] per token (in order)."""
    lines = ["[group]", f"label = {toml_str(label)}"]
    for k, v in group.items():
        if isinstance(v, bool):
            v = "true" if v else "false"
        elif isinstance(v, str):
            v = toml_str(v)
        lines.append(f"{k} = {v}")
    for t in tokens:
        lines += ["", "[[member]]", f"name = {toml_str(t.label)}",
                  f"module = {toml_str(t.lib)}",
                  f"token_label = {toml_str(t.label)}",
                  f"private_instance = {'true' if t.lib == SOFTHSM_LIB else 'false'}",
                  f"env = {{ SOFTHSM2_CONF = {toml_str(str(t.conf))} }}"]
    Path(path).write_text("\n".join(lines) + "\n")
    return Path(path)
