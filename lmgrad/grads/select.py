"""Deprecated home of parameter selection: use `lmgrad.params` (`select`, `split`, `layers`, `matches`).

Kept so that `from lmgrad.grads.select import select_params, split_params, layers` works while its
importers switch.
"""

from lmgrad.params import layers, select as select_params, split as split_params

__all__ = ["layers", "select_params", "split_params"]
