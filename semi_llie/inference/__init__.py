"""Using a trained model: loading it (checkpoint or MLflow), tiled full-resolution inference, the CLI's
model options, and the classic baselines it must beat."""
