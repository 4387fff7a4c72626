"""The programs: ``train`` (entry_point/train.py, brainseg-train), ``predict`` (entry_point/predict.py,
brainseg-predict) and ``serving`` (the hosting handler, entry_point/inference.py)."""
