"""Integrations: scikit-learn estimators and model explanations.

* :mod:`optim_core.integrations.sklearn` (also ``optim_core.sklearn``):
  ``Classifier`` and ``Regressor``, scikit-learn estimators training through
  :func:`~optim_core.fit`; scikit-learn is imported when that module is.
* :mod:`optim_core.integrations.explain` (also ``optim_core.explain``): saliency,
  integrated gradients from the models' analytic input gradients, permutation
  importance through scikit-learn, attribution heat maps.

Imports the optimizer core and training, never the tools or the command line.
Importing this package imports neither scikit-learn nor matplotlib.
"""
