"""Training: the LightningModule, the QAT schedule callback and the main job."""

from qat.train.module import PRIMARY_METRIC, QATModule, param_groups
from qat.train.schedule import QATSchedule

__all__ = ["PRIMARY_METRIC", "QATModule", "QATSchedule", "param_groups"]
