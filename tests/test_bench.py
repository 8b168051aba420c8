"""run_bench: the real step timed on tiny random models; the GPU peak table."""

from __future__ import annotations

import pytest

from unic_cli.bench import PARTS, bf16_peak_flops, run_bench
from unic_cli.config import BenchConfig


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                            ("NVIDIA H200", 989e12), ("NVIDIA L40S", 362e12), ("NVIDIA L4", 121e12),
                                            ("Some Future GPU", None)])
def test_bf16_peak_flops__more_specific_names_win(name, peak):
    assert bf16_peak_flops(name) == peak


def test_run_bench__sweeps_batch_sizes_on_real_data_and_reports_the_split(tiny_teachers, tiny_images):
    config = BenchConfig.from_sources(None, dict(teachers=tiny_teachers, student="test_vit", image_size=64,
                                                 data_dir=tiny_images, num_workers=0, steps=1, device="cpu",
                                                 ladder_blocks="last", shared_heads=True))
    result = run_bench(config, warmup=1, batch_sizes=(2, 4))
    assert [s["batch_size"] for s in result["sweep"]] == [2, 4]
    assert result["batch_size"] in (2, 4) and result["images_per_sec"] > 0 and result["sec_per_step"] > 0
    assert set(result["split_sec_per_step"]) == set(PARTS) and result["peak_mem_bytes"] > 0
    flops = result["flops_per_image"]
    assert flops["train_step"] == sum(flops["teachers"]) + 3 * flops["student_and_ladder_forward"] > 0
    assert result["flops_per_step"] == flops["train_step"] * result["global_batch"]
    assert result["teacher_dtype"] in ("bfloat16", "float32") and result["student_dtype"] == "fp32"
