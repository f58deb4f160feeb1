"""``bench extract``: its arithmetic, and synthetic images that are quick to make."""

from PIL import Image

from raml.extract.bench import DISTINCT_SYNTHETIC_IMAGES, ExtractBench, run_extract_bench, synthetic_images


def test_bench_extract_ratios_and_ceiling():
    result = ExtractBench(
        model="m",
        engine="torch",
        device="cpu",
        images=100,
        size=900,
        batch_size=8,
        workers=4,
        cores=2,
        loader_seconds=4.0,
        decode_crop_seconds=0.05,
        loader_cpu_seconds=(5.5, 0.25),
        encoder_seconds=8.0,
        stage_seconds=10.0,
        prompt_seconds=1.0,
        min_cosine=0.9995,
    )
    lines = result.lines()
    assert "whole stage       10.00 images/s" in lines[1]
    # ceiling: min(4 workers, 2 cores) / 0.05 s = 40 images/s; the loader ran at 100 / 4 s = 25
    assert "loader alone      25.00 images/s  = 0.62 x its ceiling of 40.00 images/s" in lines[2]
    assert "loader CPU per image: 55.0 ms in the workers, 2.5 ms in this process" in lines[3]
    assert "bare encoder      12.50 images/s" in lines[4]
    assert "x1.250 (overhead)" in lines[5] and "loader rate / encoder rate: x2.00" in lines[5]
    assert lines[6].endswith("worst crop cosine 0.999500 (must be >= 0.999): ok")


def test_synthetic_images_are_distinct_pngs_then_links_to_them(tmp_path):
    paths = synthetic_images(tmp_path, DISTINCT_SYNTHETIC_IMAGES + 3, 96)
    assert [p.name for p in paths[:2]] == ["00000.png", "00001.png"] and all(
        p.parent == tmp_path / "bench" / "good" for p in paths
    )
    contents = [p.read_bytes() for p in paths]
    assert len(set(contents[:DISTINCT_SYNTHETIC_IMAGES])) == DISTINCT_SYNTHETIC_IMAGES
    assert contents[DISTINCT_SYNTHETIC_IMAGES:] == contents[:3]
    with Image.open(paths[-1]) as image:
        assert image.size == (96, 96) and image.mode == "RGB"


def test_bench_extract_runs_end_to_end_on_the_tiny_model(tiny_backbone):
    result = run_extract_bench(tiny_backbone, images=6, size=96, batch_size=4, workers=1)
    assert (result.images, result.batch_size, result.workers, result.engine) == (6, 4, 1, "torch")
    assert min(result.stage_seconds, result.loader_seconds, result.encoder_seconds, result.decode_crop_seconds) > 0
    assert result.loader_cpu_seconds[0] > 0  # the worker's CPU time was counted
    assert result.min_cosine is None and len(result.lines()) == 6  # the fp16 check runs on CUDA only
    loader_only = run_extract_bench(tiny_backbone, images=3, size=96, batch_size=2, workers=0, loader_only=True)
    assert loader_only.encoder_seconds is None and loader_only.stage_seconds is None
    assert [line.split()[0] for line in loader_only.lines()[1:]] == ["loader", "loader"]


def test_bench_extract_times_the_patch_tokens_against_the_stage_without(tiny_backbone):
    result = run_extract_bench(tiny_backbone, images=4, size=96, batch_size=2, workers=0, patch_tokens=True, rounds=2)
    assert len(result.token_rounds) == 2 and all(
        min(*without, *with_tokens) > 0 for without, with_tokens in result.token_rounds
    )
    without, with_tokens = result.cache_bytes
    # 64 tokens x 32 values x float16 per image, its defect fractions, its scoring mask (8,192 bytes), a checksum
    assert with_tokens - without >= 4 * (64 * 32 * 2 + 64 * 2 + 8192)
    lines = result.lines()
    assert "with patch tokens: whole stage x" in lines[-3] and "in wall time (median of 2 interleaved" in lines[-3]
    assert "in CPU time" in lines[-2] and lines[-1].startswith("  cache per image:")
