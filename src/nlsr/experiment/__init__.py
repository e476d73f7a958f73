"""The experiment: config, stage graph, pipeline, stages, report, comparison."""
