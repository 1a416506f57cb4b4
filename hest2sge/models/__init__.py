"""The model zoo. Importing this package registers every built-in model.

Adding a model: write ``hest2sge/models/<name>.py`` with a ``SpotModel`` subclass decorated by
``@register_model("<name>")`` and add one import line below.
"""

from hest2sge.models.base import SpotModel
from hest2sge.models.deeppt import DeepPT
from hest2sge.models.deepspace import DeepSpaCE
from hest2sge.models.egnv1 import EGNv1
from hest2sge.models.egnv2 import EGNv2
from hest2sge.models.genecoder import GeneCodeR
from hest2sge.models.hist2st import Hist2ST
from hest2sge.models.histogene import HisToGene
from hest2sge.models.istar import IStar
from hest2sge.models.mlp import MLPBaseline
from hest2sge.models.ridge import RidgeBaseline
from hest2sge.models.stnet import STNet
from hest2sge.models.tcgn import TCGN
from hest2sge.models.thitogene import THItoGene

__all__ = [
    "DeepPT",
    "DeepSpaCE",
    "EGNv1",
    "EGNv2",
    "GeneCodeR",
    "Hist2ST",
    "HisToGene",
    "IStar",
    "MLPBaseline",
    "RidgeBaseline",
    "SpotModel",
    "STNet",
    "TCGN",
    "THItoGene",
]
