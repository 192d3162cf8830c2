"""Fine-tuning with optax and orbax (installed as `ettin_jax.train`).

`TrainArgs` defines a run (and the flags of `ettin-jax train classify|lm`); `train` runs or
resumes it. Below the trainer: `data` (tables, labels, batches), `steps` (the jitted train and
eval steps), `optim` (AdamW and its schedules) and `metrics`.
"""

from ettin_jax.train.args import TrainArgs, TrainingError
from ettin_jax.train.data import DataError
from ettin_jax.train.trainer import PREEMPTED_EXIT, main_summary, prepare_host, train

__all__ = ["PREEMPTED_EXIT", "DataError", "TrainArgs", "TrainingError", "main_summary", "prepare_host", "train"]
