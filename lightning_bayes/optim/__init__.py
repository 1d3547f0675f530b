"""Optimisers that are posterior approximations (plain torch, no Lightning import)."""

from .ivon import IVON, hessian_update, posterior_draw, posterior_draws, sampled_parameters

__all__ = ["IVON", "hessian_update", "posterior_draw", "posterior_draws", "sampled_parameters"]
