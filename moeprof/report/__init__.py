"""Renderers: computed results in, text / rich renderables / PNG bytes out. They never print or open files."""

from moeprof.report.markdown import render_markdown
from moeprof.report.model import build_report, load_results, validate_results

__all__ = ["build_report", "load_results", "render_markdown", "validate_results"]
