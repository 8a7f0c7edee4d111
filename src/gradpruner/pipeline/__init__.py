"""Orchestration: the run config, the stage-keyed run, compare grids and the demo."""
