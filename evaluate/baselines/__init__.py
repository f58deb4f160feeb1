"""Baselines scored exactly like RAML (same images, same results files): zero-shot WinCLIP
(``winclip``: the method; ``winclip_run``: scoring a dataset with it) and probes on the cached
features (``features``: linear, knn-tiles, zero-shot-text). May import cache/, extract/, train/ and
evaluate's own modules (metrics, protocols, results); nothing imports it but evaluate's tools.
"""
