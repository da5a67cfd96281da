"""Tools around training: compare, lr_find, tune, the bundled data sets, plots, the CLI.

The founding article's FAQ as experiments on the caller's model and data; see
:mod:`optim_core.tools.experiments`. Imports training and the optimizer core.
"""

from .experiments import (
    CompareResult,
    LRFinderResult,
    TuneResult,
    compare,
    format_table,
    lr_find,
    tune,
    write_csv,
    write_json,
)

__all__ = ["lr_find", "tune", "compare", "LRFinderResult", "TuneResult", "CompareResult",
           "write_csv", "write_json", "format_table"]
