"""The model zoo. Importing this package registers every built-in model.

Adding a model: write ``hest2sge/models/<name>.py`` with a ``SpotModel`` subclass decorated by
``@register_model("<name>")`` and add one import line below.
"""

from hest2sge.models.base import SpotModel
from hest2sge.models.stnet import STNet

__all__ = ["SpotModel", "STNet"]
