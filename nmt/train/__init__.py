"""Training: the loop (`Trainer`) and the parts it drives, each testable on its own.

    trainer.py        the loop and the one after-update decision
    step.py           one optimiser update (loss, accumulation, DDP, clipping)
    validator.py      loss + capped greedy BLEU on the validation set
    run_directory.py  checkpoint names, rotation, config.toml, the run lock
    selection.py      the end of a run: best.pt or an average, and alpha, chosen on valid -> final.pt
    metrics_log.py    metrics.jsonl and TensorBoard
    meter.py          log-line sums and the clocks behind tokens/s
    state.py          what a checkpoint holds of a run in progress; resume checks
    signals.py        SIGINT / SIGTERM: save and stop
    monitor.py        what a person watching is shown (the CLI draws it)
"""

from nmt.train.monitor import Monitor, SilentMonitor
from nmt.train.run_directory import RunDirectory, last_checkpoints, latest_checkpoint, update_checkpoint_name
from nmt.train.selection import Selection, select_final
from nmt.train.state import RESETTABLE, Progress, TrainResult
from nmt.train.trainer import Trainer
from nmt.train.validator import Validator

__all__ = [
    "RESETTABLE",
    "Monitor",
    "Progress",
    "RunDirectory",
    "Selection",
    "SilentMonitor",
    "TrainResult",
    "Trainer",
    "Validator",
    "last_checkpoints",
    "latest_checkpoint",
    "select_final",
    "update_checkpoint_name",
]
