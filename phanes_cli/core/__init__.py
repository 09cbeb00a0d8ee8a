"""The inference core: volume I/O, preprocessing, the batched ops, the PHANES pipeline, the lesion rule,
the calibration, the model bundle and the measurements of a lesion mask (components, statistics)."""
