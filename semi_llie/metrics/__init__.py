"""Image quality: the metric table (`table`), full-reference metrics, pyiqa metrics, the bank's scorers,
and the one evaluation loop (`evaluation.score_split`)."""
