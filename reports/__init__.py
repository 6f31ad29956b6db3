"""Turn sweep directories into markdown tables and plots. Reads files; never imports harness."""

from reports.report import build_report

__all__ = ["build_report"]
