"""Two of Lightning's notices at a fit's start, quieted where they are false alarms about what a method does on
purpose, and shown as worded otherwise:

* "Found N module(s) in eval mode at the start of training" (a ``PossibleUserWarning``), where every such module is
  one the method keeps in eval mode: frozen features (:class:`~lightning_bayes.models.FrozenFeatures`), a post-hoc
  method's trained network. Those are the modules that stay in eval mode when the LightningModule's own ``train()``
  is called; a module a user left in eval mode would not.
* "`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer" (a ``UserWarning``),
  for a method whose fit takes no optimiser steps (a sweep, a search, a sampler).
"""

from __future__ import annotations

import re
import warnings
from typing import cast

from lightning.fabric.utilities.warnings import PossibleUserWarning
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from ..modes import modes_kept


def modules_kept_in_eval(module: nn.Module) -> list[str]:
    """Names of the submodules ``module.train()`` leaves in eval mode; every module's mode is then put back."""
    with modes_kept(module):
        module.train()
        return [name for name, m in module.named_modules() if not m.training]


def quiet_eval_mode_notice(module: nn.Module) -> tuple[object, ...] | None:
    """Ignores Lightning's notice for exactly the modules in eval mode now when all of them are kept there by
    ``module.train()``, returning the warning filter it added for :func:`end_quiet`; ``None`` (no filter) otherwise.
    The caller ends it once the fit loop has started (``on_train_start``), or when the fit fails
    (:class:`EndQuietOnException`)."""
    in_eval = [name for name, m in module.named_modules() if not m.training]
    if not in_eval or not set(in_eval) <= set(modules_kept_in_eval(module)):
        return None
    return _ignore(f"Found {len(in_eval)} module(s) in eval mode at the start of training", PossibleUserWarning)


def quiet_no_optimizer_notice() -> tuple[object, ...]:
    """Ignores Lightning's notice that ``configure_optimizers`` returned ``None``, returning the filter for
    :func:`end_quiet` (the caller ends it at ``on_fit_start``, after Lightning's check, or when the fit fails)."""
    return _ignore("`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer",
                   UserWarning)


def _ignore(message: str, category: type[Warning]) -> tuple[object, ...]:
    """Adds a filter ignoring the warnings that start with ``message`` (taken literally); returns it for
    :func:`end_quiet`."""
    warnings.filterwarnings("ignore", message=re.escape(message), category=category)
    return cast(tuple[object, ...], warnings.filters[0])


def end_quiet(entries: list[tuple[object, ...]]) -> None:
    """Removes the filters the functions above added (an ``ignore`` leaves nothing cached to forget), emptying
    ``entries``."""
    for entry in entries:
        if entry in warnings.filters:
            cast(list[object], warnings.filters).remove(entry)  # the list the warnings machinery reads, in place
    entries.clear()


class EndQuietOnException(Callback):
    """Ends the quiet of a fit that fails before its loop starts (an error in the sanity check, a method's own
    refusal): Lightning calls callbacks, not the LightningModule, on an exception, and a filter left behind would hide
    the notices from later fits of other modules."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        end = getattr(pl_module, "end_quiet_notices", None)
        if callable(end):
            end()
