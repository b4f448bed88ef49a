#!/usr/bin/env python3
"""Write the images' lock files: every package the image installs, exactly pinned, with the
sha256 of each wheel, resolved by `pip lock` from pyproject.toml's dependencies and its [system]
extra (the one list), for this machine's platform (run it on the architecture you build for).

    python scripts/lock-images.py            deploy/docker/requirements-cpu-amd64.lock
    python scripts/lock-images.py --cuda     deploy/docker/requirements-cuda-amd64.lock (torch from
                                             the cu130 index: CI resolves it; nobody installs it there)

The Dockerfile installs the lock with --require-hashes --no-deps, then the package itself with
--no-deps: a build resolves nothing afresh. tests/deploy/test_images.py checks the lock against
pyproject.toml; scripts/check-image-lock.sh installs it into a clean venv.
"""

from __future__ import annotations

import argparse
import platform
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
ARCHITECTURES = {"x86_64": "amd64", "aarch64": "arm64", "arm64": "arm64"}
INDEXES = {"cpu": "https://download.pytorch.org/whl/cpu", "cuda": "https://download.pytorch.org/whl/cu130"}


def requirements() -> list[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [*project["dependencies"], *project["optional-dependencies"]["system"]]


def lock_lines(pylock: dict) -> list[str]:
    """pylock.toml's packages as hash-pinned requirement lines, sorted by name."""
    lines = []
    for package in sorted(pylock["packages"], key=lambda p: p["name"].lower()):
        hashes = sorted({wheel["hashes"]["sha256"] for wheel in package.get("wheels", [])})
        if "sdist" in package:
            hashes.append(package["sdist"]["hashes"]["sha256"])
        if not hashes:
            sys.exit(f"lock-images: {package['name']} has no hashed distribution")
        lines.append(f"{package['name']}=={package['version']} \\")
        lines += [f"    --hash=sha256:{digest} \\" for digest in hashes[:-1]]
        lines.append(f"    --hash=sha256:{hashes[-1]}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cuda", action="store_true", help="lock the CUDA image (torch from the cu130 index)")
    parser.add_argument(
        "--torch-index", default=None, help="where torch's wheels are (default: download.pytorch.org's cpu or cu130 "
        "index; '' for none: a machine with the wheel in pip's find-links)"
    )
    args = parser.parse_args()
    flavor = "cuda" if args.cuda else "cpu"
    index = INDEXES[flavor] if args.torch_index is None else args.torch_index
    arch = ARCHITECTURES[platform.machine()]
    out = ROOT / "deploy" / "docker" / f"requirements-{flavor}-{arch}.lock"
    with tempfile.TemporaryDirectory() as scratch:
        wanted = Path(scratch) / "requirements.in"
        wanted.write_text("\n".join(requirements()) + "\n")
        pylock = Path(scratch) / "pylock.toml"
        subprocess.run(
            [sys.executable, "-m", "pip", "lock", "--quiet", "--only-binary", ":all:",
             *(["--extra-index-url", index] if index else []), "-r", str(wanted), "-o", str(pylock)],
            check=True,
        )  # fmt: skip
        locked = tomllib.loads(pylock.read_text())
    torch = next(p for p in locked["packages"] if p["name"] == "torch")
    if flavor == "cuda" and not re.search(r"\+cu\d+$", torch["version"]):
        sys.exit(f"lock-images: the CUDA lock resolved torch {torch['version']}, not a CUDA build")
    header = [
        f"# The {flavor} image's packages for linux/{arch}: each pinned, each wheel's sha256 (scripts/lock-images.py",
        "# wrote this from pyproject.toml; do not edit). deploy/docker/Dockerfile installs it with --require-hashes.",
    ]
    out.write_text("\n".join([*header, *lock_lines(locked)]) + "\n")
    print(f"wrote {out.relative_to(ROOT)}: {len(locked['packages'])} packages")
    return 0


if __name__ == "__main__":
    sys.exit(main())
