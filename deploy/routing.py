"""Request routers for the replicas of `LLMServer` (Ray Serve's `request_router_config` hook).

`PrefixAwareRouter` sends a request to the replica that last served the longest prefix of its
prompt, so that replica's prefix cache (docs/prefix-caching.md) serves it, unless that replica is
much busier than the least-loaded one: then Serve's power-of-two choice decides. `RoundRobinRouter`
is the plain baseline it is measured against (`python -m vattn_ray.bench routing`).

The router runs in the caller's process (the ingress of `deploy.ingress`), before any tokenizer:
it keys requests by their prompt **text** (completions) or their **chat messages** (role and text of
each, in order), cut into blocks of `block_chars` characters and hashed as a chain, so a key names
everything before the end of its block (as the engine's page-group keys do over token ids).
Equal text prefixes tokenize to equal token prefixes (up to the token at the cut), and a chat
template renders earlier messages the same whatever follows, so a text match predicts a cache
match without tokenizing twice.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

# Its own module: Serve pickles this one by value, and an isinstance check needs the one class.
from deploy.ingress import ForwardedRequest

logger = logging.getLogger("ray.serve")

_ROOT = b"vattn-ray route v1"
# The knob's values (`AppArgs.request_router`) -> the router class (None: Serve's default).
ROUTERS = {
    "power_of_two": None,
    "round_robin": "deploy.routing.RoundRobinRouter",
    "prefix_aware": "deploy.routing.PrefixAwareRouter",
}


def route_text(method: str, path: str, body: bytes) -> str | None:
    """The text a request is routed by: the completion prompt (the first one of a list), or the chat
    messages; None for anything else (other routes, bodies that do not parse: the replica answers
    those, and any replica will do)."""
    if method != "POST" or not body:
        return None
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    if path.endswith("/chat/completions"):
        return _messages_text(data.get("messages"))
    if path.endswith("/completions"):
        prompt = data.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]
        if isinstance(prompt, str):
            return prompt
        if isinstance(prompt, list):  # token ids: routed by their decimal text
            return ",".join(str(t) for t in prompt)
    return None


def _messages_text(messages: Any) -> str | None:
    if not isinstance(messages, list):
        return None
    parts = []
    for m in messages:
        if not isinstance(m, dict):
            return None
        content = m.get("content")
        if isinstance(content, list):  # content parts: their text, in order
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        # Control characters no message holds in practice mark the fields, so that moving text
        # between messages changes the key.
        parts.append(f"\x1e{m.get('role', '')}\x1f{content if isinstance(content, str) else ''}")
    return "".join(parts)


def block_keys(text: str, block_chars: int) -> list[bytes]:
    """Chained 128-bit keys of the full `block_chars`-character blocks of `text`."""
    keys, parent = [], _ROOT
    # Blocks of characters, not bytes: a multi-byte character is never cut.
    for start in range(0, len(text) - block_chars + 1, block_chars):
        block = text[start:start + block_chars].encode("utf-8", "surrogatepass")
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        keys.append(parent)
    return keys


def request_keys(pending_request: PendingRequest | None, block_chars: int) -> list[bytes]:
    """The prefix keys of a routed request ([] when it carries no prompt)."""
    if pending_request is None or not pending_request.args:
        return []
    req = pending_request.args[0]
    if not isinstance(req, ForwardedRequest):
        return []
    text = route_text(req.method, req.path, req.body)
    return block_keys(text, block_chars) if text else []



def _start_choice(candidates: list, pending_request) -> bool:
    """Common start of `choose_replicas`: past the ranks returned, wait before asking again (as
    Serve's own router does); False when there is no replica to choose from."""
    if pending_request is not None:
        pending_request.routing_context.should_backoff = True
    return bool(candidates)

class PrefixAwareRouter(RequestRouter):
    """Prefer the replica that last served the longest prefix of the prompt (see the module doc).

    `request_router_kwargs`: `block_chars` (characters a key block: ~32 tokens of English text at
    128, one page group of an 8B model), `imbalanced_threshold` (the preferred replica is skipped when
    it has that many more ongoing requests than the least-loaded one), `max_keys` (the table of
    block -> replica forgets the least recently used past it).
    """

    def initialize_state(self, block_chars: int = 128, imbalanced_threshold: int = 8,
                         max_keys: int = 200_000, **kwargs: Any) -> None:
        if kwargs:
            raise ValueError(f"unknown request_router_kwargs {sorted(kwargs)}; known: block_chars, "
                             "imbalanced_threshold, max_keys")
        self.block_chars, self.imbalanced_threshold, self.max_keys = block_chars, imbalanced_threshold, max_keys
        self._owner: OrderedDict[bytes, ReplicaID] = OrderedDict()
        self._owned: dict[ReplicaID, int] = {}  # keys each replica owns: the size of its share
        self._keys: dict[str, list[bytes]] = {}  # internal request id -> its keys, until routed

    def _load(self, replica: RunningReplica) -> int:
        return self.replica_queue_len_cache.get(replica.replica_id) or 0

    def _two_choices(self, candidates: list[RunningReplica]) -> list[RunningReplica]:
        return random.sample(candidates, min(2, len(candidates)))

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not _start_choice(candidate_replicas, pending_request):
            return []
        keys = self._request_keys(pending_request)
        fallback = self._two_choices(candidate_replicas)
        if not keys:  # no prompt (or a short one): any replica will do
            return [fallback]
        by_id = {r.replica_id: r for r in candidate_replicas}
        preferred = None
        for key in reversed(keys):  # the longest prefix first
            owner = self._owner.get(key)
            if owner in by_id:
                preferred = by_id[owner]
                break
        least = min(self._load(r) for r in candidate_replicas)
        if preferred is None:
            # A new prefix goes to the replica holding the fewest prefixes among those not much
            # busier than the least-loaded one: prefixes (and the load they bring) spread evenly,
            # also when a burst of new prefixes arrives before any load is known.
            calm = [r for r in candidate_replicas if self._load(r) - least <= self.imbalanced_threshold]
            return [[min(calm, key=lambda r: (self._owned.get(r.replica_id, 0), self._load(r)))], fallback]
        if self._load(preferred) - least > self.imbalanced_threshold:
            return [fallback]
        # The preferred replica first; when it is full, the power-of-two choice.
        return [[preferred], fallback]

    def _request_keys(self, pending_request: PendingRequest | None) -> list[bytes]:
        if pending_request is None:
            return []
        rid = pending_request.metadata.internal_request_id
        if rid not in self._keys:
            if len(self._keys) > 10_000:  # requests cancelled before they were routed
                self._keys.clear()
            self._keys[rid] = request_keys(pending_request, self.block_chars)
        return self._keys[rid]

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        """The replica now serving the request will hold its prefix: it owns the request's keys."""
        keys = self._keys.pop(pending_request.metadata.internal_request_id, None)
        if keys is None:
            keys = request_keys(pending_request, self.block_chars)
        for key in keys:
            self._disown(key)
            self._owner[key] = replica_id
            self._owned[replica_id] = self._owned.get(replica_id, 0) + 1
        while len(self._owner) > self.max_keys:
            self._disown(next(iter(self._owner)))

    def _disown(self, key: bytes) -> None:
        owner = self._owner.pop(key, None)
        if owner is not None:
            self._owned[owner] -= 1

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        for key in [k for k, v in self._owner.items() if v == replica_id]:
            self._disown(key)
        self._owned.pop(replica_id, None)


class RoundRobinRouter(RequestRouter):
    """Each request to the next replica in turn (a full one is skipped): the baseline that ignores
    both prefixes and load."""

    def initialize_state(self, **kwargs: Any) -> None:
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        if not _start_choice(candidate_replicas, pending_request):
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        start = next(self._turn) % len(ordered)
        return [[r] for r in ordered[start:] + ordered[:start]]
