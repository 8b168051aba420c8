"""Baseline: the HEAD (548a1ce) distill step timed like `unic bench`. Setup: git archive 548a1ce | tar -x -C /tmp/base

Usage: python benchmarks/speed/bench_head.py STEPS WARMUP  (prints one JSON line)
"""
import json, sys, time, resource, contextlib
from collections import defaultdict
import torch
sys.path.insert(0, "/tmp/base")
import unic_cli; assert unic_cli.__file__.startswith("/tmp/base"), unic_cli.__file__
from unic_cli.config import DistillConfig
from unic_cli.plan import build_model, build_teachers
from unic_cli.student import build_student
from unic_cli.distill import param_groups
from unic_cli.losses import teacher_drop_coefficients, weighted_loss
torch.set_num_threads(2)
steps, warmup = int(sys.argv[1]), int(sys.argv[2])
config = DistillConfig.from_sources(None, dict(teachers=("dino_b16", "deit3_b"), data_dir="/tmp", student="vit_small_patch16_224",
    image_size=224, batch_size=16, ladder_hidden=768, ladder_last_hidden=3072, random_init_teachers=True, device="cpu"))
torch.manual_seed(0)
student = build_student(config.student, image_size=224, drop_path_rate=config.drop_path_rate)
teachers = build_teachers(config, student.grid, "cpu")
model = build_model(config, teachers, student)
opt = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=1e-4, betas=tuple(config.betas))
gen = torch.Generator().manual_seed(0)
images = torch.randint(0, 256, (16, 3, 224, 224), dtype=torch.uint8)
split = defaultdict(float)
@contextlib.contextmanager
def timer(name, on):
    t = time.perf_counter(); yield
    if on: split[name] += time.perf_counter() - t
model.train(); times = []
for step in range(warmup + steps):
    on = step >= warmup; t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    with timer("teachers", on): targets = [t(images) for t in teachers]
    with timer("student+loss", on):
        out = model(images, targets, 0.5)
        alpha = teacher_drop_coefficients(out.loss_TB, 0.5, gen); loss = weighted_loss(out.loss_TB, alpha)
    with timer("backward", on): loss.backward()
    if torch.isfinite(loss):
        with timer("optimizer", on): opt.step()
    times.append(time.perf_counter() - t0)
t = times[warmup:]
print(json.dumps({"label": "HEAD", "sec_per_step": sum(t)/len(t), "sec_per_step_min": min(t), "images_per_sec": 16*len(t)/sum(t),
                  "split_sec_per_step": {k: v/steps for k, v in split.items()}, "peak_mem_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss*1024}))
