"""The demo (README command one): RAML against WinCLIP on the same held-out textile images, with seeds.

    extract (textile, --limit N)  →  sweep (adaptive, fixed, strong × 3 seeds)  →  evaluate
    →  baseline winclip --split-from (the same held-out images)  →  report (one table with both)

The textile images of ``conformal-clip-data`` form one category (1,000 normal, 500 local and 500
global defects). ``--limit N`` spreads N images over the sorted list (N/2 normal, N/4 of each
defect type) and the holdout split holds out ``ceil(0.2·N)`` of them, shared between the two
classes: N = 146 is the smallest N with 15 normal and 15 anomalous held-out images (145 holds out
14 + 15), so it is the default.

Engine: the image encoder runs where it is fastest — CUDA when there is a GPU, else ONNX Runtime
(``--engine onnx``) on the CPU. WinCLIP's window embeddings need torch internals, so it runs torch
(on the GPU when there is one).

With CLIP weights (ViT-B-16/openai for RAML, ViT-B-16-plus-240/laion400m_e31 for WinCLIP, in
open_clip's cache, or downloaded when ``--online``) it is a real, small experiment. Without them
it says so in plain words, for each model, and runs the same pipeline with ``--random-weights``;
every file it writes is then marked as not meaningful. It never falls back silently.

Offline by default: open_clip would otherwise spend ~45 s retrying a download that cannot work,
so the weights are looked up in the local cache only (HF_HUB_OFFLINE=1) unless ``--online``.
"""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

MARGINS = ("adaptive", "fixed", "strong")
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_LIMIT = 146        # the smallest --limit with ≥ 15 held-out images of each class (module docstring)
DEFAULT_EPOCHS = 25        # the original release's
RAML_MODEL = ("ViT-B-16", "openai")
WINCLIP_MODEL = ("ViT-B-16-plus-240", "laion400m_e31")


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


def random_weights_notice(what: str, model: str, pretrained: str, reason: str, online: bool) -> str:
    how = ("the download failed" if online else
           "this demo runs offline and found them in no local cache (run `make demo ONLINE=1`, or "
           "`python pipeline.py demo --online`, to download them once)")
    return (f"\n*** CLIP weights {model}/{pretrained} for {what} are not available: {how}.\n"
            f"    ({reason})\n"
            f"*** {what} now runs with RANDOM weights (--random-weights). It shows that every step works; the\n"
            "    AUROC, AP and F1 it gets are NOT MEANINGFUL, and every file and table says so.\n")


def fastest_engine() -> tuple[str, str]:
    """(``--engine``, ``--device``) of the fastest image encoder here: torch on CUDA, else ONNX Runtime."""
    import torch
    return ("torch", "cuda") if torch.cuda.is_available() else ("onnx", "cpu")


def _weights_options(what: str, model: str, pretrained: str, random_weights: bool, online: bool, log) -> list[str]:
    """The backbone options of one model; random weights (said loudly) when its weights are missing."""
    if not random_weights:
        log(f"demo: looking for CLIP weights {model}/{pretrained} for {what} "
            f"({'online' if online else 'local cache only'}) ...")
        reason = weights_problem(model, pretrained)
        if reason:
            log(random_weights_notice(what, model, pretrained, reason, online))
            random_weights = True
    return ["--model", model] + (["--random-weights"] if random_weights else ["--pretrained", pretrained])


def run_demo(run_command, out_dir, *, model: str = RAML_MODEL[0], pretrained: str = RAML_MODEL[1],
             winclip_model: str = WINCLIP_MODEL[0], winclip_pretrained: str = WINCLIP_MODEL[1],
             limit: int = DEFAULT_LIMIT, epochs: int = DEFAULT_EPOCHS, seeds=DEFAULT_SEEDS, online: bool = False,
             random_weights: bool = False, log=print) -> Path:
    """Run the demo's commands through ``run_command(args)``; returns the report's path."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if not online:
        os.environ["HF_HUB_OFFLINE"] = "1"
    raml = _weights_options("RAML", model, pretrained, random_weights, online, log)
    winclip = _weights_options("WinCLIP", winclip_model, winclip_pretrained, random_weights, online, log)
    engine, device = fastest_engine()
    tag = "random" if "--random-weights" in raml else "pretrained"   # a cache holds one backbone's features
    cache, runs, results, report = (out_dir / f"cache-{tag}", out_dir / f"runs-{tag}", out_dir / f"results-{tag}",
                                    out_dir / f"report-{tag}")
    # --workers 0: decoding a 250-px image is cheap; worker processes would only compete with CLIP for the cores
    steps = [
        ["extract", "--dataset", "textile", "--cache-dir", str(cache), *raml, "--limit", str(limit), "--workers", "0",
         "--engine", engine, "--device", device],
        ["sweep", "--cache-dir", str(cache), "--margins", ",".join(MARGINS), "--seeds", ",".join(map(str, seeds)),
         "--epochs", str(epochs), "--out", str(runs)],   # the 9 runs train together, as one batched pass
        ["evaluate", "--checkpoint", str(runs), "--cache-dir", str(cache), "--out", str(results / "raml")],
        ["baseline", "winclip", "--dataset", "textile", "--split-from", str(runs / f"{MARGINS[0]}-seed{seeds[0]}"),
         "--out", str(results / "winclip"), *winclip, "--device", device, "--workers", "0"],
        ["report", str(results), "--out", str(report)],
    ]
    timings = []
    for number, args in enumerate(steps, start=1):
        log(f"\ndemo step {number}/{len(steps)}: python pipeline.py {' '.join(args)}")
        step_start = time.perf_counter()
        run_command(args)
        timings.append((" ".join(args[:2]) if args[0] == "baseline" else args[0], time.perf_counter() - step_start))
    seconds = time.perf_counter() - start
    log(f"\ndemo finished in {seconds / 60:.1f} min: {limit} textile images (--limit), {len(MARGINS)} margins × "
        f"{len(seeds)} seeds of {epochs} epochs, image encoder: {engine} on {device}.")
    log("  " + ", ".join(f"{name} {step:.0f} s" for name, step in timings)
        + f", weights look-up and start {seconds - sum(step for _, step in timings):.0f} s")
    log(f"Report: {report / 'report.md'} (plots beside it).")
    if "--random-weights" in raml or "--random-weights" in winclip:
        which = " and ".join(what for what, options in (("RAML", raml), ("WinCLIP", winclip))
                             if "--random-weights" in options)
        log(f"Reminder: RANDOM weights for {which} — those numbers in this report are NOT MEANINGFUL.")
    return report / "report.md"
