"""DMD2 sampling speed: the 1-step student against the teacher at NFE 50, same batch, same device;
and the time of one DMD2 training step (``ttur_ratio`` fake-score updates + one generator update).

    python benchmarks/dmd2_speed.py --device cpu          # -> benchmarks/results/dmd2_speed-cpu.json
    python benchmarks/dmd2_speed.py --device cuda --dataset cifar10 --stand-in --teacher-steps 200 --batch 256

The student is the teacher's architecture (DMD2 initialises it from the teacher), so its speed does
not depend on training: we time an untrained copy. The teacher is fedlib's standard one
(``pretrained_teacher``, cached); ``--stand-in`` trains it briefly on seeded stand-in data of the
dataset's shape (throughput only).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch

from fedlib import dmd2
from fedlib import data as D
from fedlib.diffusion import get_sampler, pretrained_teacher, schedule
from fedlib.utils import resolve_device


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _time(fn, device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    p.add_argument("--out", default=None, help="output JSON (default benchmarks/results/dmd2_speed-<device>.json)")
    p.add_argument("--dataset", default="digits", help="teacher dataset: digits | fashion_mnist | cifar10")
    p.add_argument("--stand-in", action="store_true", help="train the teacher on fedlib's stand-in data")
    p.add_argument("--teacher-steps", type=int, default=500, help="teacher training steps (cached; 500 = notebook 04 quick)")
    p.add_argument("--batch", type=int, default=256, help="samples per batch (same for student and teacher)")
    p.add_argument("--train-batch", type=int, default=64, help="batch of the timed DMD2 training step")
    p.add_argument("--nfe", type=int, default=50, help="teacher NFE")
    p.add_argument("--sampler", default="dpm_solver_pp_2m", help="teacher sampler")
    p.add_argument("--ttur-ratio", type=int, default=5)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave as is)")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    data = None
    if args.stand_in:
        data = D.stand_in(args.dataset, "train", n=2048, seed=0)
    teacher = pretrained_teacher(args.dataset, steps=args.teacher_steps, seed=0, device=device, data=data,
                                 progress=False)
    train_x = (data if data is not None else _real(args.dataset)).x
    shape = tuple(train_x.shape[1:])
    x_T = teacher.process.prior((args.batch, *shape), generator=torch.Generator().manual_seed(0), device=device)
    times_teacher = schedule("edm", teacher.process, args.nfe).to(device)
    sampler = get_sampler(args.sampler)
    student = dmd2._trainable_copy(teacher).eval()
    times_student = dmd2.student_times(teacher.process, 1).to(device)

    with torch.no_grad():
        t_teacher = _time(lambda: sampler(teacher, x_T, times_teacher), device, args.repeats)
        t_student = _time(lambda: dmd2.sample_student(student, x_T, times_student), device, args.repeats)
    cfg = dmd2.DMD2Config(steps=1, ttur_ratio=args.ttur_ratio, batch_size=args.train_batch, checkpoint_every=0)
    # one DMD2 step = the second of two steps (the first pays for set-up and warm-up)
    cfg2 = dmd2.DMD2Config(steps=3, ttur_ratio=args.ttur_ratio, batch_size=args.train_batch, checkpoint_every=0)
    dmd2.train_dmd2(teacher, train_x, cfg, progress=False, device=device)
    _sync(device)
    r1 = dmd2.train_dmd2(teacher, train_x, cfg, progress=False, device=device)
    r3 = dmd2.train_dmd2(teacher, train_x, cfg2, progress=False, device=device)
    step_s = max((r3.seconds - r1.seconds) / 2, 1e-9)

    result = {
        "benchmark": "dmd2_speed",
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "dataset": args.dataset + (" (stand-in)" if args.stand_in else ""),
        "shape": list(shape),
        "batch": args.batch,
        "teacher": {"sampler": args.sampler, "nfe": args.nfe, "seconds_per_batch": t_teacher,
                    "samples_per_s": args.batch / t_teacher},
        "student_1_step": {"nfe": 1, "seconds_per_batch": t_student, "samples_per_s": args.batch / t_student},
        "speedup_student_over_teacher": t_teacher / t_student,
        "dmd2_training_step": {"seconds": step_s, "batch": args.train_batch, "ttur_ratio": args.ttur_ratio,
                               "what": f"{args.ttur_ratio} fake-score (+GAN critic) updates and 1 generator update"},
        "peer": f"the teacher at NFE {args.nfe} ({args.sampler}, EDM grid), same batch and device",
        "n_params": sum(p.numel() for p in teacher.parameters()),
        "torch": torch.__version__,
    }
    tag = device.type
    if device.type == "cuda":  # the GPU's name in the file name, e.g. dmd2_speed-cuda-nvidia-h100-80gb-hbm3.json
        tag += "-" + "".join(c if c.isalnum() else "-" for c in torch.cuda.get_device_name(0).lower()).strip("-")
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"dmd2_speed-{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return result


def _real(dataset: str):
    if dataset == "digits":
        return D.load_digits("train")
    return D.load_dataset(dataset, "train")


if __name__ == "__main__":
    main()
