"""The notebook API: a Spark ML ``Estimator`` / ``Model`` pair over the whole pipeline.

:class:`TorchEstimator` takes a DataFrame — ``fit(df)`` runs validation, the split,
featurization, shards and training — and returns a :class:`TorchModel`, whose
``transform(df)`` scores a DataFrame and which saves / loads as a model bundle. This
package sits above ``launch`` and ``serve`` (it uses both) and below ``jobs``.
"""

from pipeline.estimator.estimator import TorchEstimator, default_work_dir
from pipeline.estimator.model import TorchModel

__all__ = ["TorchEstimator", "TorchModel", "default_work_dir"]
