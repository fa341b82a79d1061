#!/usr/bin/env python3
"""Run billing on a machine with nothing but Python 3.11+ (standard library only).

    python3 bootstrap.py run  [args]   # the whole system locally: `billing dev`
    python3 bootstrap.py test [args]   # the test suite: `python -m pytest`
    python3 bootstrap.py bench [args]  # the benchmark: `billing bench`

Creates `.venv` in the repository when missing and installs the project into it
(`pip install -e '.[dev]'`) whenever pyproject.toml is newer than the last install.
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / "bin"  # POSIX layout: Linux and macOS
PYTHON = BIN / "python"
STAMP = VENV / ".installed-stamp"

COMMANDS = {
    "run": ("billing", "dev"),
    "test": ("python", "-m", "pytest"),
    "bench": ("billing", "bench"),
}


def log(message: str) -> None:
    print(f"bootstrap: {message}", file=sys.stderr, flush=True)


def usage() -> str:
    return (__doc__ or "").strip() + "\n"


def ensure_venv() -> None:
    if not PYTHON.exists():
        log("creating .venv")
        try:
            venv.EnvBuilder(with_pip=True).create(VENV)
        except Exception as exc:
            sys.exit(f"bootstrap: cannot create .venv ({exc}); on Debian/Ubuntu: apt install python3-venv")
    pyproject = ROOT / "pyproject.toml"
    stale = not STAMP.exists() or STAMP.stat().st_mtime < pyproject.stat().st_mtime
    if stale or not (BIN / "billing").exists():
        log("installing the project into .venv (pip install -e '.[dev]'), this takes a minute the first time")
        env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_ROOT_USER_ACTION="ignore")
        result = subprocess.run([str(PYTHON), "-m", "pip", "install", "-q", "-e", ".[dev]"], env=env)
        if result.returncode != 0:
            sys.exit(f"bootstrap: pip install failed (exit {result.returncode})")
        STAMP.touch()


def main(argv: list[str]) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 (run by whatever python3 the machine has)
        sys.exit(f"bootstrap: Python >= 3.11 is required, this is {sys.version.split()[0]}")
    if not argv:
        sys.stderr.write(usage())
        sys.exit(2)
    if argv[0] in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        sys.exit(0)
    command, args = argv[0], argv[1:]
    if command not in COMMANDS:
        sys.stderr.write(f"bootstrap: unknown command {command!r}\n\n{usage()}")
        sys.exit(2)
    os.chdir(ROOT)
    ensure_venv()
    program, *fixed = COMMANDS[command]
    executable = str(PYTHON if program == "python" else BIN / program)
    log(f"{command}: {' '.join([program, *fixed, *args])}")
    sys.stdout.flush()
    os.execv(executable, [executable, *fixed, *args])


if __name__ == "__main__":
    main(sys.argv[1:])
