"""fastbp: fast CPU training of fully-connected networks.

The kernels live in C (vectorised for AVX-512, AVX2+FMA or plain C, picked at import; force one
with ``FASTBP_ISA=generic|avx2|avx512``) and run under OpenMP. :mod:`fastbp.ops` is their
checked Python surface.
"""

import os as _os

from . import _core
from ._config import (
    _after_fork_in_child,
    _select_isa_from_environment,
    available_isas,
    get_config,
    get_num_threads,
    set_num_threads,
    show_config,
)

_select_isa_from_environment()
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)

from . import ops  # noqa: E402

__version__ = _core.version()

__all__ = [
    "__version__",
    "available_isas",
    "get_config",
    "get_num_threads",
    "ops",
    "set_num_threads",
    "show_config",
]
