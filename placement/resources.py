"""Fail fast when a placement group can never be placed on the cluster.

Ray keeps an unplaceable placement group pending forever (waiting for nodes that never come), and
Serve then waits for a replica that never starts. We compare the bundles with the *total* resources
of the alive nodes (not what is free right now: busy resources free up, missing ones do not) and
raise `PlacementError` saying what is missing. On a cluster that grows (KubeRay autoscaling) pass
``wait_s`` to give new nodes time to join before giving up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

logger = logging.getLogger(__name__)

# Fractional amounts (0.001 accelerator markers, 0.5 CPU) are summed in floating point.
_EPS = 1e-9


class PlacementError(RuntimeError):
    """The bundles cannot be placed on any arrangement of the cluster's alive nodes."""


def alive_node_resources() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def _fits(bundle: dict[str, float], free: dict[str, float]) -> bool:
    return all(free.get(k, 0.0) + _EPS >= v for k, v in bundle.items())


def _take(bundle: dict[str, float], free: dict[str, float]) -> None:
    for k, v in bundle.items():
        free[k] = free.get(k, 0.0) - v


def _total(bundles: Sequence[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for b in bundles:
        for k, v in b.items():
            total[k] = total.get(k, 0.0) + v
    return total


def _fmt(amount: float) -> str:
    return str(int(amount)) if float(amount).is_integer() else f"{amount:g}"


def _amount(amount: float, key: str) -> str:
    """``2 GPUs``, ``1 CPU``, ``0.5 CPU``, ``3 memory``."""
    plural = key in ("CPU", "GPU") and amount != 1 and float(amount).is_integer()
    return f"{_fmt(amount)} {key}{'s' if plural else ''}"


def _describe(resources: dict[str, float]) -> str:
    return ", ".join(_amount(v, k) for k, v in sorted(resources.items())) or "nothing"


def _shortfall(need: dict[str, float], nodes: list[dict[str, float]], where: str) -> str:
    """Name the first resource that no single node (or the cluster) has enough of."""
    for key in sorted(need, key=lambda k: (k != "GPU", k)):  # GPUs first: the usual culprit
        if key.startswith("accelerator_type:"):
            if not any(n.get(key, 0.0) > 0 for n in nodes):
                return f"needs a node with {key}; no node has it"
            continue
        if where == "one node":
            best = max((n.get(key, 0.0) for n in nodes), default=0.0)
            if best + _EPS < need[key]:
                return (f"needs {_amount(need[key], key)} on one node; "
                        f"the largest node has {_amount(best, key)}")
        else:
            have = sum(n.get(key, 0.0) for n in nodes)
            if have + _EPS < need[key]:
                return f"needs {_amount(need[key], key)} in the cluster; the cluster has {_amount(have, key)}"
    return f"needs {_describe(need)} ({where}); no arrangement of the nodes fits"


def placement_problem(bundles: Sequence[dict[str, float]], strategy: str,
                      nodes: list[dict[str, float]]) -> str | None:
    """Why `bundles` cannot be placed with `strategy` on `nodes` (their total resources), or None."""
    if not nodes:
        return "the cluster has no alive nodes"
    if strategy == "STRICT_PACK":
        need = _total(bundles)
        if any(_fits(need, n) for n in nodes):
            return None
        return _shortfall(need, nodes, "one node")
    # Largest bundles first, first fit: exact for our bundles (all alike except bundle 0).
    order = sorted(range(len(bundles)), key=lambda i: -sum(bundles[i].values()))
    free = [dict(n) for n in nodes]
    used: set[int] = set()
    for i in order:
        candidates = [j for j in range(len(free)) if strategy != "STRICT_SPREAD" or j not in used]
        j = next((j for j in candidates if _fits(bundles[i], free[j])), None)
        if j is None:
            if strategy == "STRICT_SPREAD":
                fit = sum(1 for n in nodes if _fits(bundles[i], n))
                return (f"needs {len(bundles)} nodes each holding a bundle like {_describe(bundles[i])}; "
                        f"{fit} node(s) can")
            if not any(_fits(bundles[i], n) for n in nodes):
                return _shortfall(bundles[i], nodes, "one node")
            return _shortfall(_total(bundles), nodes, "cluster")
        _take(bundles[i], free[j])
        used.add(j)
    return None


def check_resources(bundles: Sequence[dict[str, float]], strategy: str = "STRICT_PACK", *,
                    nodes: list[dict[str, float]] | None = None, context: str = "",
                    wait_s: float = 0.0, poll_s: float = 2.0) -> None:
    """Raise `PlacementError` when the bundles can never be placed; return when they can.

    ``nodes`` defaults to the connected cluster's alive nodes (re-read while waiting up to ``wait_s``
    seconds for nodes to join). ``context`` prefixes the message, e.g. ``"tensor_parallel_size=2"``.
    """
    deadline = time.monotonic() + wait_s
    while True:
        current = alive_node_resources() if nodes is None else nodes
        problem = placement_problem(bundles, strategy, current)
        if problem is None:
            return
        if nodes is not None or time.monotonic() >= deadline:
            break
        logger.info("placement not possible yet (%s); waiting for nodes to join", problem)
        time.sleep(poll_s)
    prefix = f"{context} " if context else ""
    largest = max(current, key=lambda n: n.get("GPU", 0.0), default={})
    shown = {k: v for k, v in largest.items() if k in ("CPU", "GPU") or k.startswith("accelerator_type")}
    raise PlacementError(
        f"{prefix}{problem} ({strategy}). Bundles: {list(bundles)}. Node with the most GPUs: "
        f"{_describe(shown)}. "
        "Lower tensor_parallel_size, add nodes, or change the placement strategy.")
