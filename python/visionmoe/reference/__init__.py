"""Pure-PyTorch reference implementations of every visionmoe operator, with the operators' signatures.

They are the readable specification and the oracle of the tests; they are not meant to be fast.
"""

from .dispatch import (
    combine,
    combine_einsum,
    combine_tensor,
    dispatch,
    dispatch_einsum,
    make_plan,
    token_major,
)
from .sinkhorn import sinkhorn

__all__ = [
    "combine",
    "combine_einsum",
    "combine_tensor",
    "dispatch",
    "dispatch_einsum",
    "make_plan",
    "sinkhorn",
    "token_major",
]
