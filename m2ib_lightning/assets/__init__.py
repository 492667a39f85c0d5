"""Builders of offline assets: tiny random models, the demo pairs, the grounded synthetic benchmark,
the toy CLIP's training, and the quality benchmark's tables.

Used by tests, benchmarks and the scripts that regenerate ``data/``; runtime code never imports
anything from here (a test checks). May import every other part of the package.
"""
