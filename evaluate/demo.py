"""The demo (README command one): extract → train (adaptive, fixed, strong) → evaluate → report on
the textile images of ``conformal-clip-data``.

With CLIP weights (ViT-B-16/openai in open_clip's cache, or downloaded when ``--online``) it is a
real, small experiment. Without them it says so in plain words and runs the same pipeline with
``--random-weights``; every file it writes is then marked as not meaningful. It never falls back
silently.

Offline by default: open_clip would otherwise spend ~45 s retrying a download that cannot work,
so the weights are looked up in the local cache only (HF_HUB_OFFLINE=1) unless ``--online``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

MARGINS = ("adaptive", "fixed", "strong")
# ViT-B/16 encodes a textile image's 21 crops in 4-5 s on an idle 2-core CPU, ~12 s when other jobs
# share it: 32 images keep the whole demo, venv set-up included, under 10 minutes even then.
# --limit spreads them over the sorted list: 16 normal, 8 local and 8 global defects; the holdout
# split trains on 25 and scores 7.
DEFAULT_LIMIT = 32
DEFAULT_EPOCHS = 25


def weights_problem(model: str, pretrained: str) -> str | None:
    """None when ``model``/``pretrained`` loads on this machine, else the reason in one line."""
    from extract.encoder import WeightsUnavailableError, load_backbone
    logging.disable(logging.ERROR)   # open_clip logs the failed download itself; the notice below says it plainly
    try:
        load_backbone(model, pretrained, device="cpu")
    except (WeightsUnavailableError, ValueError, FileNotFoundError) as err:
        return str(err).splitlines()[0][:300]
    finally:
        logging.disable(logging.NOTSET)
    return None


def random_weights_notice(model: str, pretrained: str, reason: str, online: bool) -> str:
    how = ("the download failed" if online else
           "this demo runs offline and found them in no local cache (run `make demo ONLINE=1`, or "
           "`python pipeline.py demo --online`, to download them once, ~600 MB)")
    return (f"\n*** CLIP weights {model}/{pretrained} are not available: {how}.\n"
            f"    ({reason})\n"
            "*** The demo now runs the SAME pipeline with RANDOM weights (--random-weights). It shows that every\n"
            "    step works; the AUROC, AP and F1 it prints are NOT MEANINGFUL, and every file says so.\n")


def run_demo(run_command, out_dir, *, model: str, pretrained: str, limit: int = DEFAULT_LIMIT,
             epochs: int = DEFAULT_EPOCHS, online: bool = False, random_weights: bool = False,
             log=print) -> Path:
    """Run the demo's commands through ``run_command(args)``; returns the report's path."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if not online:
        os.environ["HF_HUB_OFFLINE"] = "1"
    if not random_weights:
        log(f"demo: looking for CLIP weights {model}/{pretrained} ({'online' if online else 'local cache only'}) ...")
        reason = weights_problem(model, pretrained)
        if reason:
            log(random_weights_notice(model, pretrained, reason, online))
            random_weights = True
    weights = ["--model", model] + (["--random-weights"] if random_weights else ["--pretrained", pretrained])
    tag = "random" if random_weights else "pretrained"
    cache, runs, results, report = (out_dir / f"cache-{tag}", out_dir / f"runs-{tag}", out_dir / f"results-{tag}",
                                    out_dir / f"report-{tag}")
    # --workers 0: decoding a 250-px image is cheap; worker processes would only compete with CLIP for the cores
    steps = [["extract", "--dataset", "textile", "--cache-dir", str(cache), *weights, "--limit", str(limit),
              "--workers", "0"]]
    # --force: a second `make demo` retrains (seconds) instead of stopping at the first run's output
    steps += [["train", "--cache-dir", str(cache), "--margin", margin, "--epochs", str(epochs),
               "--out", str(runs / margin), "--force"] for margin in MARGINS]
    steps += [["evaluate", *(a for margin in MARGINS for a in ("--checkpoint", str(runs / margin))),
               "--cache-dir", str(cache), "--out", str(results / "textile")],
              ["report", str(results), "--out", str(report)]]
    for number, args in enumerate(steps, start=1):
        log(f"\ndemo step {number}/{len(steps)}: python pipeline.py {' '.join(args)}")
        run_command(args)
    seconds = time.perf_counter() - start
    log(f"\ndemo finished in {seconds / 60:.1f} min ({limit} textile images per the --limit, {epochs} epochs).")
    log(f"Report: {report / 'report.md'} (plots beside it).")
    if random_weights:
        log("Reminder: RANDOM weights — the numbers in this report are NOT MEANINGFUL.")
    return report / "report.md"
