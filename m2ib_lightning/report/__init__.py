"""The HTML report of a run: ``python -m m2ib_lightning.report OUTPUT_DIR --data FILE -o report.html``.

Owns: the command line (:mod:`.cli`), assembling the HTML files (:mod:`.build`), which samples
and their data rows (:mod:`.samples`), one sample's card (:mod:`.cards`), tokens (:mod:`.tokens`)
and the Jinja templates with autoescaping (:mod:`.render`, ``templates/``).

May import: everything below it (outputs, evaluation, data, backbones); nothing imports it.
"""

from m2ib_lightning.report.build import build_report
from m2ib_lightning.report.cli import main
from m2ib_lightning.report.tokens import token_html

__all__ = ["build_report", "main", "token_html"]
