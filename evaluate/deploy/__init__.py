"""The trained model at work on new images: ``predict`` (torch or ONNX Runtime), ``export`` to a
deployment that needs no torch (``predict_onnx.py`` is its standalone scorer, copied as is), the
int8 engine's checks against a checkpoint (``int8_check``) and ``bench predict`` (``bench``). May
import cache/, extract/, train/ and evaluate's own modules.
"""
