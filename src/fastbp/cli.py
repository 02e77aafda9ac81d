"""The ``fastbp`` command line (also ``python -m fastbp``): train, predict, bench, info.

``fastbp train`` with no arguments trains an MLP on the bundled 8×8 digits in a few seconds and
ends with ``test accuracy: NN.NN%``. Mistakes (a bad option, a missing file, a data set that is
not installed) end with one line on stderr and a non-zero exit status, never a traceback; set
``FASTBP_DEBUG=1`` to see the traceback anyway.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np

__all__ = ["CLIError", "build_parser", "main"]

PROG = "fastbp"
NAMED_DATA = ("digits", "fashion-mnist", "mnist")
_HOLDOUT_FRACTION = 0.2
_HOLDOUT_SEED = 0  # the held-out split is fixed: train and predict see the same test rows

_DATA_HELP = (
    "digits (bundled 8x8 digits, 1,797 images; 20%% held out for testing), fashion-mnist, "
    "mnist (28x28 IDX files: see 'fastbp train --help' below), or a PATH: a folder of IDX files "
    "(train-images-idx3-ubyte[.gz] + train-labels-idx1-ubyte[.gz], and the t10k- pair as the "
    "test split), an .npz with arrays X and y (and optionally X_test, y_test), or a .csv[.gz] "
    "with the features first and the integer label in the last column (an optional header row "
    "is skipped). uint8 images are scaled to [0, 1]; other features are used as they are. "
    "Without a test split, a fixed 20%% of the rows is held out. Default: %(default)s"
)

_EPILOG_DATA = """\
data sets:
  digits         bundled with fastbp (UCI optdigits, CC BY 4.0): nothing to install
  fashion-mnist  $FASHION_MNIST_DIR, else /usr/share/datasets/fashion-mnist
                 (sudo apt-get install dataset-fashion-mnist)
  mnist          $MNIST_DIR, else /usr/share/datasets/mnist (download the four IDX files
                 and set MNIST_DIR)
"""


class CLIError(Exception):
    """A user mistake: printed as one line on stderr, exit status 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (and the hint to ask for --help)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# ---- argument types ------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _nonnegative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _float_in(low: float, high: float, *, low_open: bool, high_open: bool) -> Callable:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        too_low = value <= low if low_open else value < low
        too_high = value >= high if high_open else value > high
        if not np.isfinite(value) or too_low or too_high:
            lo = "(" if low_open else "["
            hi = ")" if high_open else "]"
            raise argparse.ArgumentTypeError(
                f"expected a number in {lo}{low:g}, {high:g}{hi}, got {text!r}"
            )
        return value

    return parse


_positive_float = _float_in(0.0, float("inf"), low_open=True, high_open=True)
_nonnegative_float = _float_in(0.0, float("inf"), low_open=False, high_open=True)
_dropout = _float_in(0.0, 1.0, low_open=False, high_open=True)


def _hidden_sizes(text: str) -> list[int]:
    """``256,128`` → [256, 128]; ``none`` or an empty string → no hidden layer."""
    if text.strip().lower() in ("", "none", "0"):
        return []
    try:
        sizes = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer widths such as 256,128, got {text!r}"
        ) from None
    if any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"layer widths must be positive, got {text!r}")
    return sizes


# ---- the parser -------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``fastbp`` and its subcommands (what ``--help`` prints)."""
    import fastbp

    parser = _Parser(
        prog=PROG,
        description="fastbp: fast CPU training of fully-connected networks (MLPs).",
        epilog="With no command: the configuration (as 'fastbp info') and how to start. "
        "Run 'fastbp COMMAND --help' for a command's options.",
    )
    parser.add_argument("--version", action="version", version=f"fastbp {fastbp.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    parser.subparsers = sub  # type: ignore[attr-defined]

    fmt = argparse.RawDescriptionHelpFormatter
    train = sub.add_parser(
        "train",
        help="train an MLP classifier (default: the bundled digits) and report test accuracy",
        description="Train an MLP classifier and report its accuracy on a held-out test split. "
        "Prints per-epoch loss, test accuracy, time and samples/s under a progress bar, and "
        "ends with 'test accuracy: NN.NN%%'.",
        epilog=_EPILOG_DATA,
        formatter_class=fmt,
    )
    train.add_argument("--data", default="digits", metavar="NAME|PATH", help=_DATA_HELP)
    train.add_argument(
        "--hidden",
        type=_hidden_sizes,
        default=[256, 128],
        metavar="N,N,...",
        help="hidden layer widths, comma-separated; 'none' for a linear model (default: 256,128)",
    )
    train.add_argument(
        "--activation",
        choices=("relu", "sigmoid", "tanh"),
        default="relu",
        help="hidden activation (default: %(default)s)",
    )
    train.add_argument(
        "--dropout",
        type=_dropout,
        default=0.0,
        metavar="P",
        help="dropout probability after each hidden activation, in [0, 1) (default: %(default)s)",
    )
    train.add_argument(
        "--epochs",
        type=_nonnegative_int,
        default=None,
        metavar="N",
        help="passes over the training data (default: 20 for digits, 5 otherwise)",
    )
    train.add_argument(
        "--batch-size",
        type=_positive_int,
        default=None,
        metavar="N",
        help="samples per optimizer step (default: 32 for digits, 128 otherwise)",
    )
    train.add_argument(
        "--optimizer",
        choices=("sgd", "adam", "adamw"),
        default="adam",
        help="optimizer, with torch's update rules (default: %(default)s)",
    )
    train.add_argument(
        "--lr",
        type=_positive_float,
        default=None,
        metavar="LR",
        help="learning rate (default: 0.1 for sgd, 0.001 for adam and adamw)",
    )
    train.add_argument(
        "--momentum",
        type=_nonnegative_float,
        default=None,
        metavar="M",
        help="SGD momentum (sgd only; default: 0)",
    )
    train.add_argument(
        "--weight-decay",
        type=_nonnegative_float,
        default=None,
        metavar="WD",
        help="weight decay: L2 for sgd and adam, decoupled for adamw (default: 0; adamw 0.01)",
    )
    _add_threads(train)
    train.add_argument(
        "--seed",
        type=_nonnegative_int,
        default=0,
        metavar="N",
        help="seed of the initial weights, batch order and dropout masks; the same seed gives "
        "the same model, whatever the thread count (default: %(default)s)",
    )
    train.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="FILE",
        help="write the trained model to FILE (safetensors; 'fastbp predict' and fastbp.load "
        "read it, so does torch)",
    )
    train.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE",
        help="draw training loss and test accuracy per epoch to FILE (e.g. curves.png); needs "
        "matplotlib: pip install 'fastbp[plot]'",
    )
    train.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="print only the final 'test accuracy' line (errors still go to stderr)",
    )
    train.add_argument(
        "--distributed",
        action="store_true",
        help="data-parallel training over MPI (mpi4py's COMM_WORLD): launch with "
        "'mpirun -n N fastbp train --distributed ...'; --batch-size is the global batch, split "
        "over the ranks; rank 0 alone prints and saves. Needs pip install 'fastbp[mpi]'",
    )

    predict = sub.add_parser(
        "predict",
        help="predict with a saved model; print accuracy when the data have labels",
        description="Run a saved model on data and write one prediction per line (the class "
        "index, or the output value for a one-output model) to --output. When the data have "
        "labels, print 'accuracy: NN.NN%%'. Uses the test split of digits, fashion-mnist, mnist "
        "and IDX folders (t10k files), X_test of an .npz that has it, otherwise every row. A CSV "
        "with one more column than the model has inputs is read as features + label.",
        epilog=_EPILOG_DATA,
        formatter_class=fmt,
    )
    predict.add_argument(
        "--model",
        type=Path,
        required=True,
        metavar="FILE",
        help="a model saved by 'fastbp train --save'",
    )
    predict.add_argument(
        "--data",
        default="digits",
        metavar="NAME|PATH",
        help="as for 'fastbp train' (default: %(default)s)",
    )
    predict.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("predictions.csv"),
        metavar="FILE",
        help="where to write the predictions, one per line (default: %(default)s)",
    )
    predict.add_argument(
        "--batch-size",
        type=_positive_int,
        default=1024,
        metavar="N",
        help="rows per forward pass (default: %(default)s)",
    )
    _add_threads(predict)
    predict.add_argument("--quiet", "-q", action="store_true", help="print only the accuracy line")

    bench = sub.add_parser(
        "bench",
        help="the benchmark report against NumPy and torch (fastbp.bench)",
        description="Run the benchmark report (the same as 'python -m fastbp.bench'); every "
        "argument after 'bench' is passed on to it.",
        add_help=False,
    )
    bench.add_argument("--quick", action="store_true", help="a shorter run with fewer repeats")
    bench.add_argument("-h", "--help", action="store_true", help="the report's own options")

    parser.bench_parser = bench  # type: ignore[attr-defined]  # its help, when fastbp.bench is absent

    info = sub.add_parser(
        "info",
        help="version, instruction set, threads and OpenMP runtime (fastbp.show_config())",
        description="Print the configuration: version, chosen and available instruction sets, "
        "threads, OpenMP runtime (the same as fastbp.show_config()).",
    )
    info.add_argument(
        "--check",
        action="store_true",
        help="also check a 512^3 GEMM against NumPy and report its speed",
    )
    return parser


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help="OpenMP threads for the kernels (default: OMP_NUM_THREADS or all cores)",
    )


# ---- data ---------------------------------------------------------------------------------------


@dataclass
class _Data:
    """Float32 features ready for the model, int64 labels (None where the data have none)."""

    name: str
    X_train: np.ndarray | None
    y_train: np.ndarray | None
    X_test: np.ndarray
    y_test: np.ndarray | None
    test_is_holdout: bool = False


def _features(X: np.ndarray, digits: bool = False) -> np.ndarray:
    from . import datasets

    if digits:
        return X.astype(np.float32) / np.float32(16)
    if X.dtype == np.uint8:
        return datasets.scale_and_flatten(X)
    return np.ascontiguousarray(X.reshape(X.shape[0], -1), dtype=np.float32)


def _holdout(X: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, ...]:
    """A fixed 20% of the rows as the test split (the same for train and predict)."""
    n = X.shape[0]
    if n < 2:
        raise CLIError(f"only {n} sample: too few to hold some out for testing")
    order = np.random.default_rng(_HOLDOUT_SEED).permutation(n)
    n_test = max(1, round(n * _HOLDOUT_FRACTION))
    test, train = order[:n_test], order[n_test:]
    return X[train], y[train], X[test], y[test]


def _load_data(spec: str, *, test_only: bool = False) -> _Data:
    """Resolve ``--data``. With ``test_only`` (predict), labels may be missing."""
    from . import datasets

    if spec == "digits":
        X, y = datasets.load_digits()
        X_train, y_train, X_test, y_test = _holdout(_features(X, digits=True), y)
        return _Data("digits", X_train, y_train, X_test, y_test, test_is_holdout=True)
    if spec in ("fashion-mnist", "mnist"):
        loader = datasets.load_fashion_mnist if spec == "fashion-mnist" else datasets.load_mnist
        X_test, y_test = loader(kind="test")
        X_train = y_train = None
        if not test_only:
            X_train, y_train = loader(kind="train")
            X_train = _features(X_train)
        return _Data(spec, X_train, y_train, _features(X_test), y_test)

    path = Path(spec)
    if not path.exists():
        raise CLIError(
            f"--data {spec}: no such file or folder (expected {', '.join(NAMED_DATA)} or a path "
            "to an IDX folder, an .npz or a .csv file)"
        )
    name = path.name
    if path.is_dir():
        return _load_idx_folder(path, test_only)
    suffixes = "".join(path.suffixes[-2:]).lower()
    if path.suffix.lower() == ".npz":
        has_test = datasets._npz_has_test_split(path)
        if test_only:
            X, y = datasets.load_npz(
                path, split="test" if has_test else "train", labels_required=False
            )
            return _Data(name, None, None, _features(X), y)
        X, y = datasets.load_npz(path)
        if has_test:
            X_test, y_test = datasets.load_npz(path, split="test")
            return _Data(name, _features(X), y, _features(X_test), y_test)
        return _Data(name, *_holdout(_features(X), y), test_is_holdout=True)
    if path.suffix.lower() == ".csv" or suffixes.endswith(".csv.gz"):
        if test_only:
            X, _ = datasets.load_csv(path, has_labels=False)
            return _Data(name, None, None, X, None)  # predict splits the label off if present
        X, y = datasets.load_csv(path)
        return _Data(name, *_holdout(X, y), test_is_holdout=True)
    raise CLIError(
        f"--data {spec}: unsupported file type (expected a folder of IDX files, an .npz or a .csv)"
    )


def _load_idx_folder(path: Path, test_only: bool) -> _Data:
    from . import datasets

    has_test = datasets._idx_file(path, "t10k", "images", 3) is not None
    has_train = datasets._idx_file(path, "train", "images", 3) is not None
    if not (has_test or has_train):
        raise CLIError(
            f"--data {path}: the folder holds no IDX files (train-images-idx3-ubyte[.gz] with "
            "train-labels-idx1-ubyte[.gz], optionally the t10k- pair)"
        )
    if test_only:
        X, y = datasets.load_idx_folder(
            path, "test" if has_test else "train", labels_required=False
        )
        return _Data(path.name, None, None, _features(X), y)
    if not has_train:
        raise CLIError(f"--data {path}: no train-images-idx3-ubyte[.gz] file to train on")
    X, y = datasets.load_idx_folder(path, "train")
    if has_test:
        X_test, y_test = datasets.load_idx_folder(path, "test")
        return _Data(path.name, _features(X), y, _features(X_test), y_test)
    return _Data(path.name, *_holdout(_features(X), y), test_is_holdout=True)


# ---- train ---------------------------------------------------------------------------------------


def _check_output_path(path: Path | None, option: str) -> None:
    if path is None:
        return
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise CLIError(f"{option} {path}: the folder {parent} does not exist")
    if path.is_dir():
        raise CLIError(f"{option} {path}: is a folder, expected a file name")


def _require_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError(
            "--plot needs matplotlib, which is not installed: pip install 'fastbp[plot]' "
            "(or pip install matplotlib)"
        ) from None


def _make_optimizer(args: argparse.Namespace, params: list) -> object:
    from . import optim

    kwargs: dict[str, float] = {}
    if args.weight_decay is not None:
        kwargs["weight_decay"] = args.weight_decay
    if args.optimizer == "sgd":
        lr = args.lr if args.lr is not None else 0.1
        return optim.SGD(params, lr=lr, momentum=args.momentum or 0.0, **kwargs)
    lr = args.lr if args.lr is not None else 1e-3
    cls = optim.Adam if args.optimizer == "adam" else optim.AdamW
    return cls(params, lr=lr, **kwargs)


class _Progress:
    """fit callback: one line per epoch above a tqdm bar (the bar only on a terminal)."""

    def __init__(self, epochs: int, quiet: bool) -> None:
        from tqdm.auto import tqdm

        self.epochs = epochs
        self.quiet = quiet
        self.write = tqdm.write
        self.bar = tqdm(
            total=epochs,
            unit="epoch",
            desc="training",
            disable=True if quiet else None,  # None: off when stderr is not a terminal
            leave=False,
            dynamic_ncols=True,
        )

    def on_epoch_end(self, epoch: int, logs: dict[str, float]) -> None:
        acc = logs.get("val_accuracy", float("nan"))
        if not self.quiet:
            width = len(str(self.epochs))
            self.write(
                f"epoch {epoch + 1:>{width}}/{self.epochs}  loss {logs['loss']:.4f}  "
                f"test acc {acc:7.2%}  {logs['time']:7.3f} s  "
                f"{logs['samples_per_sec']:>11,.0f} samples/s",
                file=sys.stdout,
            )
        self.bar.set_postfix(loss=f"{logs['loss']:.4f}", acc=f"{acc:.2%}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


def _plot_curves(history: object, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    epochs = np.arange(1, len(history["loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, history["loss"], marker="o", label="training loss")
    ax_loss.plot(epochs, history["val_loss"], marker="o", label="test loss")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, np.asarray(history["val_accuracy"]) * 100, marker="o", color="C2")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="test accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mpi_world() -> object:
    """mpi4py's COMM_WORLD, or a CLIError naming the missing extra."""
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise CLIError(
            f"--distributed needs mpi4py and an MPI library ({exc}): pip install 'fastbp[mpi]'"
        ) from None
    return MPI.COMM_WORLD


def _cmd_train(args: argparse.Namespace) -> int:
    import fastbp

    comm = _mpi_world() if args.distributed else None
    rank0 = comm is None or comm.Get_rank() == 0
    quiet = args.quiet or not rank0
    say = (lambda *a, **k: None) if quiet else print
    _check_output_path(args.save, "--save")
    _check_output_path(args.plot, "--plot")
    if args.plot is not None:
        _require_matplotlib()
    if args.momentum is not None and args.optimizer != "sgd":
        raise CLIError(
            f"--momentum applies to --optimizer sgd only (got --optimizer {args.optimizer})"
        )
    if args.threads is not None:
        fastbp.set_num_threads(args.threads)

    data = _load_data(args.data)
    assert data.X_train is not None and data.y_train is not None and data.y_test is not None
    n_train, n_features = data.X_train.shape
    n_classes = int(max(data.y_train.max(), data.y_test.max())) + 1
    if n_classes < 2:
        raise CLIError(f"--data {args.data}: the labels hold a single class; nothing to classify")
    if data.X_test.shape[1] != n_features:
        raise CLIError(
            f"--data {args.data}: the test split has {data.X_test.shape[1]} features, the "
            f"training split {n_features}"
        )
    small = data.name == "digits"
    epochs = args.epochs if args.epochs is not None else (20 if small else 5)
    batch_size = min(args.batch_size or (32 if small else 128), n_train)

    sizes = [n_features, *args.hidden, n_classes]
    model = fastbp.MLP(sizes, activation=args.activation, dropout=args.dropout, seed=args.seed)
    opt = _make_optimizer(args, model.parameters())
    group = opt.param_groups[0]
    split = "held out" if data.test_is_holdout else "test"
    say(
        f"data      {data.name}: {n_train:,} train / {data.X_test.shape[0]:,} {split}, "
        f"{n_features} features, {n_classes} classes"
    )
    say(
        f"model     MLP {'-'.join(map(str, sizes))}, {args.activation}"
        + (f", dropout {args.dropout:g}" if args.dropout else "")
        + f" ({model.num_parameters():,} parameters)"
    )
    say(
        f"training  {epochs} epoch{'s' if epochs != 1 else ''}, batch {batch_size}, {args.optimizer} lr {group['lr']:g}"
        + (f" momentum {group['momentum']:g}" if group.get("momentum") else "")
        + (f" weight decay {group['weight_decay']:g}" if group.get("weight_decay") else "")
        + f", seed {args.seed}, {fastbp.get_num_threads()} threads ({fastbp.get_config()['isa']})"
        + (f", distributed over {comm.Get_size()} ranks" if comm is not None else "")
    )

    progress = _Progress(epochs, quiet)
    t0 = time.perf_counter()
    try:
        history = model.fit(
            data.X_train,
            data.y_train,
            loss="cross_entropy",
            optimizer=opt,
            epochs=epochs,
            batch_size=batch_size,
            seed=args.seed,
            validation_data=(data.X_test, data.y_test),
            callbacks=[progress],
            comm=comm,
        )
    finally:
        progress.close()
    elapsed = time.perf_counter() - t0
    result = model.evaluate(data.X_test, data.y_test)
    if epochs:
        say(
            f"trained in {elapsed:.2f} s ({epochs * n_train / elapsed:,.0f} samples/s overall, "
            "test evaluation included)"
        )
    if not rank0:  # identical weights on every rank: rank 0 saves, plots and reports
        return 0
    if args.save is not None:
        fastbp.save(model, args.save)
        say(f"saved model to {args.save}")
    if args.plot is not None:
        if epochs:
            _plot_curves(
                history, args.plot, f"fastbp: MLP {'-'.join(map(str, sizes))} on {data.name}"
            )
            say(f"saved curves to {args.plot}")
        else:
            say("--plot: no epochs trained, nothing to plot")
    print(f"test accuracy: {result['accuracy']:.2%}")
    return 0


# ---- predict -------------------------------------------------------------------------------------


def _cmd_predict(args: argparse.Namespace) -> int:
    import fastbp

    from . import datasets

    _check_output_path(args.output, "--output")
    if args.threads is not None:
        fastbp.set_num_threads(args.threads)
    model = fastbp.load(args.model)
    data = _load_data(args.data, test_only=True)
    X, y = data.X_test, data.y_test
    if y is None and X.shape[1] == model.in_features + 1:  # a CSV with its label column
        y = datasets._as_labels(X[:, -1], f"{args.data} (last column)")
        X = np.ascontiguousarray(X[:, :-1])
    if X.shape[1] != model.in_features:
        raise CLIError(
            f"--data {args.data} has {X.shape[1]} features, the model {args.model} expects "
            f"{model.in_features}"
        )
    out = model.predict(X, batch_size=args.batch_size)
    if model.out_features > 1:
        pred = np.argmax(out, axis=1)
        np.savetxt(args.output, pred, fmt="%d")
    else:
        pred = out[:, 0]
        np.savetxt(args.output, pred, fmt="%.9g")
    if not args.quiet:
        print(f"wrote {len(pred):,} predictions of {args.model} on {data.name} to {args.output}")
    if y is not None and model.out_features > 1:
        print(f"accuracy: {np.mean(pred == y):.2%} ({int(np.sum(pred == y)):,} of {len(y):,})")
    elif not args.quiet:
        print("no labels in the data: accuracy not computed")
    return 0


# ---- bench and info ------------------------------------------------------------------------------

_BENCH_MODULES = ("fastbp.bench.__main__", "fastbp.bench.report")


def _cmd_bench(argv: list[str]) -> int:
    """Hand ``argv`` to ``main(argv)`` of the benchmark report, imported only now."""
    for name in _BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and name.startswith(exc.name):
                continue  # this module (or fastbp.bench itself) is not there
            raise CLIError(
                f"fastbp bench needs the package {exc.name!r}, which is not installed: "
                f"pip install {exc.name.split('.')[0] if exc.name else 'it'}"
            ) from None
        entry = getattr(module, "main", None)
        if callable(entry):
            status = entry(argv)
            return status if isinstance(status, int) else 0
    if "-h" in argv or "--help" in argv:
        build_parser().bench_parser.print_help()  # type: ignore[attr-defined]
        return 0
    raise CLIError(
        "the benchmark report (fastbp.bench) is not part of this installation; "
        "from a source checkout, 'bench/README.md' describes the pytest benchmarks"
    )


def _gemm_check(n: int = 512, repeats: int = 5) -> str:
    from . import ops

    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    out = ops.gemm(a, b)
    err = float(np.abs(out - a.astype(np.float64) @ b).max())
    if not err < 1e-3 * n**0.5:
        raise CLIError(f"self-check failed: GEMM {n}^3 float32 differs from NumPy by {err:.3g}")
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        ops.gemm(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return f"GEMM {n}^3 float32 correct, {2 * n**3 / best / 1e9:.1f} GFLOP/s (best of {repeats})"


def _cmd_info(args: argparse.Namespace) -> int:
    import fastbp

    fastbp.show_config()
    if getattr(args, "check", False):
        print(f"{'self-check':>16}: {_gemm_check()}")
    return 0


def _cmd_none() -> int:
    import fastbp

    fastbp.show_config()
    print()
    print("fastbp train        train an MLP on the bundled digits (a few seconds)")
    print("fastbp --help       all commands: train, predict, bench, info")
    return 0


# ---- entry point ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``fastbp`` command line with ``argv`` (default: ``sys.argv[1:]``); returns the
    exit status. User mistakes print one line on stderr (status 1, or 2 for bad options)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = PROG
    try:
        if argv and argv[0] == "bench":  # everything after 'bench' belongs to the report
            prog = f"{PROG} bench"
            return _cmd_bench(argv[1:])
        parser = build_parser()
        args, extra = parser.parse_known_args(argv)
        if extra:  # reported by the subcommand's parser, so the line names the subcommand
            sub = parser.subparsers.choices.get(args.command, parser)  # type: ignore[attr-defined]
            sub.error(f"unrecognized arguments: {' '.join(extra)}")
        if args.command is None:
            return _cmd_none()
        prog = f"{PROG} {args.command}"
        handler = {"train": _cmd_train, "predict": _cmd_predict, "info": _cmd_info}[args.command]
        return handler(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if os.environ.get("FASTBP_DEBUG") or not _is_user_error(exc):
            raise
        print(f"{prog}: error: {_one_line(exc)}", file=sys.stderr)
        return 1


def _is_user_error(exc: BaseException) -> bool:
    from ._core import NonFiniteLossError

    return isinstance(exc, (CLIError, OSError, ValueError, TypeError, NonFiniteLossError))


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
