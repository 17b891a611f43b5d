"""Layer 5, the application: the `moetune` command, run configurations, runs and stages, data, evaluation,
the demo, reports and plots. Imports every layer below."""
