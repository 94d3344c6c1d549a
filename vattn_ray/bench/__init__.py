"""Benchmarks: `python -m vattn_ray.bench <name> [args]` runs `vattn_ray.bench.<name>.main(args)`."""

from __future__ import annotations

import argparse
import os


def fill_device_defaults(args: argparse.Namespace, cuda: bool, defaults: dict[str, tuple]) -> None:
    """Options left unset (None) take their GPU-sized or CPU-sized default: name -> (cuda, cpu)."""
    for name, (on_cuda, on_cpu) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, on_cuda if cuda else on_cpu)


def pid_alive(pid: int) -> bool:
    """Whether a process of this machine still exists (signal 0 probes without signalling)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
