"""`phanes calibrate`: a bundle's thresholds and minimum lesion size, from healthy validation volumes
(`healthy`) or tuned on validation volumes with inserted real lesions (`tune`, `insertion`)."""
