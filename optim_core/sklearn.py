"""scikit-learn estimators: ``from optim_core.sklearn import Classifier, Regressor``.

The estimators live in :mod:`optim_core.integrations.sklearn`; importing this module
imports scikit-learn (the ``[train]`` extra), ``import optim_core`` does not.
"""

from .integrations.sklearn import Classifier, Regressor

__all__ = ["Classifier", "Regressor"]
