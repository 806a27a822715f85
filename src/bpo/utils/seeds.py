"""Keyed seeds: every random stream of every sample draws from its own seed.

Randomness is keyed, not sequential: a stream ("noise", "sample", "inject", "image", ...) of one
sample is seeded by `stream_seed(seed, key, sample index, stream)`, so what it draws does not
depend on the batch size, the batch it lands in, or which other samples run (what a resumed or
sharded run needs). Generation, bootstrapping and training all key their draws this way.
"""

from __future__ import annotations

import hashlib


def stream_seed(seed: int, key: int | str, sample_index: int, stream: str) -> int:
    """A 63-bit seed for one random stream ("noise", "sample", ...) of one sample of a request.

    key: the request's global index (bootstrapping), its id (evaluation) or a pair's key
        (training): stable across batches, shards and resumes.
    """
    text = f"{seed}:{key}:{sample_index}:{stream}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "little") >> 1
