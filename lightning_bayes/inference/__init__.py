"""Inference core: the mathematics of each method as plain torch. No Lightning imports here."""
