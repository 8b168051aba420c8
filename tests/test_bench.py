"""run_bench: the real step timed on tiny random models; the GPU peak table."""

from __future__ import annotations

import pytest

from unic_cli.bench import PARTS, bf16_peak_flops, kernel_kind, run_bench
from unic_cli.config import BenchConfig


@pytest.mark.parametrize(("name", "peak"), [("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12),
                                            ("NVIDIA H100 NVL", 835e12), ("NVIDIA H200", 989e12),
                                            ("NVIDIA H200 NVL", 835e12),
                                            ("NVIDIA GH200 480GB", 989e12), ("NVIDIA A100-SXM4-80GB", 312e12),
                                            ("NVIDIA L40S", 362e12), ("NVIDIA L40", 181e12), ("NVIDIA L4", 121e12),
                                            ("NVIDIA A10", 125e12), ("NVIDIA A10G", None),
                                            ("NVIDIA GeForce RTX 4090", 165e12), ("NVIDIA GeForce RTX 4080", None),
                                            ("Some Future GPU", None)])
def test_bf16_peak_flops__whole_words_and_more_specific_names_win(name, peak):
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
    assert result["teacher_dtype"] in ("bf16", "fp32") and result["student_dtype"] == "fp32"


@pytest.mark.parametrize("name, kind", [
    ("nvjet_tst_256x128_64x4_2x1_v_bz_coopA_TNT", "matmul"),  # cuBLAS on an H100
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x256x64_warpgroupsize2x1x1_"
     "execute_segment_k_off_kernel__5x_cublas", "matmul"),
    ("triton_tem_fused_addmm_gelu_3", "matmul"),  # inductor's matmul template with a fused epilogue
    ("aten::baddbmm", "matmul"),
    ("aten::mkldnn_convolution", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<64, 128, 128, 4, false, false, "
     "cutlass::bfloat16_t>>", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("triton_poi_fused__scaled_dot_product_flash_attention_add_0", "fused elementwise"),
    ("triton_red_fused_native_layer_norm_1", "fused elementwise"),
    ("## Call CompiledFxGraph fhi2c7xpuc5elv4nt2ayvegmmtm2pxojats64yo5iyiucuxzed3p ##", "fused elementwise"),
    ("Memcpy HtoD (Pinned -> Device)", "memcpy/memset"),
    # cuDNN's SDPA backward helpers and convolution layout transposes (H100 profile, session 8)
    ("void cudnn::fusion::compute_dot_do_o_specialized<true, 64>(void const*, void const*, void*, void*, "
     "unsigned int)", "attention"),
    ("void cudnn::fusion::convert_dq_to_16bits<true>(void const*, void*, unsigned int)", "attention"),
    ("void cudnn::engines_precompiled::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>",
     "memcpy/memset"),
    ("void cudnn::engines_precompiled::nhwcToNchwKernel<__nv_bfloat16, __nv_bfloat16, float, true, false>",
     "memcpy/memset"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)", "communication"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::GeluCUDAKernelImpl>", "other"),
    ("aten::native_layer_norm", "other"),
])
def test_kernel_kind__real_kernel_and_op_names(name, kind):
    assert kernel_kind(name) == kind


def test_profiled_costs__gpu_user_ranges_are_not_kernels():
    """On a GPU, the step's `record_function` ranges come back as CUDA-side user annotations spanning their
    kernels; counted as kernels they made an H100 step's 0.74 s of kernel time read 1.98 s. torch's own event
    types, averaged by key as `profile_step` does (a CPU machine cannot record CUDA events)."""
    from torch.autograd import DeviceType
    from torch.autograd.profiler_util import EventList, FunctionEvent

    from unic_cli.bench import profiled_costs

    def event(name, device, us, start, user=False):
        return FunctionEvent(id=start, name=name, thread=0, start_us=start, end_us=start + us, use_device="cuda",
                             device_type=getattr(DeviceType, device), is_user_annotation=user, stack=[],
                             input_shapes=[])

    events = EventList([event("unic_step", "CUDA", 738_900, 0, user=True),
                        event("teachers", "CUDA", 387_200, 1, user=True),
                        event("nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN", "CUDA", 100_800, 2),
                        event("triton_red_fused_native_layer_norm_0", "CUDA", 17_800, 3),
                        event("aten::addmm", "CPU", 12_000, 1_000_000),
                        event("teachers", "CPU", 400, 2_000_000, user=True)], use_device="cuda")
    events._build_tree()  # what torch.profiler does before key_averages
    averaged = events.key_averages()
    gpu = profiled_costs(averaged, cuda=True)
    assert [name for name, _, _ in gpu] == ["nvjet_sm90_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN",
                                            "triton_red_fused_native_layer_norm_0"]
    assert sum(sec for _, sec, _ in gpu) == pytest.approx(0.1186)
    cpu = [name for name, _, _ in profiled_costs(averaged, cuda=False)]  # CPU self times: every non-range op
    assert cpu == ["aten::addmm"]


def test_flops_per_image__matches_a_hand_count():
    """test_vit at 32 px (4 patches + a class token, 64-d, MLP 192, 6 blocks), one ladder block (the last)."""
    from unic_cli.plan import flops_per_image

    config = BenchConfig.from_sources(None, dict(teachers=("timm:test_vit",), student="test_vit", image_size=32,
                                                 ladder_blocks="last", device="cpu"))
    tokens, patches, dim, mlp = 5, 4, 64, 192
    block = (2 * tokens * dim * 3 * dim  # qkv
             + 2 * 2 * tokens * tokens * dim  # q @ k.T and attention @ v, all heads
             + 2 * tokens * dim * dim  # output projection
             + 2 * 2 * tokens * dim * mlp)  # MLP
    vit = 6 * block + 2 * patches * (3 * 16 * 16) * dim  # + the patch embedding
    # last-block heads: Linear(64, 4 x 64) - GELU - Linear(4 x 64, 64) on the summary and on each patch token
    ladder = 2 * (1 + patches) * (dim * 4 * dim + 4 * dim * dim)
    flops = flops_per_image(config)
    assert flops == {"teachers": [vit], "student_and_ladder_forward": vit + ladder,
                     "train_step": vit + 3 * (vit + ladder)}


def test_run_bench__a_batch_that_does_not_fit_is_one_message(tiny_images, greedy_teacher):
    from unic_cli.errors import TrainingError

    config = BenchConfig.from_sources(None, dict(teachers=(greedy_teacher,), student="test_vit", image_size=32,
                                                 steps=1, device="cpu", batch_size=4))
    with pytest.raises(TrainingError, match=r"batch size 4 does not fit on cpu \(can't allocate memory.*"
                                            r"try --batch-size 2 --grad-accum-steps 2"):
        run_bench(config, warmup=0)
    sweep = run_bench(config, warmup=0, batch_sizes=[2, 4])  # the sweep keeps the largest batch that fits
    assert sweep["batch_size"] == 2 and sweep["sweep"][-1] == {"batch_size": 4, "oom": True}
