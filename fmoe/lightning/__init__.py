"""Lightning layer: the calibration pass as `trainer.fit`, and callbacks that score and prune."""

from .calibration import CalibrationModule
from .callbacks import FisherScoring, IntermediatePruning

__all__ = ["CalibrationModule", "FisherScoring", "IntermediatePruning"]
