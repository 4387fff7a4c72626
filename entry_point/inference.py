"""SageMaker hosting's handler, by the name its PyTorch serving container looks for (``code/inference.py``
in the model.tar.gz training writes). The functions are :mod:`brainseg.commands.serving`'s.
"""

from brainseg.commands.serving import input_fn, model_fn, output_fn, predict_fn

__all__ = ["input_fn", "model_fn", "output_fn", "predict_fn"]
