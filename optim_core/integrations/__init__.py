"""Integrations: scikit-learn estimators, model explanations, torch.optim drop-ins.

* :mod:`optim_core.integrations.sklearn` (also ``optim_core.sklearn``):
  ``Classifier`` and ``Regressor``, scikit-learn estimators training through
  :func:`~optim_core.fit`; scikit-learn is imported when that module is.
* :mod:`optim_core.integrations.explain` (also ``optim_core.explain``): saliency,
  integrated gradients from the models' analytic input gradients, permutation
  importance through scikit-learn, attribution heat maps.
* :mod:`optim_core.integrations.torch_optim` (also ``optim_core.torch``): every
  optimizer of the registry as a ``torch.optim.Optimizer``; torch is imported when that
  module is.

Imports the optimizer core and training, never the tools or the command line.
Importing this package imports neither scikit-learn, matplotlib nor torch.
"""
