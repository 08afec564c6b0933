"""The pipeline the scripts drive: flags (cli), running over categories and workers (engine,
scaleout), training, evaluation and prediction, incremental update."""
