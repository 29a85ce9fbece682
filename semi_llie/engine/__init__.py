"""The training loop's machinery: run setup (`run`), one step and its boundaries (`step`), validation,
checkpointing and the bank on disk (`bank_store`), distributed helpers, MLflow tracking, the allocator."""
