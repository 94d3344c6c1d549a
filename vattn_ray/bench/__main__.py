"""Dispatch `python -m vattn_ray.bench <name> [args]` to `vattn_ray.bench.<name>.main(args)`."""

from __future__ import annotations

import importlib
import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0].startswith("-"):
        sys.stderr.write("usage: python -m vattn_ray.bench <name> [args]   (e.g. kv --help)\n")
        return 2
    name, rest = argv[0], argv[1:]
    try:
        module = importlib.import_module(f"vattn_ray.bench.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"vattn_ray.bench.{name}":
            raise
        sys.stderr.write(f"no benchmark named {name!r} (no module vattn_ray.bench.{name})\n")
        return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
