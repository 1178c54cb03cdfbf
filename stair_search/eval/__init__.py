"""Evaluation: retrieval metrics, benchmark data sets (emoji, synthetic compositional) and the runner.

``stair_search.eval.metrics`` (metrics, TREC files), ``stair_search.eval.datasets`` (data sets) and
``stair_search.eval.runner`` (``evaluate``: every search configuration through the public router API).
"""
