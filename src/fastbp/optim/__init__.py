"""Optimizers with torch.optim's names, arguments and update rules.

Built over a model's ``parameters()``, an optimizer keeps its state in flat buffers shaped like
the model's parameter buffer and ``step()`` is one fused C pass over all parameters. Over any
other Parameters (``fastbp.Parameter(np.array(...))``, W5-style gradient descent) it updates
each one with the same kernels.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import numpy as np

from .. import _core, ops
from ..nn import Parameter, _aligned_zeros
from . import lr_scheduler

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "lr_scheduler"]

_SGD, _ADAM, _ADAMW = 0, 1, 2


def _hyper(value: object, name: str, low: float = 0.0) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < low:
        raise ValueError(f"{name} must be a finite number >= {low}, got {value}")
    return value


def _betas(betas: object) -> tuple[float, float]:
    try:
        beta1, beta2 = (float(b) for b in betas)
    except (TypeError, ValueError):
        raise TypeError(f"betas must be a pair of floats, got {betas!r}") from None
    for i, b in enumerate((beta1, beta2)):
        if not 0.0 <= b < 1.0:
            raise ValueError(f"betas[{i}] must be in [0, 1), got {b}")
    return beta1, beta2


class Optimizer:
    """Base class: ``param_groups`` (one group), ``step()``, ``zero_grad()``, state dicts."""

    _kind = -1

    def __init__(self, params: Iterable[Parameter], defaults: dict[str, object]) -> None:
        if isinstance(params, Parameter):
            raise TypeError("params must be an iterable of Parameters, e.g. model.parameters()")
        params = list(params)
        if not params:
            raise ValueError("optimizer got an empty parameter list")
        for i, p in enumerate(params):
            if not isinstance(p, Parameter):
                raise TypeError(f"params[{i}] must be a fastbp.Parameter, got {type(p).__name__}")
        if len({id(p) for p in params}) != len(params):
            raise ValueError("some parameters appear more than once")
        self.param_groups: list[dict[str, object]] = [{"params": params, **defaults}]
        self.defaults = dict(defaults)
        owner = params[0].owner
        self._model = None
        if owner is not None and [id(p) for p in params] == [id(p) for p in owner.parameters()]:
            self._model = owner
            self._flat = self._make_flat_state(owner)
            # the hyperparameters into the C record now, checked once: the first fit then
            # finds them synced (cold, right after other work, the checks took ~12 us of it)
            self._sync(self._flat)
        else:
            self._flat = None
            self.state: dict[int, dict[str, object]] = {i: {} for i in range(len(params))}

    @property
    def params(self) -> list[Parameter]:
        return self.param_groups[0]["params"]

    def _make_flat_state(self, model) -> _core.OptimizerState:
        raise NotImplementedError

    def _flat_state_for(self, model) -> _core.OptimizerState | None:
        return self._flat if self._model is model else None

    def _sync(self, state: _core.OptimizerState) -> None:
        """Push the (possibly scheduled) hyperparameters into the C record."""
        g = self.param_groups[0]
        # param_groups is user-editable (schedulers write lr): re-check what C will use, unless
        # nothing changed since the last push to this record (values and types: fit syncs every
        # epoch, and the checks cost 3 us of a tiny network's 40 us epoch).
        try:
            values = (
                g["lr"],
                g.get("momentum", 0.0),
                g.get("dampening", 0.0),
                g.get("weight_decay", 0.0),
                g.get("nesterov", False),
                g.get("eps", 1e-8),
                *g.get("betas", (0.9, 0.999)),
            )
            key = (id(state), values, tuple(map(type, values)))
            if key == getattr(self, "_synced_key", None):
                return
        except Exception:  # not comparable or not iterable: the checks below name the problem
            key = None
        beta1, beta2 = _betas(g.get("betas", (0.9, 0.999)))
        state.configure(
            _hyper(g["lr"], "lr"),
            _hyper(g.get("momentum", 0.0), "momentum"),
            _hyper(g.get("dampening", 0.0), "dampening", low=-math.inf),
            _hyper(g.get("weight_decay", 0.0), "weight_decay"),
            bool(g.get("nesterov", False)),
            beta1,
            beta2,
            _hyper(g.get("eps", 1e-8), "eps"),
        )
        self._synced_key = key

    def zero_grad(self) -> None:
        """Set the gradients of this optimizer's parameters to zero."""
        if self._model is not None:
            self._model.zero_grad()
        else:
            for p in self.params:
                p.zero_grad()

    def step(self) -> None:
        """One update of every parameter from its ``.grad``."""
        if self._flat is not None:
            self._sync(self._flat)
            with self._model._exclusive():
                self._model._plan.update(self._flat)
            return
        for i, p in enumerate(self.params):
            self._step_param(p, self.state[i])

    def _step_param(self, p: Parameter, state: dict[str, object]) -> None:
        raise NotImplementedError

    # ---- state dicts (torch layout: per-parameter state by index, plus param_groups) ----------

    def _flat_views(self) -> list[tuple[int, slice, tuple[int, ...]]]:
        slices = self._model._param_slices
        return [
            (i, slices[name], p.data.shape)
            for i, (name, p) in enumerate(self._model.named_parameters())
        ]

    def state_dict(self) -> dict[str, object]:
        """The optimizer's state in torch's layout: ``{'state': {i: {...}}, 'param_groups': [...]}``."""
        groups = [
            {k: v for k, v in g.items() if k != "params"}
            | {"params": list(range(len(self.params)))}
            for g in self.param_groups
        ]
        return {"state": self._state_arrays(), "param_groups": groups}

    def load_state_dict(self, state_dict: Mapping[str, object]) -> None:
        """Restore state saved by :meth:`state_dict` (arrays or torch tensors)."""
        try:
            groups = state_dict["param_groups"]
            state = state_dict["state"]
        except (KeyError, TypeError):
            raise ValueError("optimizer state_dict must have 'state' and 'param_groups'") from None
        if len(groups) != 1 or len(groups[0].get("params", [])) != len(self.params):
            raise ValueError("optimizer state_dict does not match this optimizer's parameters")
        self._load_state_arrays(state)
        for key, value in groups[0].items():
            if key != "params":
                self.param_groups[0][key] = value

    def _state_arrays(self) -> dict[int, dict[str, object]]:
        raise NotImplementedError

    def _load_state_arrays(self, state: Mapping[int, Mapping[str, object]]) -> None:
        raise NotImplementedError

    def __repr__(self) -> str:
        g = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return f"{type(self).__name__}({', '.join(f'{k}={v}' for k, v in g.items())})"


def _as_state_array(value: object, shape: tuple[int, ...], name: str) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.shape != shape:
        raise ValueError(f"optimizer state {name} has shape {arr.shape}, expected {shape}")
    return arr


class SGD(Optimizer):
    """torch.optim.SGD: momentum, dampening, Nesterov and (L2) weight decay."""

    _kind = _SGD

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float = 0.0,
        nesterov: bool = False,
    ) -> None:
        lr = _hyper(lr, "lr")
        momentum = _hyper(momentum, "momentum")
        dampening = _hyper(dampening, "dampening", low=-math.inf)
        weight_decay = _hyper(weight_decay, "weight_decay")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum > 0 and zero dampening")
        super().__init__(
            params,
            {
                "lr": lr,
                "momentum": momentum,
                "dampening": dampening,
                "weight_decay": weight_decay,
                "nesterov": bool(nesterov),
            },
        )

    def _make_flat_state(self, model) -> _core.OptimizerState:
        buf = _aligned_zeros(model._params.size, model.dtype) if self.defaults["momentum"] else None
        self._momentum = buf
        return _core.OptimizerState(_SGD, buf, None)

    def _step_param(self, p: Parameter, state: dict[str, object]) -> None:
        g = self.param_groups[0]
        first = "momentum_buffer" not in state
        if g["momentum"] and first:
            state["momentum_buffer"] = np.zeros_like(p.data)
        ops.sgd_step(
            p.data,
            p.grad,
            state.get("momentum_buffer"),
            lr=g["lr"],
            momentum=g["momentum"],
            dampening=g["dampening"],
            weight_decay=g["weight_decay"],
            nesterov=g["nesterov"],
            first_step=first,
        )

    def _state_arrays(self) -> dict[int, dict[str, object]]:
        if self._flat is None:
            return {
                i: {k: np.array(v, copy=True) for k, v in s.items()} for i, s in self.state.items()
            }
        if self._momentum is None or self._flat.step == 0:
            return {i: {} for i in range(len(self.params))}
        return {
            i: {"momentum_buffer": self._momentum[sl].reshape(shape).copy()}
            for i, sl, shape in self._flat_views()
        }

    def _load_state_arrays(self, state: Mapping[int, Mapping[str, object]]) -> None:
        if self._flat is None:
            self.state = {
                i: {
                    k: _as_state_array(v, self.params[i].shape, k).astype(self.params[i].dtype)
                    for k, v in state.get(i, {}).items()
                }
                for i in range(len(self.params))
            }
            return
        has = [
            bool(state.get(i, {}).get("momentum_buffer") is not None)
            for i in range(len(self.params))
        ]
        if self._momentum is not None and any(has):
            for i, sl, shape in self._flat_views():
                self._momentum[sl] = _as_state_array(
                    state[i]["momentum_buffer"], shape, "momentum_buffer"
                ).reshape(-1)
            self._flat.step = max(self._flat.step, 1)
        else:
            self._flat.step = 0


class Adam(Optimizer):
    """torch.optim.Adam (bias-corrected moments, eps added to the corrected sqrt(v))."""

    _kind = _ADAM

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        lr = _hyper(lr, "lr")
        beta1, beta2 = _betas(betas)
        eps = _hyper(eps, "eps")
        weight_decay = _hyper(weight_decay, "weight_decay")
        super().__init__(
            params, {"lr": lr, "betas": (beta1, beta2), "eps": eps, "weight_decay": weight_decay}
        )

    def _make_flat_state(self, model) -> _core.OptimizerState:
        self._exp_avg = _aligned_zeros(model._params.size, model.dtype)
        self._exp_avg_sq = _aligned_zeros(model._params.size, model.dtype)
        return _core.OptimizerState(self._kind, self._exp_avg, self._exp_avg_sq)

    def _step_param(self, p: Parameter, state: dict[str, object]) -> None:
        g = self.param_groups[0]
        if not state:
            state.update(step=0, exp_avg=np.zeros_like(p.data), exp_avg_sq=np.zeros_like(p.data))
        state["step"] += 1
        ops.adam_step(
            p.data,
            p.grad,
            state["exp_avg"],
            state["exp_avg_sq"],
            step=state["step"],
            lr=g["lr"],
            betas=g["betas"],
            eps=g["eps"],
            weight_decay=g["weight_decay"],
            decoupled_weight_decay=self._kind == _ADAMW,
        )

    def _state_arrays(self) -> dict[int, dict[str, object]]:
        if self._flat is None:
            return {
                i: {
                    k: (np.array(v, copy=True) if isinstance(v, np.ndarray) else v)
                    for k, v in s.items()
                }
                for i, s in self.state.items()
            }
        if self._flat.step == 0:
            return {i: {} for i in range(len(self.params))}
        return {
            i: {
                "step": self._flat.step,
                "exp_avg": self._exp_avg[sl].reshape(shape).copy(),
                "exp_avg_sq": self._exp_avg_sq[sl].reshape(shape).copy(),
            }
            for i, sl, shape in self._flat_views()
        }

    def _load_state_arrays(self, state: Mapping[int, Mapping[str, object]]) -> None:
        if self._flat is None:
            new = {}
            for i, p in enumerate(self.params):
                s = state.get(i, {})
                new[i] = (
                    {}
                    if not s
                    else {
                        "step": int(np.asarray(s["step"])),
                        "exp_avg": _as_state_array(s["exp_avg"], p.shape, "exp_avg").astype(
                            p.dtype
                        ),
                        "exp_avg_sq": _as_state_array(
                            s["exp_avg_sq"], p.shape, "exp_avg_sq"
                        ).astype(p.dtype),
                    }
                )
            self.state = new
            return
        steps = {int(np.asarray(state[i]["step"])) for i in range(len(self.params)) if state.get(i)}
        if not steps:
            self._flat.step = 0
            return
        if len(steps) != 1:
            raise ValueError("a fused optimizer needs the same step count for every parameter")
        for i, sl, shape in self._flat_views():
            self._exp_avg[sl] = _as_state_array(state[i]["exp_avg"], shape, "exp_avg").reshape(-1)
            self._exp_avg_sq[sl] = _as_state_array(
                state[i]["exp_avg_sq"], shape, "exp_avg_sq"
            ).reshape(-1)
        self._flat.step = steps.pop()


class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay (default 1e-2)."""

    _kind = _ADAMW

    def __init__(
        self,
        params: Iterable[Parameter],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
    ) -> None:
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
