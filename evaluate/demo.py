"""The demo (README command one): RAML against WinCLIP on the same held-out textile images, with seeds.

    extract (textile, --limit N, --patch-tokens)  →  sweep (adaptive, fixed, strong × 3 seeds)  →  evaluate
    →  baseline knn-patches, zero-shot-text (anomaly maps from the cached patch tokens)
    →  baseline winclip --split-from (the same held-out images)  →  report (one table with all)

The textile images of ``conformal-clip-data`` form one category (1,000 normal, 500 local and 500
global defects). ``--limit N`` spreads N images over the sorted list (N/2 normal, N/4 of each
defect type) and the holdout split holds out ``ceil(0.2·N)`` of them, shared between the two
classes: N = 146 is the smallest N with 15 normal and 15 anomalous held-out images (145 holds out
14 + 15), so it is the default.

Maps: the textile images have no defect masks, so no pixel head is trained and no pixel metric
can be computed; the report's overlay grid shows the maps of the two untrained kinds drawn from
RAML's cached patch tokens (kNN over the training normals' tokens, zero-shot text) beside
WinCLIP's, on the same held-out images.

Engine: the image encoder runs where it is fastest — CUDA when there is a GPU, else ``--engine
auto`` on the CPU: the fastest engine this CPU runs (timed once per machine and model) whose
fidelity gate passes on ``FIDELITY_SAMPLE`` of the demo's images; auto says what it picked, and
why it passed over faster ones. WinCLIP's window embeddings need torch internals, so it runs torch (on the GPU when
there is one), in fp32. Its image score (the paper's zero-shot rule) is the global score alone, so
its windows run only for the few images the report shows with maps (``--maps examples``): the
textile images have no defect masks, so there is no pixel metric that all of them would serve.

At its start the demo says how long it expects to take: ``REFERENCE``'s measured time, scaled by
this machine's fp32 matrix-product rate against the reference machine's.

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

from raml.extract.model_config import DEFAULT_MODEL, DEFAULT_PRETRAINED, WINCLIP_MODEL, WINCLIP_PRETRAINED

MARGINS = ("adaptive", "fixed", "strong")
MAP_BASELINES = ("knn-patches", "zero-shot-text")  # the untrained map kinds: the textile images have no masks
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_LIMIT = 146  # the smallest --limit with ≥ 15 held-out images of each class (module docstring)
DEFAULT_EPOCHS = 25  # the original release's
FIDELITY_SAMPLE = 8  # demo images an engine below fp32 is checked on (extract's default, 32, would add ~2 min)
# The demo's own steps (not the venv), measured with the defaults and an empty user cache (the ONNX
# export and its quantisation included), and the fp32 GEMM rate of the machine they ran on.
REFERENCE = {"seconds": 384.0, "gemm_gflops": 136.0, "cpu": "2-core AMD EPYC (AVX-512, VNNI)"}


def weights_problem(model: str, pretrained: str) -> str | None:
    """None when ``model``/``pretrained`` loads on this machine, else the reason in one line."""
    from raml.extract.encoder import WeightsUnavailableError, load_backbone

    logging.disable(logging.ERROR)  # open_clip logs the failed download itself; the notice below says it plainly
    try:
        load_backbone(model, pretrained, device="cpu")
    except (WeightsUnavailableError, ValueError, FileNotFoundError) as err:
        return str(err).splitlines()[0][:300]
    finally:
        logging.disable(logging.NOTSET)
    return None


def random_weights_notice(what: str, model: str, pretrained: str, reason: str, online: bool) -> str:
    how = (
        "the download failed"
        if online
        else "this demo runs offline and found them in no local cache (run `make demo ONLINE=1`, or "
        "`raml demo --online`, to download them once)"
    )
    return (
        f"\n*** CLIP weights {model}/{pretrained} for {what} are not available: {how}.\n"
        f"    ({reason})\n"
        f"*** {what} now runs with RANDOM weights (--random-weights). It shows that every step works; the\n"
        "    AUROC, AP and F1 it gets are NOT MEANINGFUL, and every file and table says so.\n"
    )


def fastest_engine() -> tuple[str, str]:
    """(``--engine``, ``--device``) of the fastest image encoder here: torch on CUDA, else auto's pick on the CPU."""
    import torch

    return ("torch", "cuda") if torch.cuda.is_available() else ("auto", "cpu")


def expected_seconds(device: str, limit: int, epochs: int, seeds) -> tuple[float | None, str]:
    """How long the demo should take here, and how that was worked out (``None`` on a GPU: too
    little of the time is arithmetic there for the CPU reference to say anything)."""
    if device != "cpu":
        return None, "on the GPU the encoding takes seconds; most of the time is loading the models"
    from raml.extract.engine_bench import gemm_gflops
    from raml.extract.engines import cpu_model

    rate = gemm_gflops()
    seconds = REFERENCE["seconds"] * REFERENCE["gemm_gflops"] / rate
    sizes = (
        ""
        if (limit, epochs, tuple(seeds)) == (DEFAULT_LIMIT, DEFAULT_EPOCHS, DEFAULT_SEEDS)
        else " with the default sizes (yours differ)"
    )
    return seconds, (
        f"{REFERENCE['seconds'] / 60:.1f} min on a {REFERENCE['cpu']} at {REFERENCE['gemm_gflops']:.0f} "
        f"GFLOP/s (fp32 matrix product), scaled to this CPU's {rate:.0f} GFLOP/s ({cpu_model()})"
        f"{sizes}"
    )


def _weights_options(what: str, model: str, pretrained: str, random_weights: bool, online: bool, log) -> list[str]:
    """The backbone options of one model; random weights (said loudly) when its weights are missing."""
    if not random_weights:
        log(
            f"demo: looking for CLIP weights {model}/{pretrained} for {what} "
            f"({'online' if online else 'local cache only'}) ..."
        )
        reason = weights_problem(model, pretrained)
        if reason:
            log(random_weights_notice(what, model, pretrained, reason, online))
            random_weights = True
    return ["--model", model] + (["--random-weights"] if random_weights else ["--pretrained", pretrained])


def run_demo(
    run_command,
    out_dir,
    *,
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    winclip_model: str = WINCLIP_MODEL,
    winclip_pretrained: str = WINCLIP_PRETRAINED,
    limit: int = DEFAULT_LIMIT,
    epochs: int = DEFAULT_EPOCHS,
    seeds=DEFAULT_SEEDS,
    online: bool = False,
    random_weights: bool = False,
    log=print,
) -> Path:
    """Run the demo's commands through ``run_command(args)``; returns the report's path."""
    start = time.perf_counter()
    out_dir = Path(out_dir)
    if not online:
        os.environ["HF_HUB_OFFLINE"] = "1"
    raml = _weights_options("RAML", model, pretrained, random_weights, online, log)
    winclip = _weights_options("WinCLIP", winclip_model, winclip_pretrained, random_weights, online, log)
    engine, device = fastest_engine()
    expected, how = expected_seconds(device, limit, epochs, seeds)
    log(
        f"demo: expected to take about {expected / 60:.0f} min on this machine ({how})"
        if expected is not None
        else f"demo: {how}"
    )
    tag = "random" if "--random-weights" in raml else "pretrained"  # a cache holds one backbone's features
    cache, runs, results, report = (
        out_dir / f"cache-{tag}",
        out_dir / f"runs-{tag}",
        out_dir / f"results-{tag}",
        out_dir / f"report-{tag}",
    )
    first_run = runs / f"{MARGINS[0]}-seed{seeds[0]}"
    # --workers 0: decoding a 250-px image is cheap; worker processes would only compete with CLIP for the cores
    steps = [
        [
            "extract",
            "--dataset",
            "textile",
            "--cache-dir",
            str(cache),
            *raml,
            "--limit",
            str(limit),
            "--workers",
            "0",
            "--device",
            device,
            *(["--fidelity-sample", str(FIDELITY_SAMPLE)] if engine == "auto" else []),
            "--patch-tokens",
            "--engine",
            engine,
        ],
        [
            "sweep",
            "--cache-dir",
            str(cache),
            "--margins",
            ",".join(MARGINS),
            "--seeds",
            ",".join(map(str, seeds)),
            "--epochs",
            str(epochs),
            "--out",
            str(runs),
        ],  # the 9 runs train together, as one batched pass
        ["evaluate", "--checkpoint", str(runs), "--cache-dir", str(cache), "--out", str(results / "raml")],
        *(
            ["baseline", name, "--cache-dir", str(cache), "--split-from", str(first_run), "--out", str(results / name)]
            for name in MAP_BASELINES
        ),
        [
            "baseline",
            "winclip",
            "--dataset",
            "textile",
            "--split-from",
            str(first_run),
            "--out",
            str(results / "winclip"),
            *winclip,
            "--device",
            device,
            "--workers",
            "0",
            "--maps",
            "examples",
        ],
        ["report", str(results), "--out", str(report)],
    ]
    timings = []
    for number, args in enumerate(steps, start=1):
        log(f"\ndemo step {number}/{len(steps)}: raml {' '.join(args)}")
        step_start = time.perf_counter()
        run_command(args)
        timings.append((" ".join(args[:2]) if args[0] == "baseline" else args[0], time.perf_counter() - step_start))
    seconds = time.perf_counter() - start
    log(
        f"\ndemo finished in {seconds / 60:.1f} min: {limit} textile images (--limit), {len(MARGINS)} margins × "
        f"{len(seeds)} seeds of {epochs} epochs, image encoder: {engine} on {device}."
    )
    log(
        "  "
        + ", ".join(f"{name} {step:.0f} s" for name, step in timings)
        + f", weights look-up and start {seconds - sum(step for _, step in timings):.0f} s"
    )
    log(
        f"Report: {report / 'report.md'} (plots beside it); {report / 'report.html'}: the same in one page for a browser."
    )
    if "--random-weights" in raml or "--random-weights" in winclip:
        which = " and ".join(
            what for what, options in (("RAML", raml), ("WinCLIP", winclip)) if "--random-weights" in options
        )
        log(f"Reminder: RANDOM weights for {which} — those numbers in this report are NOT MEANINGFUL.")
    return report / "report.md"
