"""Running experiments: the run's working directory (config, provenance, metrics) and its
resumable per-example records (`records.RecordStore`, `workdir.Workdir`)."""
