"""scikit-learn-style estimators: scikit-learn's own estimator checks, parameter mapping,
stopping rules, pickling, thread handling, and accuracy next to scikit-learn's MLPs."""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest

import fastbp
from fastbp.estimators import (
    ConvergenceWarning,
    DataConversionWarning,
    MLPClassifier,
    MLPRegressor,
    NotFittedError,
)

sklearn = pytest.importorskip("sklearn")
from sklearn.base import clone  # noqa: E402
from sklearn.exceptions import ConvergenceWarning as SkConvergenceWarning  # noqa: E402
from sklearn.utils.estimator_checks import parametrize_with_checks  # noqa: E402

# Tiny max_iter values are the point of several tests below.
pytestmark = pytest.mark.filterwarnings("ignore::fastbp.estimators.ConvergenceWarning")

# Small, single-threaded configurations: the checks fit dozens of times on tiny data, where
# one thread is fastest and immune to a loaded machine.
_CHECK_ESTIMATORS = [
    MLPClassifier(
        hidden_layer_sizes=(32,),
        learning_rate_init=0.01,
        max_iter=200,
        random_state=0,
        n_threads=1,
    ),
    MLPRegressor(
        hidden_layer_sizes=(32,),
        learning_rate_init=0.01,
        max_iter=200,
        random_state=0,
        n_threads=1,
    ),
]

_EXPECTED_FAILED: dict[str, dict[str, str]] = {
    "MLPClassifier": {},
    "MLPRegressor": {},
}


def _expected_failed_checks(estimator: object) -> dict[str, str]:
    return _EXPECTED_FAILED[type(estimator).__name__]


with warnings.catch_warnings():
    # "does not inherit from BaseEstimator": by design, fastbp must not need scikit-learn.
    warnings.simplefilter("ignore", UserWarning)
    _parametrize_checks = parametrize_with_checks(
        _CHECK_ESTIMATORS, expected_failed_checks=_expected_failed_checks, xfail_strict=True
    )


@_parametrize_checks
def test_sklearn_estimator_checks(estimator, check):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkConvergenceWarning)
        check(estimator)


# ---- helpers ---------------------------------------------------------------------------------


def _blobs(n: int = 120, n_features: int = 4, n_classes: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=3.0, size=(n_classes, n_features))
    y = rng.integers(0, n_classes, n)
    X = centers[y] + rng.normal(size=(n, n_features))
    return X, y


def _quiet(**kwargs: object) -> dict[str, object]:
    return {"n_threads": 1, "random_state": 0, **kwargs}


# ---- agreement with scikit-learn -------------------------------------------------------------


def test_digits_accuracy_comparable_to_sklearn():
    # Same architecture and hyperparameters on digits (1347 train / 450 test rows). scikit-learn
    # reaches ~0.97; over seeds both land within ~0.01 of each other, so a 0.02 margin (9 test
    # rows) catches a broken mapping (wrong lr, decay or init scale) without flaking.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier as SkMLPClassifier
    from threadpoolctl import threadpool_limits

    X, y = load_digits(return_X_y=True)
    X_train, X_test, y_train, y_test = train_test_split(X / 16.0, y, random_state=0, stratify=y)
    params = {"hidden_layer_sizes": (64,), "learning_rate_init": 0.01, "max_iter": 20}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SkConvergenceWarning)
        ours = MLPClassifier(**_quiet(**params)).fit(X_train, y_train).score(X_test, y_test)
        with threadpool_limits(1):
            theirs = (
                SkMLPClassifier(random_state=0, **params)
                .fit(X_train, y_train)
                .score(X_test, y_test)
            )
    assert theirs > 0.95
    assert ours >= theirs - 0.02, (ours, theirs)


@pytest.mark.parametrize("kind", ["classifier", "regressor-1", "regressor-2"])
def test_sgd_steps_match_sklearn_exactly(kind):
    # From the same weights, in float64, plain SGD: fastbp's updates are scikit-learn's (the
    # loss and gradient scaling of the mapping), batch by batch, and the reported loss too.
    from sklearn.neural_network import MLPClassifier as SkC
    from sklearn.neural_network import MLPRegressor as SkR

    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, 5))
    if kind == "classifier":
        ours_cls, theirs_cls, y, extra = MLPClassifier, SkC, rng.integers(0, 3, 40), {}
        extra = {"classes": [0, 1, 2]}
    else:
        ours_cls, theirs_cls, extra = MLPRegressor, SkR, {}
        y = rng.normal(size=(40, 2)) if kind == "regressor-2" else rng.normal(size=40)
    params = dict(
        hidden_layer_sizes=(7,),
        activation="tanh",
        solver="sgd",
        momentum=0.0,
        alpha=0.0,
        batch_size=10,
        shuffle=False,
        learning_rate_init=0.1,
        random_state=0,
    )
    ours = ours_cls(dtype="float64", n_threads=1, **params).partial_fit(X, y, **extra)
    theirs = theirs_cls(**params).partial_fit(X, y, **extra)
    theirs.coefs_, theirs.intercepts_ = ours.coefs_, ours.intercepts_
    ours.partial_fit(X, y)
    theirs.partial_fit(X, y)
    for a, b in zip(
        ours.coefs_ + ours.intercepts_, theirs.coefs_ + theirs.intercepts_, strict=True
    ):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    assert ours.loss_curve_[-1] == pytest.approx(theirs.loss_curve_[-1], rel=1e-12)


@pytest.mark.parametrize("cls", [MLPClassifier, MLPRegressor])
def test_alpha_is_sklearn_penalty_on_weights_plus_bias_decay(cls):
    # One full-batch SGD step with alpha > 0: the weights get exactly scikit-learn's update;
    # the biases additionally decay by lr * alpha / B * b (documented: fastbp's fused optimizer
    # decays every parameter).
    from sklearn.neural_network import MLPClassifier as SkC
    from sklearn.neural_network import MLPRegressor as SkR

    rng = np.random.default_rng(1)
    X = rng.normal(size=(40, 5))
    is_clf = cls is MLPClassifier
    y = rng.integers(0, 3, 40) if is_clf else rng.normal(size=(40, 3))
    extra = {"classes": [0, 1, 2]} if is_clf else {}
    lr, alpha, n = 0.1, 0.5, 40
    params = dict(
        hidden_layer_sizes=(6,),
        solver="sgd",
        momentum=0.0,
        alpha=alpha,
        batch_size=n,
        shuffle=False,
        learning_rate_init=lr,
        random_state=0,
    )
    ours = cls(dtype="float64", n_threads=1, **params).partial_fit(X, y, **extra)
    theirs = (SkC if is_clf else SkR)(**params).partial_fit(X, y, **extra)
    biases_before = ours.intercepts_
    theirs.coefs_, theirs.intercepts_ = ours.coefs_, ours.intercepts_
    ours.partial_fit(X, y)
    theirs.partial_fit(X, y)
    for a, b in zip(ours.coefs_, theirs.coefs_, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    for a, b, b0 in zip(ours.intercepts_, theirs.intercepts_, biases_before, strict=True):
        np.testing.assert_allclose(a, b - lr * alpha / n * b0, rtol=1e-10, atol=1e-14)
        assert np.abs(a - b).max() > 1e-6  # the documented difference is real


def test_stopping_rule_matches_sklearn():
    # tol so large that no epoch counts as an improvement: both stop after the same number of
    # epochs (the first epoch sets best_loss_, then n_iter_no_change + 1 more).
    from sklearn.neural_network import MLPClassifier as SkC

    X, y = _blobs()
    params = dict(hidden_layer_sizes=(8,), tol=1e9, n_iter_no_change=3, max_iter=50)
    ours = MLPClassifier(**_quiet(**params)).fit(X, y)
    theirs = SkC(random_state=0, **params).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ == 5
    assert len(ours.loss_curve_) == 5
    assert ours.best_loss_ == min(ours.loss_curve_)


# ---- classifier behaviour ----------------------------------------------------------------------


def test_string_labels_binary_probabilities():
    X, y_int = _blobs(n_classes=2)
    labels = np.array(["spam", "ham"])[y_int]
    clf = MLPClassifier(**_quiet(max_iter=100, learning_rate_init=0.01)).fit(X, labels)
    assert list(clf.classes_) == ["ham", "spam"]
    proba = clf.predict_proba(X)
    assert proba.shape == (len(X), 2)  # binary keeps two softmax outputs
    assert proba.dtype == np.float64
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(clf.predict(X), clf.classes_[proba.argmax(axis=1)])
    np.testing.assert_allclose(np.exp(clf.predict_log_proba(X)), proba, rtol=1e-12)
    assert clf.score(X, labels) > 0.95
    assert clf.model_.out_features == 2 and clf.out_activation_ == "softmax"


def test_predict_proba_is_stable_for_huge_logits():
    X, y = _blobs()
    clf = MLPClassifier(**_quiet(hidden_layer_sizes=(), max_iter=1)).fit(X, y)
    clf.model_[0].weight.data[...] *= 1e4  # logits of order 1e4: a naive softmax overflows
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        proba = clf.predict_proba(X)
        log_proba = clf.predict_log_proba(X)
    assert np.isfinite(proba).all() and np.isfinite(log_proba).all()
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)


def test_partial_fit_classifier():
    X, y = _blobs()
    clf = MLPClassifier(**_quiet(learning_rate_init=0.01))
    with pytest.raises(ValueError, match="classes must be passed"):
        clf.partial_fit(X, y)
    clf.partial_fit(X[:60], y[:60], classes=[0, 1, 2])
    for _ in range(9):
        clf.partial_fit(X, y)
    assert clf.n_iter_ == 10 and len(clf.loss_curve_) == 10
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    with pytest.raises(ValueError, match="not in classes_"):
        clf.partial_fit(X, np.full(len(X), 7))
    with pytest.raises(ValueError, match="not the same"):
        clf.partial_fit(X, y, classes=[0, 1])
    with pytest.raises(ValueError, match="early_stopping"):
        MLPClassifier(early_stopping=True).partial_fit(X, y, classes=[0, 1, 2])


def test_early_stopping_keeps_the_best_epoch():
    X, y = _blobs(n=300, seed=3)
    params = _quiet(early_stopping=True, validation_fraction=0.2, n_iter_no_change=2, max_iter=200)
    clf = MLPClassifier(**params).fit(X, y)
    scores = clf.validation_scores_
    assert len(scores) == clf.n_iter_ < 200 and clf.best_loss_ is None
    assert clf.best_validation_score_ == max(scores)
    # Same seed, stopped at the best epoch by max_iter: the same weights (the best ones were
    # restored, not the last ones).
    best_epoch = int(np.argmax(scores)) + 1
    assert best_epoch < clf.n_iter_  # otherwise restoring would be invisible
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        again = MLPClassifier(**{**params, "max_iter": best_epoch}).fit(X, y)
    for a, b in zip(clf.coefs_, again.coefs_, strict=True):
        np.testing.assert_array_equal(a, b)


# ---- regressor behaviour -----------------------------------------------------------------------


def test_regressor_outputs_and_score():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3))
    Y = np.stack([X @ [1.0, -2.0, 0.5], np.sin(X[:, 0])], axis=1)
    reg = MLPRegressor(**_quiet(hidden_layer_sizes=(32,), learning_rate_init=0.01)).fit(X, Y)
    assert reg.n_outputs_ == 2 and reg.predict(X).shape == (200, 2)
    assert reg.predict(X).dtype == np.float64
    assert reg.score(X, Y) > 0.9
    one = MLPRegressor(**_quiet(max_iter=5)).fit(X, Y[:, :1])
    assert one.n_outputs_ == 1 and one.predict(X).shape == (200,)


# ---- the estimator protocol ----------------------------------------------------------------------


def test_params_clone_repr():
    clf = MLPClassifier(hidden_layer_sizes=(5, 3), alpha=0.1)
    params = clf.get_params()
    assert params["hidden_layer_sizes"] == (5, 3) and params["n_threads"] is None
    assert params["dtype"] == "float32"
    assert repr(clf) == "MLPClassifier(alpha=0.1, hidden_layer_sizes=(5, 3))"
    assert clf.set_params(max_iter=7) is clf and clf.max_iter == 7
    with pytest.raises(ValueError, match="Invalid parameter 'nope'"):
        clf.set_params(nope=1)
    copy = clone(clf)
    assert copy is not clf and copy.get_params() == clf.get_params()


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"solver": "lbfgs"}, "lbfgs.*not supported"),
        ({"activation": "softplus"}, "activation"),
        ({"hidden_layer_sizes": (4, 0)}, "hidden_layer_sizes"),
        ({"batch_size": 0}, "batch_size"),
        ({"dtype": "float16"}, "dtype"),
        ({"n_threads": 0}, "n_threads"),
        ({"learning_rate_init": 0.0}, "learning_rate_init"),
        ({"early_stopping": True, "validation_fraction": 1.0}, "validation_fraction"),
    ],
)
def test_invalid_params_fail_at_fit(params, match):
    X, y = _blobs()
    clf = MLPClassifier(**params)  # never at construction (scikit-learn's convention)
    with pytest.raises(ValueError, match=match):
        clf.fit(X, y)


def test_input_validation():
    X, y = _blobs()
    clf = MLPClassifier(**_quiet(max_iter=2))
    with pytest.raises(NotFittedError) as info:
        clf.predict(X)
    assert isinstance(info.value, ValueError) and isinstance(info.value, AttributeError)
    from sklearn.exceptions import NotFittedError as SkNotFittedError

    assert isinstance(info.value, SkNotFittedError)  # bridged while scikit-learn is loaded
    with pytest.raises(ValueError, match=r"reshape\(1, -1\)"):
        clf.fit(X[0], y[:1])
    with pytest.raises(ValueError, match="NaN or infinity"):
        clf.fit(np.where(X > 2, np.nan, X), y)
    import scipy.sparse

    with pytest.raises(TypeError, match="Sparse data"):
        clf.fit(scipy.sparse.csr_matrix(X), y)
    with pytest.warns(DataConversionWarning, match="column-vector"):
        clf.fit(X, y.reshape(-1, 1))
    assert clf.n_features_in_ == 4
    with pytest.raises(ValueError, match="X has 3 features, but MLPClassifier is expecting 4"):
        clf.predict(X[:, :3])
    with pytest.raises(ValueError, match="Unknown label type"):
        clf.fit(X, y + 0.5)
    with pytest.warns(ConvergenceWarning, match="Maximum iterations") as record:
        clf.fit(X, y)
    assert isinstance(record[0].message, SkConvergenceWarning)
    assert record[0].filename == __file__  # points at the caller's fit


def test_pickle_roundtrip_continues_training_identically():
    X, y = _blobs()
    clf = MLPClassifier(**_quiet(solver="sgd", learning_rate_init=0.05, max_iter=5))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X, y)
    copy = pickle.loads(pickle.dumps(clf))
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    clf.partial_fit(X, y)
    copy.partial_fit(X, y)  # momentum buffer and epoch counter travelled with the pickle
    np.testing.assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    assert copy.loss_curve_ == clf.loss_curve_


def test_random_state_determinism_and_dtype():
    X, y = _blobs()
    a = MLPClassifier(**_quiet(max_iter=3)).fit(X, y)
    b = MLPClassifier(**_quiet(max_iter=3)).fit(X, y)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    c = MLPClassifier(max_iter=3, n_threads=1, random_state=None).fit(X, y)
    assert not np.array_equal(a.coefs_[0], c.coefs_[0])
    assert a.model_.dtype == np.float32
    d = MLPClassifier(**_quiet(max_iter=3, dtype="float64")).fit(X, y)
    assert d.model_.dtype == np.float64 and d.coefs_[0].shape == (4, 100)


def test_n_threads_is_set_during_fit_and_restored():
    seen: list[int] = []

    class Spy(MLPClassifier):
        def _one_epoch(self, X, Y, batch, dist=None):
            seen.append(fastbp.get_num_threads())
            return super()._one_epoch(X, Y, batch, dist)

    X, y = _blobs()
    fastbp.set_num_threads(None)
    try:
        default = fastbp.get_num_threads()
        Spy(max_iter=2, n_threads=1, tol=1e9, n_iter_no_change=1).fit(X, y)
        assert seen == [1, 1]
        assert fastbp.get_num_threads() == default
        fastbp.set_num_threads(3)
        Spy(max_iter=1, n_threads=2).partial_fit(X, y, classes=[0, 1, 2])
        assert seen[-1] == 2 and fastbp.get_num_threads() == 3
    finally:
        fastbp.set_num_threads(None)


def test_verbose_prints_each_epoch(capsys):
    X, y = _blobs()
    MLPClassifier(**_quiet(max_iter=3, verbose=True, tol=1e9, n_iter_no_change=5)).fit(X, y)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Iter")]
    assert [line.split(",")[0] for line in lines] == ["Iteration 1", "Iteration 2", "Iteration 3"]


def test_works_without_sklearn():
    # fastbp must not need scikit-learn at run time: block its import in a fresh interpreter.
    code = textwrap.dedent(
        """
        import sys
        sys.modules["sklearn"] = None
        import numpy as np
        from fastbp.estimators import MLPClassifier, MLPRegressor, NotFittedError
        X = np.random.default_rng(0).normal(size=(30, 3))
        y = (X[:, 0] > 0).astype(int)
        clf = MLPClassifier(max_iter=2, n_threads=1, random_state=0).fit(X, y)
        assert clf.predict(X).shape == (30,)
        MLPRegressor(max_iter=2, n_threads=1).fit(X, X[:, 1]).score(X, X[:, 1])
        try:
            MLPRegressor().predict(X)
        except NotFittedError as exc:
            assert type(exc) is NotFittedError
        assert "sklearn" not in {m.split(".")[0] for m in sys.modules if sys.modules[m]}
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_epochs_do_not_rescan_checked_inputs(monkeypatch):
    """The estimator checks X once; its one-epoch fit calls skip the model's NaN/inf scan of
    that same array (a full read of X per epoch), while a direct fit still scans and refuses."""
    import fastbp._model as model_module

    scanned = []
    real = model_module._all_finite
    monkeypatch.setattr(model_module, "_all_finite", lambda a: scanned.append(a.shape) or real(a))
    rng = np.random.default_rng(0)
    X = rng.standard_normal((120, 9)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    for kwargs in ({}, {"early_stopping": True}):
        scanned.clear()
        clf = fastbp.MLPClassifier(hidden_layer_sizes=(40,), max_iter=3, random_state=0, **kwargs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # max_iter reached
            clf.fit(X, y)
        assert clf.n_iter_ == 3
        assert not [s for s in scanned if s[1] == 9], scanned
        assert clf.model_._finite_arrays == ()  # only for the duration of each epoch
        if not kwargs:  # partial_fit refuses early stopping
            clf.partial_fit(X, y)
            assert not [s for s in scanned if s[1] == 9], scanned
    scanned.clear()
    model = clf.model_
    model.fit(X, y, loss="cross_entropy", epochs=1)
    assert scanned.count((120, 9)) == 1
    bad = X.copy()
    bad[7, 3] = np.nan
    with model._known_finite(X), pytest.raises(ValueError, match="NaN or infinity"):
        model.fit(bad, y, loss="cross_entropy")  # another array: scanned
