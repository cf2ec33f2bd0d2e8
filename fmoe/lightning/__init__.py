"""Lightning layer: the calibration pass as `trainer.fit`, and callbacks that score and prune."""

from .calibration import CalibrationModule
from .callbacks import BlockDropping, Compression, ExpertPruning, FisherScoring, IntermediatePruning, LayerDropping
from .plans import RestorePlans

__all__ = ["BlockDropping", "CalibrationModule", "Compression", "ExpertPruning", "FisherScoring", "IntermediatePruning",
           "LayerDropping", "RestorePlans"]
