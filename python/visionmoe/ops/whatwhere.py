"""What-where attention (PAPERS.md section 5).

Temporary alias of the pure-PyTorch reference on the wwt branch, so that :class:`visionmoe.layers.WhatWhereBlock`
calls ``visionmoe.ops.whatwhere_attention`` unconditionally; the fused operator's wrapper replaces this file.
"""

from ..reference.whatwhere import whatwhere_attention

__all__ = ["whatwhere_attention"]
