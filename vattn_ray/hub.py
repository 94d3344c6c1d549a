"""Hugging Face Hub model ids ("org/name") resolved to a local snapshot, as vLLM and Ray Serve LLM do.

The files go to the usual Hugging Face cache (``HF_HOME``), so a second start, or an offline node
with ``HF_HUB_OFFLINE=1`` and a warm cache, loads without the network. Only what the engine reads
is fetched: the config files, the tokenizer and the safetensors weights.
"""

from __future__ import annotations

import logging
import re

logger = logging.getLogger(__name__)

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a Hub repo id (and not as a path)."""
    return bool(_REPO_ID.match(name)) and ".." not in name


def resolve_hub_model(name: str) -> str:
    """The local snapshot directory of repo `name`; `name` itself when it is not a repo id (the
    caller then reports the missing directory)."""
    if not is_repo_id(name):
        return name
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(name, allow_patterns=_FILES)
    except Exception as exc:  # noqa: BLE001 - offline, unknown repo, gated, network: one answer
        raise FileNotFoundError(
            f"model {name!r} is neither a local directory nor a Hugging Face repo this machine can fetch "
            f"({type(exc).__name__}: {exc}); pass a checkpoint directory, or make the repo reachable "
            "(network, HF_TOKEN) or cached (HF_HOME)") from exc
    logger.info("model %s resolved to %s", name, path)
    return path
