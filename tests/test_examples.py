"""Every script in examples/ runs (in-process, through its ``main(argv)``) and gets the answer
WORKLOADS.md promises; slow ones are shrunk with their own options."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

import fastbp
from fastbp import datasets

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(autouse=True)
def _default_threads():
    """Examples run with --threads 1 (the suite shares a small machine); undo it after."""
    yield
    fastbp.set_num_threads(None)


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_has_a_test():
    tested = {"w0_worked_example", "w1_linear_regression", "w2_tiny_regression"}
    tested |= {"w3_fashion_mnist", "w4_gemm_bound", "w5_gradient_descent"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


def test_w0_prints_the_table(capsys):
    result = load_example("w0_worked_example").main([])
    table = {
        "output": [[0.7514, 0.7729]],
        "loss": 0.2984,
        "grad_W1": [[0.0004, 0.0009], [0.0005, 0.0010]],
        "grad_W2": [[0.0822, 0.0827], [-0.0226, -0.0227]],
        "0.weight": [[0.1498, 0.1996], [0.2498, 0.2995]],
        "0.bias": [0.3456, 0.3450],
        "2.weight": [[0.3589, 0.4087], [0.5113, 0.5614]],
        "2.bias": [0.5308, 0.6190],
    }
    for key, expected in table.items():
        np.testing.assert_allclose(result[key], expected, rtol=0, atol=5e-5, err_msg=key)
    out = capsys.readouterr().out
    for text in ("[[0.7514, 0.7729]]", "0.2984", "[[0.1498, 0.1996], [0.2498, 0.2995]]"):
        assert text in out


def test_w1_recovers_w_and_b(capsys):
    result = load_example("w1_linear_regression").main([])
    assert np.all(np.abs(result["w"] - [2.0, -3.4]) < 0.01), result["w"]
    assert abs(result["b"] - 4.2) < 0.01, result["b"]
    assert result["losses"][-1] < 1e-4  # the noise floor is 5e-5
    assert "w = " in capsys.readouterr().out


def test_w2_trains_saves_loads_and_plots(tmp_path, capsys):
    """The full 20,000 steps (fast: batch-1 steps cost ~1-2 µs) and the figure."""
    module = load_example("w2_tiny_regression")
    model, png = tmp_path / "w2.safetensors", tmp_path / "w2.png"
    result = module.main(["--model", str(model), "--plot", str(png)])
    assert model.is_file()
    assert result["max_error"] < 0.5 and result["losses"][-1] < 0.05  # as test_workloads's W2
    pytest.importorskip("matplotlib")
    assert result["plotted"] and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "plot written" in capsys.readouterr().out


def test_w2_without_matplotlib_skips_the_plot(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    module = load_example("w2_tiny_regression")
    png = tmp_path / "w2.png"
    result = module.main(
        ["--epochs", "2", "--model", str(tmp_path / "m.safetensors"), "--plot", str(png)]
    )
    assert not result["plotted"] and not png.exists()
    assert "matplotlib is not installed" in capsys.readouterr().out


@pytest.mark.skipif(
    not (datasets.FASHION_MNIST_DEBIAN_DIR / "train-images-idx3-ubyte.gz").is_file()
    and not os.environ.get("FASHION_MNIST_DIR"),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist)",
)
def test_w3_fashion_mnist_reaches_the_reference_accuracy(capsys):
    """The full W3: 5 epochs of Adam 1e-3, batch 128, 784-256-128-10 ReLU on the real data.
    ≥ 80% test accuracy after the first epoch (as a 1-epoch run: same seed, same first epoch)
    and ≥ 87% after the fifth. Measured: 83.82% then 87.60%, 0.9 s per epoch on one AVX2 core
    (about 5 s in all), so the full run stays in the suite."""
    result = load_example("w3_fashion_mnist").main(["--epochs", "5", "--threads", "1"])
    assert result["epoch_accuracy"][0] >= 0.80, result
    assert result["accuracy"] >= 0.87, result
    assert result["accuracy"] == result["epoch_accuracy"][-1]
    assert "test accuracy:" in capsys.readouterr().out


def test_w3_without_data_is_a_clear_exit(tmp_path, monkeypatch):
    monkeypatch.delenv("FASHION_MNIST_DIR", raising=False)
    module = load_example("w3_fashion_mnist")
    with pytest.raises(SystemExit, match="dataset-fashion-mnist"):
        module.main(["--data-dir", str(tmp_path), "--epochs", "1"])


def test_w4_runs_and_reports_gflops(capsys):
    result = load_example("w4_gemm_bound").main(["--random", "--samples", "512", "--threads", "1"])
    assert np.isfinite(result["loss"]) and abs(result["loss"] - np.log(10)) < 0.5
    assert result["gflops"] > 0 and result["gemm_gflops"] > 0
    assert "GFLOP/s" in capsys.readouterr().out


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_w5_minimises_both_functions(optimizer, capsys):
    lr = "1e-2" if optimizer == "sgd" else "5"  # Adam moves ~lr per step: 1e-2 cannot reach 0
    result = load_example("w5_gradient_descent").main(["--optimizer", optimizer, "--lr", lr])
    if optimizer == "sgd":
        np.testing.assert_allclose(result["x"], result["x0"] * 0.96**1000, rtol=1e-12)
        np.testing.assert_allclose(result["v"], result["v0"] * 0.98**1000, rtol=1e-12)
    assert abs(result["x"][0]) < 1e-2 and np.all(np.abs(result["v"]) < 1e-2)
    assert "x² + y² + z²" in capsys.readouterr().out
