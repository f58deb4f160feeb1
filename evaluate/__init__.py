"""Evaluation: scoring trained runs on held-out or transfer images, the metrics and their
confidence intervals (image and pixel level), anomaly maps, results files, reports and plots, and
the studies built on them (``sweep``'s summary, ``ablate``, the ``demo``). Baselines are in ``baselines/``, the deployed model in
``deploy/``. May import cache/, extract/ and train/; nothing below imports it.
"""
