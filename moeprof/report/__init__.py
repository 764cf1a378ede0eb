"""Reports by output format: computed results in, text / rich renderables / PNG bytes out.

`results` reads and checks the results JSON; `rows` derives the format-neutral rows every format
shows; `markdown`, `terminal` and `plot` render them. Renderers never print or open files.
"""

from moeprof.report.markdown import render_markdown
from moeprof.report.results import load_results, validate_results
from moeprof.report.rows import build_report

__all__ = ["build_report", "load_results", "render_markdown", "validate_results"]
