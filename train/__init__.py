"""Stage two: the RAML head trained on cached features (docs/method.md). Never loads CLIP.

May import cache/ and extract/ (the device, never a model); nothing here imports evaluate/.

config       TrainConfig: every hyper-parameter and its default, in one place
split        holdout_split, image_list_hash, rows_for: which images train and which are held out
model        RAMLHead: cross-scale attention, fusion, text-visual fusion, feature and classifier heads; PixelHead
loss_terms   the pieces both losses share: adaptive margin, center and margin terms, difficulty weight
loss         MACCL: center, margin, supervised contrastive (+ BCE), as pure step functions; the pixel loss
original_loss  the original release's loss (--loss-variant original)
fit          fit, fit_runs, write_run: the training loop (one run, or many stacked) and the run directory
run_stack    RunStack: K runs of one architecture as one stacked, vmapped model
divergence   TrainingDiverged: the first step whose loss or gradient is not finite, and what to try
checkpoint   save_checkpoint, load_checkpoint, check_cache
infer        score_table, text_score: s_final = 0.85·s_visual + 0.15·s_text; pixel_scores, fused_score
thresholds   F1-max decision thresholds per category, calibrated on the training images
sweep        train_missing: configurations × seeds in batched passes, resumable
bench        run_train_bench: ``raml bench train``
cli          the ``train`` and ``bench train`` commands, and the options of a training run
"""
