"""viz: the analysis engine (one recorded pass per model -> Grad-CAM, taps, ERF, redundancy, cost).

Modules (imported on demand, so ``import viz`` stays cheap):

- ``viz.models``: ``ModelEntry``, ``prepare_model``, ``site_presets`` (analysis copies of swapped models);
- ``viz.recorder``: ``Recorder`` (scoped hooks, one ``autograd.grad``) -> ``Record``;
- ``viz.gradcam``: raw signed Grad-CAM and the per-panel / shared / global colour rules;
- ``viz.taps``: summaries of the variants' internal maps; ``viz.erf``: effective receptive field;
- ``viz.analysis``: ``analyze()`` -> ``Analysis`` (``to_dict()`` = report.json);
- ``viz.report``: ``write_report``; ``viz.figures``: matplotlib Figures (no pyplot);
- ``viz.redundancy``, ``viz.cost``, ``viz.rf``, ``viz.charts``: metrics, cost, theoretical RF, plotly charts;
- ``python -m viz analyze|profile``: the command line.
"""
