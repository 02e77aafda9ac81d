"""fastbp: fast CPU training of fully-connected networks, with torch's API and answers.

The kernels live in C (vectorised for AVX-512, AVX2+FMA or plain C, picked at import; force one
with ``FASTBP_ISA=generic|avx2|avx512``) and run under OpenMP. :mod:`fastbp.ops` is their
checked Python surface; :class:`Sequential`, the layers, :mod:`fastbp.optim` and the losses are
the torch-style API, and ``model.fit`` runs whole epochs in C.
"""

import os as _os

from . import _core
from ._config import (
    _after_fork_in_child,
    _select_isa_from_environment,
    available_isas,
    get_config,
    get_flush_denormal,
    get_num_threads,
    set_flush_denormal,
    set_num_threads,
    show_config,
    thread_limit,
)

_select_isa_from_environment()
if hasattr(_os, "register_at_fork"):
    _os.register_at_fork(after_in_child=_after_fork_in_child)

from . import datasets, ops, optim, profiling  # noqa: E402
from ._core import NonFiniteLossError  # noqa: E402
from ._model import MLP, History, Sequential  # noqa: E402
from ._random import manual_seed  # noqa: E402
from .estimators import MLPClassifier, MLPRegressor, NotFittedError  # noqa: E402
from .io import load, save  # noqa: E402
from .losses import CrossEntropyLoss, MSELoss  # noqa: E402
from .nn import (  # noqa: E402
    BatchNorm1d,
    Dropout,
    Identity,
    Linear,
    Module,
    Parameter,
    ReLU,
    Sigmoid,
    Tanh,
)

__version__ = _core.version()

__all__ = [
    "MLP",
    "BatchNorm1d",
    "CrossEntropyLoss",
    "Dropout",
    "History",
    "Identity",
    "Linear",
    "MLPClassifier",
    "MLPRegressor",
    "MSELoss",
    "Module",
    "NonFiniteLossError",
    "NotFittedError",
    "Parameter",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "Tanh",
    "__version__",
    "available_isas",
    "datasets",
    "get_config",
    "get_flush_denormal",
    "get_num_threads",
    "load",
    "manual_seed",
    "ops",
    "optim",
    "profiling",
    "save",
    "set_flush_denormal",
    "set_num_threads",
    "show_config",
    "thread_limit",
]
