"""Report writers: figures from a results dict, a self-contained HTML page, results.json."""

from .write import figures_from_results, load_results, write_report

__all__ = ["figures_from_results", "load_results", "write_report"]
