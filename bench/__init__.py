"""The optim-core benchmark suite; run ``python -m bench`` from the repository root.

``python -m`` puts the repository root first on ``sys.path``, so ``optim_core`` is
imported from the source tree, where ``backends/`` sits beside the package rather than
inside it; ``optim_core`` itself then resolves ``optim_core.backends`` to it (see
``optim_core/_source_tree.py``).
"""
