"""The GEMM's transposed-A paths inside training (csrc/gemm.c).

A weight gradient dZ.T @ X has a transposed A. When dZ's rows are short and few B slivers reuse
them, A is read in place instead of packed; when C is narrow (a layer of few inputs), C is
computed as its transpose (gemm_transposed; a shuffled batch's rows of X gathered first). Both
claim the packed path's exact arithmetic, so every test trains the same model twice, once with
them turned off (``_set_transposed_a_paths(False)``), and requires identical bits.
"""

from __future__ import annotations

import numpy as np
import pytest

import fastbp
from fastbp import _core

from .conftest import assert_same_training, switched, training_result, using_threads
from .test_indexed_batches import make_optimizer  # SGD (fused update), momentum, Adam

# (sizes, batch): the first layer's weight gradient is sizes[1] x sizes[0] over k = batch
NETS = [
    ((13, 100, 100, 1), 64),  # 100 x 13: computed as its transpose; 100 x 100: A in place
    ((4, 64, 3), 300),  # 64 x 4 over two K blocks (float64: three)
    ((24, 40, 33, 2), 37),  # 40 x 24 at float32's limit; ragged A slivers
    ((16, 300, 8), 50),  # 300 x 16: A in place and packed slivers
]


def train(on: bool, sizes, batch, dtype, opt_name, shuffle):
    rng = np.random.default_rng(sum(sizes))
    n = 3 * batch + 5  # a short last batch
    X = rng.standard_normal((n, sizes[0])).astype(dtype)
    y = rng.standard_normal((n, sizes[-1])).astype(dtype)
    model = fastbp.MLP(list(sizes), activation="tanh", seed=2, dtype=dtype)
    opt = make_optimizer(opt_name, model)
    with switched(_core._set_transposed_a_paths, on):
        history = model.fit(
            X, y, loss="mse", optimizer=opt, epochs=2, batch_size=batch, shuffle=shuffle, seed=3
        )
        # the step API's backward adds to the gradients (beta = 1): twice, from zero
        model.zero_grad()
        dy = rng.standard_normal((batch, sizes[-1])).astype(dtype)
        for _ in range(2):
            model.forward(X[:batch])
            dx = model.backward(dy)
    return training_result(model, history.history["loss"]), dx


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("opt_name", ["sgd", "momentum", "adam"])
@pytest.mark.parametrize("shuffle", [False, True], ids=["in-order", "shuffled"])
@pytest.mark.parametrize(("sizes", "batch"), NETS, ids=lambda v: str(v))
def test_training_gives_the_packed_paths_bits(isa, dtype, threads, opt_name, shuffle, sizes, batch):
    with using_threads(threads):
        fast = train(True, sizes, batch, dtype, opt_name, shuffle)
        packed = train(False, sizes, batch, dtype, opt_name, shuffle)
    assert_same_training(fast[0], packed[0])
    np.testing.assert_array_equal(fast[1], packed[1], strict=True)
