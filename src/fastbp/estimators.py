"""scikit-learn-style estimators: :class:`MLPClassifier` and :class:`MLPRegressor`.

They take scikit-learn's constructor names (``hidden_layer_sizes``, ``activation``, ``solver``,
``alpha``, ``batch_size``, ``learning_rate_init``, ``max_iter``, ``shuffle``, ``random_state``,
``tol``, ``early_stopping``, ``validation_fraction``, ``n_iter_no_change``, ...) and follow its
conventions (``fit``/``partial_fit``/``predict``/``score``, ``get_params``/``set_params``,
fitted attributes ending in ``_``), so they work in pipelines, grid searches and
``sklearn.base.clone``. Training runs in fastbp's C epoch loop.

scikit-learn is **not** needed at run time: the estimator protocol (parameters, repr, tags,
fitted checks, input validation) is implemented here. ``__sklearn_tags__`` imports scikit-learn
lazily, since only scikit-learn's tooling calls it. When scikit-learn is already imported, the
warnings raised here (:class:`ConvergenceWarning`, :class:`DataConversionWarning`) also
subclass scikit-learn's warnings of the same name, so its filters catch them.

How the parameters map onto fastbp (see each class's docstring for the full list):

- ``activation``: ``'relu'``, ``'tanh'``, ``'logistic'`` (fastbp's ``Sigmoid``), ``'identity'``.
- ``solver``: ``'adam'`` → :class:`fastbp.optim.Adam` (``beta_1``, ``beta_2``, ``epsilon``);
  ``'sgd'`` → :class:`fastbp.optim.SGD` (``momentum``, ``nesterovs_momentum``, constant
  learning rate). ``'lbfgs'`` is refused with a ``ValueError``.
- ``alpha`` (L2 penalty): scikit-learn minimises, per batch of ``B`` rows,
  ``data_loss + alpha / 2 * sum(||W||²) / B`` over the weight matrices ``W`` (not the biases),
  i.e. it adds ``alpha * W / B`` to each weight gradient. fastbp adds the same term through the
  optimizer's (L2, coupled) ``weight_decay = alpha / B`` (``2 * alpha / (B * n_outputs)`` for
  the regressor, see below). **Difference:** fastbp's fused optimizer decays every parameter, so the biases
  are penalised too (scikit-learn leaves them alone); and the last, smaller batch of an epoch
  uses the full batch size ``B`` in the divisor. With the default ``alpha=1e-4`` both effects
  are negligible; pass ``alpha=0`` to turn the penalty off entirely.
- Losses: the classifier uses softmax cross-entropy (the same value as scikit-learn's log-loss).
  For **binary** problems it keeps two outputs with a softmax, where scikit-learn uses one
  logistic output: the same family of models (the logistic of the logit difference),
  parametrised with one extra output unit. The regressor trains on fastbp's MSE
  (``mean((y - p)²)`` over rows and outputs), whose gradient is ``2 / n_outputs`` times
  scikit-learn's (its squared loss is ``mean((y - p)²) / 2`` but its gradient is
  ``(p - y) / n_rows``). The difference is compensated (SGD's learning rate is divided by that
  factor and the weight decay multiplied by it; Adam is invariant to the scale) so that the
  weight updates are scikit-learn's, and ``loss_curve_`` reports scikit-learn's value (half
  the MSE).
- ``loss_curve_`` holds, per epoch, the mean training loss over the epoch's batches plus the
  L2 term ``alpha / 2 * sum(||W||²) * n_batches / n_samples``, evaluated with the end-of-epoch
  weights (scikit-learn adds each batch's own weights; the difference is below ``tol`` in
  practice).
- Stopping follows scikit-learn's rule: an epoch counts as "no improvement" when the training
  loss is not below ``best_loss_ - tol`` (or, with ``early_stopping=True``, the validation
  score is not above ``best_validation_score_ + tol``); training stops once that has happened
  more than ``n_iter_no_change`` epochs in a row. With early stopping the weights of the best
  validation epoch are restored at the end.
- Initialisation follows scikit-learn (Glorot uniform, ``sqrt(6 / (fan_in + fan_out))``, or
  ``sqrt(2 / (fan_in + fan_out))`` for ``'logistic'``), for weights and biases alike.
- Adam differs from scikit-learn's own Adam only in where ``epsilon`` enters (torch's rule,
  ``m̂ / (sqrt(v̂) + eps)``, against scikit-learn's bias correction folded into the step size).
- ``dtype`` (default ``'float32'``) is the precision of the weights and of training; inputs of
  any real dtype are converted. ``'float64'`` is slower but matches scikit-learn more closely.
- ``n_threads`` limits fastbp's threads (:func:`fastbp.set_num_threads`) while ``fit``,
  ``partial_fit`` or a prediction runs, then restores the previous setting. The thread count
  is process-wide: estimators with different ``n_threads`` should not run concurrently.
- ``random_state`` (an int, ``None``, a ``numpy.random.Generator`` or ``RandomState``) seeds
  the initial weights, the batch order and the early-stopping split; the same int gives the
  same model, bitwise, whatever the thread count.
- ``sample_weight`` is not supported by ``fit`` (fastbp's loop has no per-sample weights);
  ``score`` accepts it.
"""

from __future__ import annotations

import inspect
import math
import numbers
import sys
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import optim
from ._config import thread_limit as _thread_limit
from ._model import MLP, Sequential, _all_finite
from ._random import derive_seed, fresh_seed

__all__ = [
    "ConvergenceWarning",
    "DataConversionWarning",
    "MLPClassifier",
    "MLPRegressor",
    "NotFittedError",
]

_ACTIVATIONS = {"relu": "relu", "tanh": "tanh", "logistic": "sigmoid", "identity": "identity"}
_SOLVERS = ("adam", "sgd")


class NotFittedError(ValueError, AttributeError):
    """Raised when an estimator is used before ``fit``; like scikit-learn's ``NotFittedError``
    it subclasses both ``ValueError`` and ``AttributeError``."""


class ConvergenceWarning(UserWarning):
    """``max_iter`` epochs ran without meeting the ``tol`` stopping rule."""


class DataConversionWarning(UserWarning):
    """The input was converted (e.g. a column-vector ``y`` raveled to 1-D)."""


_bridged: dict[type[BaseException], type[BaseException]] = {}


def _bridge(category: type[BaseException]) -> type[BaseException]:
    """``category`` itself; or, when scikit-learn is already imported, a subclass of both
    ``category`` and scikit-learn's exception/warning of the same name, so that handlers and
    filters written for either catch it. scikit-learn is never imported here."""
    exceptions = sys.modules.get("sklearn.exceptions")
    theirs = getattr(exceptions, category.__name__, None) if exceptions else None
    if not (isinstance(theirs, type) and issubclass(theirs, BaseException)):
        return category
    bridged = _bridged.get(category)
    if bridged is None:
        bridged = type(
            category.__name__,
            (category, theirs),
            {"__module__": __name__, "__doc__": category.__doc__},
        )
        _bridged[category] = bridged
    return bridged


def _warn(category: type[Warning], message: str, stacklevel: int = 2) -> None:
    """Warn with ``category`` (bridged to scikit-learn's, see :func:`_bridge`); ``stacklevel``
    counts from the caller of this function."""
    warnings.warn(message, _bridge(category), stacklevel=stacklevel + 1)


def _is_sparse(X: object) -> bool:
    module = type(X).__module__ or ""
    return module.startswith("scipy.sparse") or (
        hasattr(X, "toarray") and hasattr(X, "nnz") and hasattr(X, "format")
    )


def _numeric_array(X: object, name: str) -> np.ndarray:
    """``X`` as a float64 array (any real, boolean or numeric-object input), or a clear error."""
    if X is None:
        raise ValueError(
            f"requires {name} to be passed, but the target {name} is None"
            if name == "y"
            else f"Expected a 2-D array for {name}, got None"
        )
    if _is_sparse(X):
        raise TypeError(
            f"Sparse data was passed for {name}, but fastbp needs dense data; "
            f"use {name}.toarray() to convert it to a dense NumPy array"
        )
    arr = np.asarray(X)
    if arr.dtype.kind == "c":
        raise ValueError(f"Complex data not supported: {name} has dtype {arr.dtype}")
    if arr.dtype.kind in "fiub":
        return arr.astype(np.float64, copy=False)
    try:
        return arr.astype(np.float64)
    except (TypeError, ValueError) as exc:  # keep NumPy's exception type and message
        raise type(exc)(f"{name} must be numeric, got dtype {arr.dtype}: {exc}") from None


def _check_finite(arr: np.ndarray, name: str) -> None:
    if not _all_finite(arr):
        raise ValueError(f"Input {name} contains NaN or infinity.")


def _seed_from(random_state: object) -> int:
    """A 63-bit seed from an int, None (fresh entropy), a Generator or a RandomState."""
    if random_state is None:
        return fresh_seed()
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool):
        if random_state < 0:
            raise ValueError(f"random_state must be >= 0, got {random_state}")
        return int(random_state)
    if isinstance(random_state, np.random.Generator):
        return int(random_state.integers(2**63))
    if isinstance(random_state, np.random.RandomState):
        return int(random_state.randint(2**31 - 1))
    raise ValueError(
        "random_state must be an int, None, a numpy.random.Generator or RandomState, "
        f"got {random_state!r}"
    )


def _r2_score(y: np.ndarray, pred: np.ndarray, sample_weight: np.ndarray | None) -> float:
    """R² averaged uniformly over outputs (scikit-learn's ``r2_score`` default)."""
    y = y.reshape(len(y), -1)
    pred = pred.reshape(len(pred), -1)
    w = np.ones(len(y)) if sample_weight is None else sample_weight
    w = w[:, None]
    residual = (w * (y - pred) ** 2).sum(axis=0)
    mean = (w * y).sum(axis=0) / w.sum()
    total = (w * (y - mean) ** 2).sum(axis=0)
    scores = np.ones(y.shape[1])
    nonzero = total != 0
    scores[nonzero] = 1.0 - residual[nonzero] / total[nonzero]
    scores[~nonzero & (residual != 0)] = 0.0  # a constant target predicted imperfectly
    return float(scores.mean())


class _Distributed:
    """How an estimator's ``fit(..., comm=...)`` trains: the communicator and the options that
    :meth:`fastbp.Sequential.fit` takes with it. Held for the call only, never pickled."""

    def __init__(self, comm: object, deterministic: bool, overlap: bool) -> None:
        for method in ("Get_rank", "Get_size", "bcast"):
            if not callable(getattr(comm, method, None)):
                raise TypeError(
                    f"comm must be an MPI communicator such as mpi4py's MPI.COMM_WORLD; "
                    f"{type(comm).__name__} has no {method}()"
                )
        self.comm = comm
        self.deterministic = bool(deterministic)
        self.overlap = bool(overlap)
        self.reporting = comm.Get_rank() == 0  # type: ignore[attr-defined]

    def fit_kwargs(self) -> dict[str, Any]:
        return {"comm": self.comm, "deterministic": self.deterministic, "overlap": self.overlap}

    def from_rank0(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (each decision that must agree)."""
        return self.comm.bcast(value, root=0)  # type: ignore[attr-defined]


def _distributed(comm: object, deterministic: bool, overlap: bool) -> _Distributed | None:
    if comm is None:
        if deterministic or overlap:
            raise ValueError("deterministic and overlap apply to distributed fits: pass comm")
        return None
    return _Distributed(comm, deterministic, overlap)


class _BaseMLP:
    """The estimator protocol and the training loop shared by the two estimators."""

    _estimator_type = ""
    _loss_name = ""
    _loss_scale = 1.0  # fastbp's reported loss divided by scikit-learn's

    def _grad_scale(self) -> float:
        """fastbp's loss gradient divided by scikit-learn's."""
        return 1.0

    def __init__(
        self,
        hidden_layer_sizes: int | Sequence[int] = (100,),
        activation: str = "relu",
        *,
        solver: str = "adam",
        alpha: float = 1e-4,
        batch_size: int | str = "auto",
        learning_rate_init: float = 1e-3,
        max_iter: int = 200,
        shuffle: bool = True,
        random_state: object = None,
        tol: float = 1e-4,
        verbose: bool | int = False,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        n_iter_no_change: int = 10,
        n_threads: int | None = None,
        dtype: object = "float32",
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.solver = solver
        self.alpha = alpha
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.max_iter = max_iter
        self.shuffle = shuffle
        self.random_state = random_state
        self.tol = tol
        self.verbose = verbose
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.n_iter_no_change = n_iter_no_change
        self.n_threads = n_threads
        self.dtype = dtype

    # ---- the estimator protocol ----------------------------------------------------------------

    @classmethod
    def _get_param_names(cls) -> list[str]:
        signature = inspect.signature(cls.__init__)
        return sorted(
            p.name
            for p in signature.parameters.values()
            if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
        )

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        """The constructor parameters as a dict (``deep`` is accepted for compatibility; these
        estimators hold no nested estimators)."""
        return {name: getattr(self, name) for name in self._get_param_names()}

    def set_params(self, **params: Any) -> _BaseMLP:
        """Set constructor parameters by name; they are validated at the next ``fit``."""
        valid = self._get_param_names()
        for key, value in params.items():
            if key not in valid:
                raise ValueError(
                    f"Invalid parameter {key!r} for estimator {type(self).__name__}. "
                    f"Valid parameters are: {valid!r}."
                )
            setattr(self, key, value)
        return self

    def __repr__(self) -> str:
        defaults = {
            p.name: p.default
            for p in inspect.signature(type(self).__init__).parameters.values()
            if p.default is not p.empty
        }
        changed = []
        for name, value in self.get_params().items():
            default = defaults.get(name, inspect.Parameter.empty)
            try:
                same = bool(value == default) and type(value) is type(default)
            except Exception:  # arrays and other exotic values: show them
                same = False
            if not same:
                changed.append(f"{name}={value!r}")
        return f"{type(self).__name__}({', '.join(changed)})"

    def __sklearn_is_fitted__(self) -> bool:
        return "model_" in self.__dict__

    def __sklearn_tags__(self) -> Any:
        """scikit-learn's tags (imports scikit-learn: only its tooling calls this)."""
        from sklearn.utils import InputTags, Tags, TargetTags

        return Tags(
            estimator_type=self._estimator_type,
            target_tags=TargetTags(required=True),
            input_tags=InputTags(two_d_array=True, sparse=False, allow_nan=False),
            transformer_tags=None,
            classifier_tags=None,
            regressor_tags=None,
        )

    def __getstate__(self) -> dict[str, Any]:
        # The fastbp model holds C state: pickle its weights and optimizer state instead.
        state = self.__dict__.copy()
        model = state.pop("model_", None)
        optimizer = state.pop("_optimizer", None)
        if model is not None:
            state["_saved_weights"] = model.state_dict()
            state["_saved_optimizer"] = optimizer.state_dict() if optimizer is not None else None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        weights = state.pop("_saved_weights", None)
        opt_state = state.pop("_saved_optimizer", None)
        self.__dict__.update(state)
        if weights is not None:
            model = MLP(
                list(self._layer_sizes),
                activation=_ACTIVATIONS[self._activation],
                dtype=self._dtype,
                seed=0,
            )
            model.load_state_dict(weights)
            self.model_ = model
            self._optimizer = self._make_optimizer(self._batch)
            if opt_state is not None:
                self._optimizer.load_state_dict(opt_state)

    def _check_fitted(self) -> None:
        if not self.__sklearn_is_fitted__():
            raise _bridge(NotFittedError)(
                f"This {type(self).__name__} instance is not fitted yet. Call 'fit' with "
                "appropriate arguments before using this estimator."
            )

    # ---- validation ----------------------------------------------------------------------------

    def _validate_params(self) -> None:
        sizes = self.hidden_layer_sizes
        if isinstance(sizes, numbers.Integral):
            sizes = [sizes]
        try:
            sizes = list(sizes)
        except TypeError:
            raise ValueError(
                f"hidden_layer_sizes must be an int or a sequence of ints, got {sizes!r}"
            ) from None
        for s in sizes:
            if not isinstance(s, numbers.Integral) or isinstance(s, bool) or s <= 0:
                raise ValueError(f"hidden_layer_sizes must contain positive ints, got {sizes!r}")
        self._hidden = [int(s) for s in sizes]
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.solver == "lbfgs":
            raise ValueError(
                "solver='lbfgs' is not supported by fastbp (full-batch quasi-Newton); "
                "use solver='adam' or solver='sgd'"
            )
        if self.solver not in _SOLVERS:
            raise ValueError(f"solver must be 'adam' or 'sgd', got {self.solver!r}")
        bs = self.batch_size
        if not (bs == "auto" if isinstance(bs, str) else _is_int(bs) and bs >= 1):
            raise ValueError(f"batch_size must be 'auto' or an int >= 1, got {bs!r}")
        for name in ("max_iter", "n_iter_no_change"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        for name in ("alpha", "tol", "momentum", "epsilon"):
            _real(getattr(self, name), name, low=0.0)
        _real(self.learning_rate_init, "learning_rate_init", low=0.0, open_low=True)
        if self.momentum > 1:
            raise ValueError(f"momentum must be in [0, 1], got {self.momentum!r}")
        for name in ("beta_1", "beta_2"):
            value = _real(getattr(self, name), name, low=0.0)
            if value >= 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        if self.early_stopping:
            frac = _real(self.validation_fraction, "validation_fraction", low=0.0, open_low=True)
            if frac >= 1:
                raise ValueError(f"validation_fraction must be in (0, 1), got {frac!r}")
        if self.n_threads is not None and (not _is_int(self.n_threads) or self.n_threads < 1):
            raise ValueError(f"n_threads must be None or an int >= 1, got {self.n_threads!r}")
        try:
            dt = np.dtype(self.dtype)
        except TypeError:
            dt = None
        if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        self._dtype = dt
        self._activation = self.activation
        rs = self.random_state
        if not (
            rs is None
            or (_is_int(rs) and rs >= 0)
            or isinstance(rs, (np.random.Generator, np.random.RandomState))
        ):
            raise ValueError(
                "random_state must be an int >= 0, None, a numpy.random.Generator or "
                f"RandomState, got {rs!r}"
            )

    def _validate_X(self, X: object, reset: bool) -> np.ndarray:
        """A C-contiguous 2-D finite array of the model's dtype; records or checks
        ``n_features_in_``."""
        arr = _numeric_array(X, "X")
        if arr.ndim == 1:
            raise ValueError(
                f"Expected a 2-D array, got a 1-D array of shape {arr.shape} instead. "
                "Reshape your data either using X.reshape(-1, 1) if it has a single feature "
                "or X.reshape(1, -1) if it contains a single sample."
            )
        if arr.ndim != 2:
            raise ValueError(f"X must be 2-D (samples, features), got shape {arr.shape}")
        if arr.shape[0] == 0:
            raise ValueError(
                f"Found array with 0 sample(s) (shape={arr.shape}) while a minimum of 1 is required."
            )
        if arr.shape[1] == 0:
            raise ValueError(
                f"Found array with 0 feature(s) (shape={arr.shape}) while a minimum of 1 is required."
            )
        _check_finite(arr, "X")
        if reset:
            self.n_features_in_ = arr.shape[1]
        elif arr.shape[1] != self.n_features_in_:
            raise ValueError(
                f"X has {arr.shape[1]} features, but {type(self).__name__} is expecting "
                f"{self.n_features_in_} features as input."
            )
        dtype = self._dtype if reset else self.model_.dtype
        out = np.ascontiguousarray(arr, dtype=dtype)
        if dtype != np.float64:
            _check_finite(out, "X (after conversion to float32: values too large)")
        return out

    # ---- training ------------------------------------------------------------------------------

    def _encode_y(self, y: object, n: int, reset: bool, classes: object = None) -> np.ndarray:
        raise NotImplementedError

    def _n_outputs_for_model(self) -> int:
        raise NotImplementedError

    def _score_arrays(self, X: np.ndarray, y_encoded: np.ndarray) -> float:
        raise NotImplementedError

    def _make_optimizer(self, batch: int) -> optim.Optimizer:
        params = self.model_.parameters()
        weight_decay = self._grad_scale() * float(self.alpha) / batch
        if self.solver == "sgd":
            momentum = float(self.momentum)
            return optim.SGD(
                params,
                lr=float(self.learning_rate_init) / self._grad_scale(),
                momentum=momentum,
                weight_decay=weight_decay,
                nesterov=bool(self.nesterovs_momentum) and momentum > 0,
            )
        return optim.Adam(
            params,
            lr=float(self.learning_rate_init),
            betas=(float(self.beta_1), float(self.beta_2)),
            eps=float(self.epsilon),
            weight_decay=weight_decay,
        )

    def _batch_for(self, n: int, stacklevel: int) -> int:
        """The batch size for ``n`` rows; ``stacklevel`` counts from the caller."""
        if self.batch_size == "auto":
            return min(200, n)
        if self.batch_size > n:
            warnings.warn(
                f"batch_size={self.batch_size} is larger than the {n} samples; using {n}",
                UserWarning,
                stacklevel=stacklevel + 1,
            )
        return int(min(self.batch_size, n))

    def _initialize(self, n_features: int, seed: int) -> None:
        """Build the network with scikit-learn's (Glorot) initialisation."""
        sizes = [n_features, *self._hidden, self._n_outputs_for_model()]
        model = MLP(
            sizes,
            activation=_ACTIVATIONS[self.activation],
            dtype=self._dtype,
            seed=derive_seed(seed, 0),
        )
        rng = np.random.default_rng(derive_seed(seed, 1))
        factor = 2.0 if self.activation == "logistic" else 6.0
        linears = [layer for layer in model if hasattr(layer, "in_features")]
        for layer in linears:
            bound = math.sqrt(factor / (layer.in_features + layer.out_features))
            layer.weight.data[...] = rng.uniform(-bound, bound, layer.weight.data.shape)
            layer.bias.data[...] = rng.uniform(-bound, bound, layer.bias.data.shape)
        self.model_: Sequential = model
        self._layer_sizes = tuple(sizes)
        self.n_layers_ = len(sizes)
        self._seed = seed
        self._epochs_run = 0
        self.n_iter_ = 0
        self.t_ = 0
        self.loss_curve_: list[float] = []
        self.loss_ = float("nan")
        self.best_loss_: float | None = np.inf
        self.validation_scores_: list[float] | None = None
        self.best_validation_score_: float | None = None
        self._batch = 1
        self._optimizer: optim.Optimizer | None = None

    def _l2_term(self, n_samples: int, batch: int) -> float:
        if not self.alpha:
            return 0.0
        total = sum(
            float(np.dot(layer.weight.data.ravel().astype(np.float64), layer.weight.data.ravel()))
            for layer in self.model_
            if hasattr(layer, "in_features")
        )
        return 0.5 * float(self.alpha) * total * math.ceil(n_samples / batch) / n_samples

    def _one_epoch(
        self, X: np.ndarray, Y: np.ndarray, batch: int, dist: _Distributed | None = None
    ) -> float:
        """One epoch in fastbp's C loop; returns the loss in scikit-learn's convention.
        ``dist``: train data-parallel over its communicator (every rank gets rank 0's loss)."""
        if self._optimizer is None or self._batch != batch:
            if self._optimizer is None:
                self._optimizer = self._make_optimizer(batch)
            self._optimizer.param_groups[0]["weight_decay"] = (
                self._grad_scale() * float(self.alpha) / batch
            )
            self._batch = batch
        with self.model_._known_finite(X):  # checked by _validate_X
            history = self.model_.fit(
                X,
                Y,
                loss=self._loss_name,
                optimizer=self._optimizer,
                epochs=1,
                batch_size=batch,
                shuffle=bool(self.shuffle),
                seed=derive_seed(self._seed, 2, self._epochs_run),
                **(dist.fit_kwargs() if dist is not None else {}),
            )
        self._epochs_run += 1
        self.n_iter_ += 1
        self.t_ += X.shape[0]
        loss = history["loss"][0] / self._loss_scale + self._l2_term(X.shape[0], batch)
        if dist is not None:  # the stopping rule must decide the same on every rank
            loss = dist.from_rank0(loss)
        self.loss_ = loss
        self.loss_curve_.append(loss)
        if self.verbose and (dist is None or dist.reporting):
            print(f"Iteration {self.n_iter_}, loss = {loss:.8f}")
        return loss

    def _split(self, y_encoded: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Train/validation row indices for early stopping (stratified for the classifier)."""
        rng = np.random.default_rng(derive_seed(seed, 3))
        n_val = math.ceil(float(self.validation_fraction) * n)
        if self._estimator_type == "classifier":
            groups = [np.flatnonzero(y_encoded == c) for c in np.unique(y_encoded)]
            exact = np.array([len(g) for g in groups]) * (n_val / n)
            take = np.floor(exact).astype(int)
            for i in np.argsort(-(exact - take), kind="stable")[: n_val - take.sum()]:
                take[i] += 1
            val = np.concatenate(
                [rng.permutation(g)[:k] for g, k in zip(groups, take, strict=True)]
            )
        else:
            val = rng.permutation(n)[:n_val]
        if len(val) < 2 or len(val) >= n:
            raise ValueError(
                f"The validation set is too small or too large ({len(val)} of {n} samples). "
                "Change 'validation_fraction' or use more data."
            )
        mask = np.zeros(n, dtype=bool)
        mask[val] = True
        return np.flatnonzero(~mask), np.flatnonzero(mask)

    def _fit(
        self,
        X: object,
        y: object,
        incremental: bool,
        classes: object = None,
        dist: _Distributed | None = None,
    ) -> _BaseMLP:
        self._validate_params()
        first = not (incremental and self.__sklearn_is_fitted__())
        if incremental and self.early_stopping:
            raise ValueError("partial_fit does not support early_stopping=True")
        if not first and self.model_.dtype != self._dtype:
            raise ValueError("dtype cannot change between partial_fit calls; call fit instead")
        Xa = self._validate_X(X, reset=first)
        Y = self._encode_y(y, Xa.shape[0], reset=first, classes=classes)
        with _thread_limit(self.n_threads):
            if first:
                seed = _seed_from(self.random_state)
                if dist is not None:  # random_state=None draws per rank: take rank 0's
                    seed = dist.from_rank0(seed)
                self._initialize(Xa.shape[1], seed)
            if incremental:
                self._one_epoch(Xa, Y, self._batch_for(Xa.shape[0], stacklevel=3), dist)
                return self
            self._train(Xa, Y, dist)
        return self

    def _train(self, Xa: np.ndarray, Y: np.ndarray, dist: _Distributed | None = None) -> None:
        no_improvement = 0
        if self.early_stopping:
            train, val = self._split(Y, Xa.shape[0], self._seed)
            X_val, Y_val = Xa[val], Y[val]
            Xa, Y = np.ascontiguousarray(Xa[train]), np.ascontiguousarray(Y[train])
            self.validation_scores_ = []
            self.best_validation_score_ = -np.inf
            self.best_loss_ = None
            best_weights = self.model_.state_dict()
        batch = self._batch_for(Xa.shape[0], stacklevel=4)
        for _ in range(int(self.max_iter)):
            loss = self._one_epoch(Xa, Y, batch, dist)
            if self.early_stopping:
                score = self._score_arrays(X_val, Y_val)
                if dist is not None:
                    score = dist.from_rank0(score)
                self.validation_scores_.append(score)
                if self.verbose and (dist is None or dist.reporting):
                    print(f"Validation score: {score:f}")
                no_improvement = (
                    no_improvement + 1 if score < self.best_validation_score_ + self.tol else 0
                )
                if score > self.best_validation_score_:
                    self.best_validation_score_ = score
                    best_weights = self.model_.state_dict()
            else:
                no_improvement = no_improvement + 1 if loss > self.best_loss_ - self.tol else 0
                self.best_loss_ = min(self.best_loss_, loss)
            if no_improvement > self.n_iter_no_change:
                if self.verbose and (dist is None or dist.reporting):
                    what = "Validation score" if self.early_stopping else "Training loss"
                    print(
                        f"{what} did not improve more than tol={self.tol:f} for "
                        f"{self.n_iter_no_change} consecutive epochs. Stopping."
                    )
                break
        else:
            _warn(
                ConvergenceWarning,
                f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                "optimization hasn't converged yet.",
                stacklevel=4,  # _train, _fit, fit, the caller
            )
        if self.early_stopping:
            self.model_.load_state_dict(best_weights)

    def _forward(self, X: object) -> np.ndarray:
        self._check_fitted()
        Xa = self._validate_X(X, reset=False)
        with _thread_limit(self.n_threads):
            return self.model_.predict(Xa, batch_size=4096)

    # ---- fitted parameters in scikit-learn's layout ----------------------------------------------

    @property
    def coefs_(self) -> list[np.ndarray]:
        """Copies of the weight matrices, shaped ``(fan_in, fan_out)`` as in scikit-learn."""
        self._check_fitted()
        return [layer.weight.data.T.copy() for layer in self.model_ if hasattr(layer, "weight")]

    @property
    def intercepts_(self) -> list[np.ndarray]:
        """Copies of the bias vectors."""
        self._check_fitted()
        return [layer.bias.data.copy() for layer in self.model_ if hasattr(layer, "weight")]


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _real(value: object, name: str, low: float, open_low: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low or (open_low and value == low):
        bound = ">" if open_low else ">="
        raise ValueError(f"{name} must be a finite number {bound} {low}, got {value!r}")
    return value


_SHARED_PARAMS_DOC = """
    Parameters (scikit-learn's names and defaults; see :mod:`fastbp.estimators` for how each
    maps onto fastbp):

    hidden_layer_sizes : int or sequence of int, default (100,)
        Widths of the hidden layers (``()`` gives a linear model).
    activation : {'relu', 'tanh', 'logistic', 'identity'}, default 'relu'
        Hidden-layer activation.
    solver : {'adam', 'sgd'}, default 'adam'
        ``'lbfgs'`` is not supported (``ValueError``).
    alpha : float, default 1e-4
        L2 penalty, applied as optimizer weight decay ``alpha / batch_size`` (biases included,
        unlike scikit-learn).
    batch_size : int or 'auto', default 'auto'
        ``'auto'`` is ``min(200, n_samples)``; larger values are clipped with a warning.
    learning_rate_init : float, default 1e-3
        The (constant) learning rate.
    max_iter : int, default 200
        Maximum number of epochs of ``fit``.
    shuffle : bool, default True
        Shuffle the rows every epoch.
    random_state : int, None, Generator or RandomState, default None
        Seeds the initial weights, the batch order and the early-stopping split.
    tol : float, default 1e-4
        Improvement threshold of the stopping rule.
    verbose : bool, default False
        Print the loss (and validation score) after each epoch.
    momentum : float, default 0.9
        SGD momentum.
    nesterovs_momentum : bool, default True
        Nesterov momentum for SGD (when ``momentum > 0``).
    early_stopping : bool, default False
        Hold out ``validation_fraction`` of the training rows and stop on their score; the best
        epoch's weights are kept.
    validation_fraction : float, default 0.1
        Share of the rows held out for early stopping.
    beta_1, beta_2, epsilon : float, defaults 0.9, 0.999, 1e-8
        Adam's parameters.
    n_iter_no_change : int, default 10
        Epochs without ``tol`` improvement before stopping.
    n_threads : int or None, default None
        fastbp threads while training or predicting (``None``: leave the setting alone).
    dtype : 'float32' or 'float64', default 'float32'
        Precision of the weights and of training.

    Fitted attributes: ``n_features_in_``, ``n_outputs_``, ``n_layers_``, ``n_iter_``, ``t_``,
    ``loss_``, ``loss_curve_``, ``best_loss_``, ``validation_scores_``,
    ``best_validation_score_``, ``out_activation_``, ``coefs_`` / ``intercepts_`` (copies, in
    scikit-learn's layout) and ``model_`` (the underlying :class:`fastbp.Sequential`).
"""


class MLPClassifier(_BaseMLP):
    """Multi-layer perceptron classifier trained with softmax cross-entropy.

    Labels may be of any sortable type (ints, strings, ...): ``classes_`` holds them
    (``np.unique``) and the network is trained on their indices. The output layer has one unit
    per class with a softmax, also for two classes (scikit-learn uses a single logistic unit
    there; the models are equivalent). ``predict_proba`` is the softmax of the output logits,
    computed in float64; ``score`` is the accuracy.
    """

    __doc__ = (__doc__ or "") + _SHARED_PARAMS_DOC
    _estimator_type = "classifier"
    _loss_name = "cross_entropy"
    _loss_scale = 1.0

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import ClassifierTags

        tags = super().__sklearn_tags__()
        tags.classifier_tags = ClassifierTags(multi_class=True, multi_label=False)
        return tags

    def _n_outputs_for_model(self) -> int:
        return len(self.classes_)

    def _encode_y(self, y: object, n: int, reset: bool, classes: object = None) -> np.ndarray:
        if y is None:
            raise ValueError(
                f"{type(self).__name__} requires y to be passed, but the target y is None"
            )
        if _is_sparse(y):
            raise TypeError("Sparse data was passed for y, but fastbp needs dense labels")
        arr = np.asarray(y)
        if arr.ndim == 2 and arr.shape[1] == 1:
            _warn(
                DataConversionWarning,
                "A column-vector y was passed when a 1d array was expected. Please change the "
                "shape of y to (n_samples,), for example using ravel().",
                stacklevel=4,  # _encode_y, _fit, fit, the caller
            )
            arr = arr.ravel()
        if arr.ndim != 1:
            raise ValueError(
                f"y should be a 1d array of class labels, got an array of shape {arr.shape} "
                "(multilabel and multioutput classification are not supported)"
            )
        if arr.shape[0] != n:
            raise ValueError(
                f"Found input variables with inconsistent numbers of samples: [{n}, {arr.shape[0]}]"
            )
        if arr.dtype.kind == "c":
            raise ValueError("Unknown label type: complex labels are not supported")
        if arr.dtype.kind == "f":
            if not _all_finite(arr):
                raise ValueError("Input y contains NaN or infinity.")
            if np.any(arr != np.round(arr)):
                raise ValueError(
                    "Unknown label type: 'continuous'. MLPClassifier needs class labels; "
                    "use MLPRegressor for continuous targets"
                )
        if arr.dtype == object:
            kinds = {type(v) for v in arr.ravel()}
            if any(k is float or issubclass(k, np.floating) for k in kinds):
                values = np.array([v for v in arr if isinstance(v, (float, np.floating))])
                if not np.isfinite(values).all():
                    raise ValueError("Input y contains NaN.")
        if reset:
            if classes is not None:
                labels = np.unique(np.asarray(classes))
            else:
                try:
                    labels = np.unique(arr)
                except TypeError as exc:
                    raise ValueError(
                        f"Unknown label type: labels must be sortable ({exc})"
                    ) from None
            self.classes_ = labels
            self.n_outputs_ = 1
            self.out_activation_ = "softmax"
        elif classes is not None and not np.array_equal(
            np.unique(np.asarray(classes)), self.classes_
        ):
            raise ValueError(
                f"classes={np.asarray(classes)!r} is not the same as on the first call to "
                f"partial_fit, which was {self.classes_!r}"
            )
        index = np.searchsorted(self.classes_, arr)
        index = np.clip(index, 0, len(self.classes_) - 1)
        unknown = self.classes_[index] != arr
        if np.any(unknown):
            raise ValueError(
                f"y contains labels not in classes_ {self.classes_!r}: {np.unique(arr[unknown])!r}"
            )
        return index.astype(np.int64)

    def fit(
        self,
        X: object,
        y: object,
        *,
        comm: object = None,
        deterministic: bool = False,
        overlap: bool = False,
    ) -> MLPClassifier:
        """Train from scratch for up to ``max_iter`` epochs (see the stopping rule).

        ``comm`` (an mpi4py communicator; every rank calls fit with the same data and
        parameters) trains data-parallel as :meth:`fastbp.Sequential.fit` does, with
        ``deterministic`` and ``overlap`` as there: ``batch_size`` is the global batch, every rank
        ends with the same weights, and rank 0 alone prints."""
        return self._fit(X, y, incremental=False, dist=_distributed(comm, deterministic, overlap))

    def partial_fit(
        self,
        X: object,
        y: object,
        classes: object = None,
        *,
        comm: object = None,
        deterministic: bool = False,
        overlap: bool = False,
    ) -> MLPClassifier:
        """One epoch over ``(X, y)``. The first call must pass ``classes`` (every label that
        will ever occur), as in scikit-learn; later calls keep the weights and the optimizer.
        ``comm``, ``deterministic``, ``overlap``: as in :meth:`fit`."""
        if not self.__sklearn_is_fitted__() and classes is None:
            raise ValueError("classes must be passed on the first call to partial_fit.")
        return self._fit(
            X,
            y,
            incremental=True,
            classes=classes,
            dist=_distributed(comm, deterministic, overlap),
        )

    def _logits(self, X: object) -> np.ndarray:
        return self._forward(X).astype(np.float64)

    def predict_proba(self, X: object) -> np.ndarray:
        """Class probabilities ``(n_samples, n_classes)``, columns in ``classes_`` order."""
        z = self._logits(X)
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)
        return z

    def predict_log_proba(self, X: object) -> np.ndarray:
        """Log of :meth:`predict_proba`, computed stably from the logits."""
        z = self._logits(X)
        z -= z.max(axis=1, keepdims=True)
        z -= np.log(np.exp(z).sum(axis=1, keepdims=True))
        return z

    def predict(self, X: object) -> np.ndarray:
        """The most probable class label of each row."""
        self._check_fitted()
        return self.classes_[np.argmax(self._logits(X), axis=1)]

    def _score_arrays(self, X: np.ndarray, y_encoded: np.ndarray) -> float:
        with self.model_._known_finite(X):  # a part of the checked training X
            logits = self.model_.predict(X, batch_size=4096)
        return float(np.mean(np.argmax(logits, axis=1) == y_encoded))

    def score(self, X: object, y: object, sample_weight: object = None) -> float:
        """Mean accuracy of :meth:`predict` on ``(X, y)`` (weighted by ``sample_weight``)."""
        pred = self.predict(X)
        truth = np.asarray(y)
        if truth.ndim == 2 and truth.shape[1] == 1:
            truth = truth.ravel()
        if truth.shape != pred.shape:
            raise ValueError(f"y must have shape {pred.shape}, got {truth.shape}")
        weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        return float(np.average(pred == truth, weights=weights))


class MLPRegressor(_BaseMLP):
    """Multi-layer perceptron regressor trained with squared error, identity output.

    ``y`` may be 1-D or 2-D (``n_outputs_`` columns); ``predict`` returns 1-D for a single
    output (also when ``y`` was one column, as scikit-learn does). Predictions are computed in
    the model's ``dtype`` and returned as float64, as scikit-learn's regressors do.
    ``score`` is R² (averaged uniformly over outputs).
    """

    __doc__ = (__doc__ or "") + _SHARED_PARAMS_DOC
    _estimator_type = "regressor"
    _loss_name = "mse"
    _loss_scale = 2.0

    def _grad_scale(self) -> float:
        # fastbp: mean over rows and outputs of (p - y)², gradient 2 (p - y) / (n k).
        # scikit-learn: gradient (p - y) / n (its deltas are not divided by the k outputs).
        return 2.0 / self.n_outputs_

    def __sklearn_tags__(self) -> Any:
        from sklearn.utils import RegressorTags

        tags = super().__sklearn_tags__()
        tags.regressor_tags = RegressorTags()
        tags.target_tags.multi_output = True
        tags.target_tags.single_output = True
        return tags

    def _n_outputs_for_model(self) -> int:
        return self.n_outputs_

    def _encode_y(self, y: object, n: int, reset: bool, classes: object = None) -> np.ndarray:
        arr = _numeric_array(y, "y")
        if arr.ndim == 1:
            arr = arr.reshape(-1, 1)
        if arr.ndim != 2:
            raise ValueError(f"y should be a 1d or 2d array, got shape {arr.shape}")
        if arr.shape[0] != n:
            raise ValueError(
                f"Found input variables with inconsistent numbers of samples: [{n}, {arr.shape[0]}]"
            )
        if arr.shape[1] == 0:
            raise ValueError("y has no outputs (0 columns)")
        _check_finite(arr, "y")
        if reset:
            self.n_outputs_ = arr.shape[1]
            self.out_activation_ = "identity"
        elif arr.shape[1] != self.n_outputs_:
            raise ValueError(f"y has {arr.shape[1]} outputs, the model has {self.n_outputs_}")
        dtype = self._dtype if reset else self.model_.dtype
        out = np.ascontiguousarray(arr, dtype=dtype)
        if dtype != np.float64:
            _check_finite(out, "y (after conversion to float32: values too large)")
        return out

    def fit(
        self,
        X: object,
        y: object,
        *,
        comm: object = None,
        deterministic: bool = False,
        overlap: bool = False,
    ) -> MLPRegressor:
        """Train from scratch for up to ``max_iter`` epochs (see the stopping rule).
        ``comm``, ``deterministic``, ``overlap``: data-parallel training, as in
        :meth:`MLPClassifier.fit`."""
        return self._fit(X, y, incremental=False, dist=_distributed(comm, deterministic, overlap))

    def partial_fit(
        self,
        X: object,
        y: object,
        *,
        comm: object = None,
        deterministic: bool = False,
        overlap: bool = False,
    ) -> MLPRegressor:
        """One epoch over ``(X, y)``; later calls keep the weights and the optimizer.
        ``comm``, ``deterministic``, ``overlap``: as in :meth:`fit`."""
        return self._fit(X, y, incremental=True, dist=_distributed(comm, deterministic, overlap))

    def predict(self, X: object) -> np.ndarray:
        """Predictions ``(n_samples,)`` for one output, else ``(n_samples, n_outputs_)``."""
        out = self._forward(X).astype(np.float64)
        return out.ravel() if out.shape[1] == 1 else out

    def _score_arrays(self, X: np.ndarray, y_encoded: np.ndarray) -> float:
        with self.model_._known_finite(X):  # a part of the checked training X
            pred = self.model_.predict(X, batch_size=4096).astype(np.float64)
        return _r2_score(y_encoded.astype(np.float64), pred, None)

    def score(self, X: object, y: object, sample_weight: object = None) -> float:
        """R² of :meth:`predict` on ``(X, y)``, averaged over outputs."""
        pred = self.predict(X).astype(np.float64)
        truth = _numeric_array(y, "y")
        if truth.reshape(len(truth), -1).shape != pred.reshape(len(pred), -1).shape:
            raise ValueError(f"y must have shape {pred.shape}, got {truth.shape}")
        weights = None if sample_weight is None else np.asarray(sample_weight, dtype=np.float64)
        return _r2_score(truth, pred, weights)
