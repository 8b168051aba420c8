"""--compile: regional compilation (one graph per kind of block) gives the eager step's losses."""

from __future__ import annotations

import contextlib

import pytest
import torch

from unic_cli import train_step
from unic_cli.bench import _synthetic_batches
from unic_cli.config import BenchConfig
from unic_cli.distributed import dist_info


def _config(tiny_teachers, **fields):
    return BenchConfig.from_sources(None, dict(teachers=tiny_teachers, student="test_vit", image_size=64,
                                               batch_size=4, device="cpu", drop_path_rate=0.1,
                                               random_init_teachers=True) | fields)


def _losses(tiny_teachers, compile_: bool):
    config = _config(tiny_teachers, compile=compile_)
    tr = train_step.build_trainer(config, torch.device("cpu"), dist_info())
    tr.core.student.eval()  # no stochastic depth: the eager and compiled masks are drawn differently
    stats = train_step.forward_backward(tr, _synthetic_batches(4, 64, 0), 0.5, lambda name: contextlib.nullcontext())
    grads = torch.cat([p.grad.flatten() for p in tr.core.student.parameters() if p.grad is not None])
    return stats.metrics_TM, grads, tr


def test_compile__blocks_share_one_graph_and_match_eager(tiny_teachers):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    eager_TM, eager_grads, _ = _losses(tiny_teachers, False)
    compiled_TM, compiled_grads, tr = _losses(tiny_teachers, True)
    # student blocks (6, drop path made uniform), ladder, and each teacher's blocks: a handful of graphs, not 6+
    assert counters["stats"]["unique_graphs"] <= 5, dict(counters["stats"])
    assert all(hasattr(block, "_compiled_call_impl") and block._compiled_call_impl is not None
               for block in tr.core.student.model.blocks)
    torch.testing.assert_close(compiled_TM, eager_TM, rtol=1e-2, atol=1e-3, equal_nan=True)  # bf16 teachers
    cos = torch.nn.functional.cosine_similarity(compiled_grads, eager_grads, dim=0)
    assert cos > 0.999 and compiled_grads.norm() / eager_grads.norm() == pytest.approx(1, rel=1e-2)


@pytest.mark.parametrize("mode, autotune, cuda_graphs", [("default", False, False),
                                                         ("max-autotune-no-cudagraphs", True, False),
                                                         ("reduce-overhead", False, True)])
def test_compile_mode__reaches_every_compiled_block_and_the_ladder(tiny_teachers, mode, autotune, cuda_graphs):
    # compilation is lazy: building the trainer wraps the modules, nothing is traced yet
    tr = train_step.build_trainer(_config(tiny_teachers, compile=True, compile_mode=mode), torch.device("cpu"),
                                  dist_info())
    modules = [*tr.core.modules(), *(m for t in tr.teachers for m in t.modules())]
    compiled = [m for m in modules if getattr(m, "_compiled_call_impl", None) is not None]
    assert len(compiled) == 6 + (6 + 8) + 1  # student test_vit, teachers test_vit and test_vit2, the ladder
    # ... and the student's tap (final norm and summary/patch split), one compiled function for every tapped block
    configs = [m._compiled_call_impl.get_compiler_config() for m in compiled]
    configs.append(tr.core.student.tap.get_compiler_config())
    for config in configs:
        assert config["max_autotune"] is autotune and config["triton.cudagraphs"] is cuda_graphs


def test_compile_mode__needs_compile(tiny_teachers):
    from unic_cli.errors import ConfigError

    with pytest.raises(ConfigError, match="--compile-mode max-autotune needs --compile"):
        _config(tiny_teachers, compile_mode="max-autotune").validate()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
def test_cuda_graphs__gradient_accumulation_matches_eager(tiny_teachers):
    """`--compile-mode reduce-overhead --grad-accum-steps 2` on a GPU: a graph replay used to overwrite the first
    micro-batch's gradients (RuntimeError "accessing tensor output of CUDAGraphs that has been overwritten",
    seen on an H100); the third step, which replays the recorded graphs, gives eager's gradients."""
    def third_step(**fields):
        config = _config(tiny_teachers, device="cuda", batch_size=2, grad_accum_steps=2, student_dtype="fp32",
                         teacher_drop_prob=0.25, **fields)
        tr = train_step.build_trainer(config, torch.device("cuda"), dist_info())
        tr.core.student.eval()  # no stochastic depth: the eager and compiled masks are drawn differently
        batches = _synthetic_batches(2, 64, 0)
        for _ in range(3):  # cudagraph trees: warm-up, recording, replay
            tr.optimizer.zero_grad(set_to_none=True)
            stats = train_step.forward_backward(tr, batches, 0.5, lambda name: contextlib.nullcontext())
        grads = torch.cat([p.grad.flatten() for p in tr.core.parameters() if p.grad is not None])
        return stats.metrics_TM, grads

    eager_TM, eager_grads = third_step()
    graphed_TM, graphed_grads = third_step(compile=True, compile_mode="reduce-overhead")
    torch.testing.assert_close(graphed_TM, eager_TM, rtol=1e-2, atol=1e-3, equal_nan=True)
    cos = torch.nn.functional.cosine_similarity(graphed_grads, eager_grads, dim=0)
    assert cos > 0.999 and float(graphed_grads.norm() / eager_grads.norm()) == pytest.approx(1, rel=1e-2)


@pytest.mark.slow  # four compilations: about a minute on 2 cores
def test_bench_sweep__compiles_each_batch_size_for_its_own_shapes(tiny_teachers):
    """`unic bench --compile --try-batch-sizes 1,2,3`: without a reset between sizes, size 2 compiles with a
    dynamic batch dimension and size 3 reuses that graph (2 compilations for 3 sizes)."""
    from torch._dynamo.utils import counters

    from unic_cli.bench import run_bench

    def graphs(sizes):
        torch.compiler.reset()
        counters.clear()
        result = run_bench(_config(tiny_teachers, compile=True, steps=1, drop_path_rate=0.0), warmup=1,
                           batch_sizes=sizes)
        assert [r["batch_size"] for r in result["sweep"]] == list(sizes)
        return counters["stats"]["unique_graphs"]

    assert graphs((1, 2, 3)) == 3 * graphs((1,))
