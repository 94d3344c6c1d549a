"""What a benchmark result was measured with: code version, libraries, device."""

from __future__ import annotations

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def git_state(root: str = ROOT) -> dict:
    """The project's commit and whether tracked files differ from it.

    Where the tree is a copy (no git metadata, or metadata of an older base), `VATTN_GIT_COMMIT`
    names the commit it was copied from and takes precedence; without either the commit is
    recorded as unknown, with the reason.
    """
    env = os.environ.get("VATTN_GIT_COMMIT")
    if env:
        return {"commit": env, "dirty": None, "source": "VATTN_GIT_COMMIT"}
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
        return {"commit": commit, "dirty": dirty, "source": "git"}
    except (OSError, subprocess.CalledProcessError) as exc:
        return {"commit": None, "dirty": None, "reason": f"no git metadata ({type(exc).__name__}); "
                                                         "set VATTN_GIT_COMMIT"}


def _git(root: str, *args: str) -> str:
    out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, check=True, timeout=30)
    return out.stdout.strip()


def versions() -> dict:
    """This process's project and library versions."""
    import torch
    import transformers

    import vattn_ray

    return {"vattn_ray": vattn_ray.__version__, "git": git_state(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "transformers": transformers.__version__,
            "python": sys.version.split()[0]}


def device_info(device) -> dict:
    """Name and memory of the device the run used."""
    import torch

    if device.type != "cuda":
        return {"type": "cpu", "name": "cpu"}
    props = torch.cuda.get_device_properties(device)
    return {"type": "cuda", "name": props.name, "total_memory_gib": props.total_memory / (1 << 30),
            "count": torch.cuda.device_count()}
