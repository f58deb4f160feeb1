"""Stage two: the RAML head trained on cached features (SPEC.md §2–8).

config      TrainConfig: every hyper-parameter and its default, in one place
split       holdout_split, image_list_hash, rows_for: which images train and which are held out
model       RAMLHead: cross-scale attention, fusion, text-visual fusion, feature and classifier heads
loss        MACCLoss: center, margin, supervised contrastive (+ BCE), adaptive margin, difficulty
fit         fit, write_run: training loop and run directory
checkpoint  save_checkpoint, load_checkpoint, check_cache
infer       score_table, text_score: s_final = 0.85·s_visual + 0.15·s_text
sweep       run_sweep: margins × seeds, resumable, one summary table
synthetic   write_synthetic_cache: made-up caches of MVTec's shape (bench, tests)
bench       run_train_bench: ``python pipeline.py bench train``
"""
