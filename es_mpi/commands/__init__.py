"""The commands other than `train`: eval, score, bench, replay, export, info."""
