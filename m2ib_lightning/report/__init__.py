"""The HTML report of a run: ``python -m m2ib_lightning.report OUTPUT_DIR --data FILE -o report.html``.

May import: everything below it (outputs, evaluation, data, backbones); nothing imports it.
"""

from m2ib_lightning.report.build import build_report, main, token_html

__all__ = ["build_report", "main", "token_html"]
