"""Training of the two PHANES stages on healthy data (`phanes train`).

- `trainer`: the stage 1 / stage 2 loops, validation, early stopping, checkpoints, resume, bundle.
- `losses`: Soft-IntroVAE + reversed embedding losses (stage 1), AOT-GAN losses (stage 2).
- `augment`: the paper's batched 2D augmentation, identical for images and masks.
- `shapes`: random inpainting holes (ellipses, strokes) for stage 2.
- `data`: healthy slices held in memory, seeded batch order.
- `checkpoint`: pickle-free resumable checkpoints.
- `progress`: the shared rich progress display.

Calibration of a trained bundle lives in `phanes_cli.calibrate`.
"""
