"""Training of the two PHANES stages on healthy data (`phanes train`).

- `trainer`: the stage 1 / stage 2 loop: epochs, early stopping, resume, the (uncalibrated) bundle.
- `steps`: the optimisation steps of both stages (`Learner`: networks, optimisers, seeded sampler).
- `validation`: validation scores and the stage 1 threshold that cuts stage 2's holes.
- `losses`: Soft-IntroVAE + reversed embedding losses (stage 1), AOT-GAN losses (stage 2).
- `augment`: the paper's batched 2D augmentation, identical for images and masks.
- `holes`: random inpainting holes (ellipses, strokes) for stage 2.
- `data`: healthy slices held in memory, seeded batch order.
- `checkpoint`: pickle-free resumable checkpoints, run progress and best weights.
- `metrics_log`: `metrics.csv`, one row per validation.

Calibration of a trained bundle lives in `phanes_cli.calibrate`; `phanes train` runs it after training. The
progress display is `phanes_cli.infra.progress`.
"""
