"""Figures: the ABKD paper's toy fit (``python -m abkd_vision.viz.toy``)."""
