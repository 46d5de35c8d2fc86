"""Print one package of uv.lock as a hash-checked pip requirement, to bootstrap uv from the lock.

    python scripts/lock_pin.py uv             -> uv==0.13.9 --hash=sha256:... (every file's hash)
    python scripts/lock_pin.py --version uv   -> 0.13.9

Only the standard library (tomllib), so any Python 3.11+ runs it before anything is installed.
"""

import argparse
import tomllib
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("--version", action="store_true", help="print only the locked version")
    parser.add_argument("--lock", type=Path, default=Path(__file__).parent.parent / "uv.lock")
    args = parser.parse_args()
    lock = tomllib.loads(args.lock.read_text())
    found = [p for p in lock["package"] if p["name"] == args.name]
    if len(found) != 1:
        raise SystemExit(f"{args.lock}: {len(found)} entries for {args.name!r}, expected 1")
    package = found[0]
    if args.version:
        print(package["version"])
        return
    files = [*package.get("wheels", []), *([package["sdist"]] if "sdist" in package else [])]
    hashes = " ".join(f"--hash={f['hash']}" for f in files)
    print(f"{package['name']}=={package['version']} {hashes}")


if __name__ == "__main__":
    main()
