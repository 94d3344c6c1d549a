"""Hash chain over full page groups of token ids: the keys of the prefix cache. Pure Python.

Group `j` of a slot holds tokens `[j*T, (j+1)*T)` (T tokens a page group); its key hashes its tokens
together with the key of group `j-1`, so a key names the whole prefix up to the end of its group
and two slots with equal keys at `j` hold equal KV in groups `0..j`. A cryptographic digest keeps
a collision (which would serve another prompt's KV) out of reach of crafted prompts.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Callable

_ROOT = b"vattn-ray prefix v1"


def chain_hashes(hashes: list[bytes], tokens: Callable[[int, int], tuple[int, ...]], tokens_per_group: int,
                 num_groups: int) -> list[bytes]:
    """Extend `hashes` (the keys of the first groups, in place) to `num_groups` keys; return it.

    `tokens(start, end)` gives the token ids at positions [start, end).
    """
    t = tokens_per_group
    for j in range(len(hashes), num_groups):
        parent = hashes[j - 1] if j else _ROOT
        ids = array("q", tokens(j * t, (j + 1) * t)).tobytes()
        hashes.append(hashlib.blake2b(parent + ids, digest_size=16).digest())
    return hashes
