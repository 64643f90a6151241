"""The base of optimizers that wrap another one (normalized / clipped gradients, sphere projection)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch


def check_wrappable(wrapper: str, optimizer: object) -> None:
    """Raise if ``optimizer`` cannot be wrapped: not an instance, or LBFGS (its step re-evaluates the closure,
    which would undo what the wrapper does to the gradients or weights)."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        hint = " (a class: instantiate it with the parameters first)" if isinstance(optimizer, type) else ""
        raise TypeError(
            f"{wrapper} wraps a torch.optim.Optimizer instance, got {type(optimizer).__name__}{hint}"
        )
    if isinstance(optimizer, torch.optim.LBFGS):
        raise TypeError(f"{wrapper} cannot wrap LBFGS: its step re-evaluates the closure")


_HOOK_REGISTRIES = (
    "_optimizer_step_pre_hooks",
    "_optimizer_step_post_hooks",
    "_optimizer_state_dict_pre_hooks",
    "_optimizer_state_dict_post_hooks",
    "_optimizer_load_state_dict_pre_hooks",
    "_optimizer_load_state_dict_post_hooks",
)


class PicklableOptimizer(torch.optim.Optimizer):
    """An optimizer whose ``copy.deepcopy`` / ``pickle`` / ``torch.save`` keep the attributes it adds.

    ``torch.optim.Optimizer.__getstate__`` keeps only ``defaults``, ``state`` and ``param_groups`` (it is
    written for optimizers whose settings all live in the groups): an SGD-G copy lost its ``nonfinite`` policy
    and failed at its first step. Here every instance attribute is kept except, as in torch, the hook
    registries and methods patched on the instance (hooks are often closures or bound methods of other
    objects, an LR scheduler wraps ``step``; a copy starts without them) and the caches a subclass names in
    ``_transient`` (rebuilt on demand). Subclasses that key anything by
    ``id(tensor)`` translate it in :meth:`_getstate_extra` / :meth:`_setstate_extra` (ids change in a copy).
    """

    _transient: tuple[str, ...] = ()

    def __getstate__(self) -> dict[str, Any]:
        skip = set(_HOOK_REGISTRIES) | set(self._transient)
        # an instance attribute that shadows a method is a patch by someone else (an LR scheduler wraps
        # ``step`` in place): like the hooks it belongs to its owner, and torch drops it too
        cls = type(self)
        skip |= {k for k, v in self.__dict__.items() if callable(v) and callable(getattr(cls, k, None))}
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        state.update(self._getstate_extra())
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)  # torch's: fresh hook registries, the step profiling patch
        self._setstate_extra()

    def _getstate_extra(self) -> dict[str, Any]:
        return {}

    def _setstate_extra(self) -> None:
        pass


class OptimizerWrapper(PicklableOptimizer):
    """An optimizer around ``inner``: the parameter groups, state and defaults *are* the inner optimizer's, so
    LR schedulers, ``GradScaler`` and optimizer hooks see one optimizer. ``torch.optim.Optimizer.__init__`` is
    not called (the groups already exist); only its hook registries are set up. Subclasses call
    :meth:`_wrap` in their ``__init__`` once their own checks have passed, and implement ``step``,
    ``_settings_repr`` and (for their own state) ``state_dict`` / ``load_state_dict``."""

    # GradScaler must unscale before our step: the wrappers need the true gradients.
    _step_supports_amp_scaling = False
    inner: torch.optim.Optimizer

    def _wrap(self, optimizer: torch.optim.Optimizer) -> None:
        self.inner = optimizer
        self._optimizer_step_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_step_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._optimizer_load_state_dict_post_hooks: OrderedDict[int, Callable[..., Any]] = OrderedDict()
        self._patch_step_function()

    @property  # type: ignore[override]
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        self.inner.param_groups = value

    @property  # type: ignore[override]
    def state(self) -> Any:
        return self.inner.state

    @state.setter
    def state(self, value: Any) -> None:
        self.inner.state = value

    @property  # type: ignore[override]
    def defaults(self) -> dict[str, Any]:
        return self.inner.defaults

    @defaults.setter
    def defaults(self, value: dict[str, Any]) -> None:
        self.inner.defaults = value

    def __repr__(self) -> str:
        inner = "\n".join("    " + line for line in repr(self.inner).splitlines())
        return f"{type(self).__name__}(\n{inner},\n    {self._settings_repr()}\n)"

    def _settings_repr(self) -> str:
        raise NotImplementedError

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        self.inner.add_param_group(param_group)
