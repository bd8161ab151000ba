#!/usr/bin/env python
"""Fill the exact teacher-logit cache up front: the teacher's logits for every view of every training image.

    python scripts/fill_teacher_cache.py --teacher resnet32x4 \\
        --teacher-ckpt checkpoints/cifar_teachers/resnet32x4_vanilla/ckpt_epoch_240.pth \\
        --cifar100 data --cache caches/teacher
    python scripts/fill_teacher_cache.py --teacher resnet8 --teacher-ckpt t.ckpt --num-classes 3 \\
        --image-folder data/digits --image-size 32 --cache caches/teacher

The cache folder and key are those a ``DistillationModule(teacher_cache=<--cache>)`` run with the same teacher,
checkpoint and data settings uses (see abkd_vision/teacher_cache.py), so the run then never computes the
teacher. Rows already complete are skipped; several fillers may run at once on one cache (use
``--shuffle-seed`` to make them meet less often). Views are batched: ``--images-per-batch`` images x 162 views
per teacher forward.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from abkd_vision.data import CIFAR100DataModule, ImageFolderDataModule  # noqa: E402
from abkd_vision.models import create_model, load_checkpoint  # noqa: E402
from abkd_vision.teacher_cache import TeacherLogitCache, cache_key, fill_cache, teacher_sha256  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", required=True, help="teacher model name (e.g. resnet32x4)")
    parser.add_argument("--teacher-ckpt", required=True, help="teacher weights (as DistillationModule.teacher_ckpt)")
    parser.add_argument("--trusted", action="store_true", help="allow full unpickling of the checkpoint")
    parser.add_argument("--cache", required=True, help="cache folder (as DistillationModule.teacher_cache)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--cifar100", metavar="ROOT", help="CIFAR-100 root (holding cifar-100-python/)")
    data.add_argument("--image-folder", metavar="ROOT", help="ImageFolderDataModule root")
    parser.add_argument("--num-classes", type=int, default=None, help="default: the data's class count")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--mean", type=float, nargs=3, default=None)
    parser.add_argument("--std", type=float, nargs=3, default=None)
    parser.add_argument("--padding", type=int, default=4, help="(image folders) random-crop padding")
    parser.add_argument("--no-hflip", action="store_true", help="(image folders) no horizontal flip")
    parser.add_argument("--train-per-class", type=int, default=None, help="(image folders) as the data module")
    parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
    parser.add_argument("--images-per-batch", type=int, default=8)
    parser.add_argument("--num-workers", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shuffle-seed", type=int, default=None, help="fill images in a random order")
    parser.add_argument("--recompute", action="store_true", help="compute complete rows again too")
    parser.add_argument("--quiet", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cifar100:
        datamodule = CIFAR100DataModule(args.cifar100, image_size=args.image_size, mean=args.mean, std=args.std,
                                        num_workers=0)
    else:
        datamodule = ImageFolderDataModule(args.image_folder, image_size=args.image_size, mean=args.mean,
                                           std=args.std, padding=args.padding, hflip=not args.no_hflip,
                                           train_per_class=args.train_per_class, num_workers=0)
    datamodule.setup("fit")
    num_classes = args.num_classes or datamodule.num_classes
    teacher = create_model(args.teacher, num_classes=num_classes)
    load_checkpoint(teacher, args.teacher_ckpt, trusted=args.trusted)
    views = datamodule.teacher_views()
    key = cache_key(teacher=args.teacher, num_classes=num_classes,
                    teacher_sha256=teacher_sha256(args.teacher_ckpt, teacher),
                    dataset=datamodule.view_dataset_key(), views=views, dtype=args.dtype)
    cache = TeacherLogitCache.open(args.cache, key)
    total = cache.num_images * cache.num_views
    print(f"cache {cache.directory}: {cache.filled_count():,} of {total:,} image views filled", flush=True)
    start = time.perf_counter()

    def progress(done: int, todo: int) -> None:
        if not args.quiet and (done == todo or done % max(1, 100 * args.images_per_batch) == 0):
            rate = done / max(time.perf_counter() - start, 1e-9)
            print(f"  {done:,}/{todo:,} images ({rate:.1f} images/s, {rate * views.num_views:.0f} views/s)",
                  flush=True)

    done = fill_cache(teacher, datamodule.train_set, views, cache, images_per_batch=args.images_per_batch,
                      num_workers=args.num_workers, device=args.device, progress=progress,
                      shuffle_seed=args.shuffle_seed, recompute=args.recompute)
    print(f"computed {done:,} images in {time.perf_counter() - start:.1f} s; "
          f"{cache.filled_count():,} of {total:,} image views filled", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
