"""An anomaly map blended over its image, in the report's colour map: what ``predict`` writes beside
each map and ``serve`` returns on request. Apart from plots.py so that a service draws it with
matplotlib's colour maps alone (no pyplot, no scikit-learn: seconds of imports and tens of MB)."""

from __future__ import annotations

import numpy as np

MAP_CMAP = "inferno"


def overlay_image(image, anomaly_map: np.ndarray, vmin: float = 0.0, vmax: float = 1.0, alpha: float = 0.45):
    """``image`` (PIL RGB) with ``anomaly_map`` ([H, W], the image's size) blended over it in the report's
    colour map, as a PIL image of the same size: what ``predict`` writes beside each map."""
    import matplotlib
    from PIL import Image

    scaled = np.clip((np.asarray(anomaly_map, np.float32) - vmin) / max(vmax - vmin, 1e-12), 0, 1)
    colours = matplotlib.colormaps[MAP_CMAP](scaled)[..., :3]
    blended = (1 - alpha) * np.asarray(image, np.float32) / 255 + alpha * colours
    return Image.fromarray(np.round(255 * blended).astype(np.uint8))
