"""The names of the files the evaluation writes, importable without scikit-learn: ``status`` and
the workspace's choice of the newest run read them, and must start in a fraction of a second."""

RESULTS_JSON = "results.json"
SCORES_CSV = "scores.csv"
MAPS_NPZ = "anomaly_maps.npz"
SUMMARY_JSON = "summary.json"  # a sweep's summary (evaluate/sweep.py), written once every run is scored
