"""Central (non-federated) baseline: how hard is a dataset for a small CNN trained from scratch?

A plain PyTorch loop, no fedvision engine, so that it measures the data, not our training code.
It decodes the images with ``fedvision.data.images.decode_resized`` (the same function as
``data prepare``), trains a small CNN for a time budget, prints the validation accuracy after
every epoch and, last, one JSON line.

Used to tune the built-in generator. Measured on 2 shared CPU cores, default dataset (10 target
classes, 3000 train / 500 val images, 64 px): about 4.8 s per epoch, val accuracy 0.68 after
120 s (23 epochs; 0.61-0.71 from epoch 7 on), chance 0.10::

    python scripts/central_baseline.py --classes target --budget-s 120

Example: python scripts/central_baseline.py --root ~/data/imagenet --classes all --size 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from fedvision.data.folder import ClassSelection, scan_split
from fedvision.data.generate import generate_dataset, read_source_target
from fedvision.data.images import decode_resized


def tiny_cnn(num_classes: int) -> nn.Module:
    """Stride-2 stem then conv-BN-ReLU stages (32-32-64-128-256), global pool, linear head.

    Small on purpose: about 25 MFLOPs per 64 px image, so that a 2-core CPU runs several epochs
    of the built-in target classes in two minutes.
    """

    def stage(cin: int, cout: int, stride: int = 1) -> list[nn.Module]:
        conv = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        return [conv, nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *stage(3, 32, stride=2),
        *stage(32, 32),
        nn.MaxPool2d(2),
        *stage(32, 64),
        nn.MaxPool2d(2),
        *stage(64, 128),
        nn.MaxPool2d(2),
        *stage(128, 256),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(256, num_classes),
    )


def load_split(
    root: Path, split: str, selection: ClassSelection, size: int, progress: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one split into a uint8 tensor [N, 3, size, size] and int64 labels."""
    scanned = scan_split(root, split, selection)
    images = np.stack(
        [
            decode_resized(p, size)
            for p in tqdm(scanned.files, desc=f"decode {split}", disable=not progress)
        ]
    )
    return torch.from_numpy(images), torch.from_numpy(scanned.labels)


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Top-1 accuracy of ``model`` on uint8 images ``x``."""
    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            logits = model(normalise(x[i : i + batch]))
            correct += int((logits.argmax(1) == y[i : i + batch]).sum())
    return correct / max(len(x), 1)


def normalise(x: torch.Tensor) -> torch.Tensor:
    """uint8 [B,3,H,W] -> float, roughly zero-mean unit-variance."""
    return (x.float() - 127.5) / 64.0


def main(argv: list[str] | None = None) -> dict:
    """Parse arguments, train for the time budget, print per-epoch accuracy and a JSON line."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, help="ImageNet-style folder (default: built-in dataset)")
    ap.add_argument("--classes", choices=["target", "source", "all"], default="target")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--budget-s", type=float, default=120.0, help="training time budget")
    ap.add_argument("--max-epochs", type=int, default=100)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    progress = not args.no_progress

    root = args.root if args.root is not None else generate_dataset(progress=progress)
    selection = ClassSelection()
    if args.classes != "all":
        source, target = read_source_target(root)
        selection = ClassSelection.from_config(wnids=target if args.classes == "target" else source)
    x_train, y_train = load_split(root, "train", selection, args.size, progress)
    x_val, y_val = load_split(root, "val", selection, args.size, progress)
    num_classes = int(y_train.max()) + 1
    model = tiny_cnn(num_classes)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(args.seed)

    t0 = time.perf_counter()
    history = []
    epoch = 0
    while epoch < args.max_epochs and time.perf_counter() - t0 < args.budget_s:
        model.train()
        order = torch.randperm(len(x_train), generator=gen)
        for i in range(0, len(order), args.batch_size):
            idx = order[i : i + args.batch_size]
            xb = x_train[idx]
            # Random horizontal flips: the classes are invariant to them.
            flip = torch.rand(len(idx), generator=gen) < 0.5
            xb[flip] = xb[flip].flip(-1)
            loss = nn.functional.cross_entropy(model(normalise(xb)), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if time.perf_counter() - t0 > args.budget_s:
                break
        epoch += 1
        acc = evaluate(model, x_val, y_val)
        history.append(acc)
        elapsed = time.perf_counter() - t0
        print(
            f"epoch {epoch:3d}  {elapsed:6.1f} s  loss {loss.item():.3f}  val acc {acc:.3f}",
            flush=True,
        )
    result = {
        "root": str(root),
        "classes": args.classes,
        "num_classes": num_classes,
        "train_images": len(x_train),
        "val_images": len(x_val),
        "epochs": epoch,
        "train_seconds": round(time.perf_counter() - t0, 1),
        "final_val_acc": round(history[-1], 4) if history else None,
        "best_val_acc": round(max(history), 4) if history else None,
        "chance": round(1 / num_classes, 4),
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
