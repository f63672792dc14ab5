"""Evaluation: per-frame metrics (metrics.py, jnp), dataset scores
(aggregates.py, numpy), the Evaluator loop (evaluator.py + records.py),
reports (report.py) and overlays (visualize.py, imported on demand: it pulls
in matplotlib). reference.py is the float64 numpy restatement used by tests.

    from tavlo_jax.evaluation import Evaluator, report
    ev = Evaluator(config, mesh=mesh)
    for batch, heatmap in ...: ev.add(batch, heatmap)      # every process
    results = ev.finalize(calibration)                     # from a validation ev.calibrate()
    if jax.process_index() == 0: report.write(workdir + '/eval', results, ev.records())
"""

from tavlo_jax.evaluation.evaluator import (Evaluator, calibrate, map_sign_report,
                                            scalar_metrics, score)

__all__ = ['Evaluator', 'calibrate', 'map_sign_report', 'scalar_metrics', 'score']
