"""Experiments: sweeps over methods, K and numbers of documents, the results table, the paper's figures and a report.

``Sweep``/``run_sweep`` (``commer sweep CONFIG``) train and evaluate; ``write_report`` (``commer report DIR``) turns a
results table into ``report.md`` and PNG figures.
"""

from commer.experiments.report import write_report
from commer.experiments.sweep import Study, Sweep, SweepConfig, concat_documents, expand, load_sweep, run_sweep
from commer.experiments.table import ResultsTable

__all__ = [
    "ResultsTable",
    "Study",
    "Sweep",
    "SweepConfig",
    "concat_documents",
    "expand",
    "load_sweep",
    "run_sweep",
    "write_report",
]
