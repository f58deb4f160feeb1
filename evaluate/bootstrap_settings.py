"""The bootstrap's settings, in one place and light to import (the command line reads them for its
defaults without importing scikit-learn).

``DEFAULT_BOOTSTRAP``: resamples per confidence interval. 1000 is the usual count for a 95 %
percentile interval (Efron and Tibshirani, An Introduction to the Bootstrap, ch. 13); ours.
``CI_LEVEL``: the two-sided level of every interval RAML reports; ours.
"""

DEFAULT_BOOTSTRAP = 1000
CI_LEVEL = 0.95
