"""Import shim: MLflow models registered by earlier versions pickle `semi_llie.modelio.Enhancer`.

New code imports `semi_llie.models.enhancer.Enhancer` and `semi_llie.inference.loading.load_enhancer`;
tests/test_enhance.py loads a model pickled under this old name.
"""

from semi_llie.models.enhancer import Enhancer

__all__ = ["Enhancer"]
