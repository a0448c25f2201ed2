"""The loss comparison: the Reality Check protocol (Musgrave et al., ECCV 2020).

``sweep(settings, ws, losses)`` cross-validates every loss with the same Optuna budget, refits
each one's best setting with several seeds, evaluates once on test and states a winner only
when the paired difference is outside the noise. Modules: ``folds`` (patient-grouped,
stratified K-fold), ``search`` (search spaces, studies, storage), ``jobs`` (one fit, runnable
in any process), ``stats`` (CI, paired bootstrap + Wilcoxon, verdict), ``report`` (table,
figure), ``protocol`` (the driver and its MLflow runs).
"""

from medml.sweep.jobs import FitJob, run_fit
from medml.sweep.protocol import Mapper, SweepResult, serial, sweep
from medml.sweep.report import TABLE_METRICS

__all__ = ["TABLE_METRICS", "FitJob", "Mapper", "SweepResult", "run_fit", "serial", "sweep"]
