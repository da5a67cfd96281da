"""The elementwise updates of the newer optimizers (issue 13), each defined once.

Same language and conventions as :mod:`optim_core.optim.rules`: operation order
follows the reference implementation each rule names, so float64 trajectories agree
with it to rounding; host scalars come from each optimizer's ``scalars`` method.
Kept apart from :mod:`.rules` so each group of optimizers is one module to read.
"""

from __future__ import annotations

from .language import update_rule  # noqa: F401 - used by the rules below

#: The rules of this module, in definition order.
ELEMENTWISE_RULES: tuple = ()
