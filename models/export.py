#!/usr/bin/env python3
"""Write the bundled models' TorchScript weights and the reference vectors.

Weights are generated, never committed: every run with the same seed writes the same
parameters, so the reference outputs that the tests compare against are reproducible.

    python models/export.py                     # bundled repository: models/<name>/1/model.pt
    python models/export.py --test-weights DIR  # also the weights of the test-only models

Reference vectors go to models/.reference/ (hidden, so no server takes it for a model):<model>.{json,input.bin,output.bin}: raw
little-endian FP32, row-major, with the shapes in the JSON file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

SEED = 20261126
HERE = Path(__file__).resolve().parent


class Mlp(nn.Module):
    """Tiny fully connected model: FP32 [B, 64] -> [B, 10]."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 128)
        self.fc2 = nn.Linear(128, 128)
        self.fc3 = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class Block(nn.Module):
    """Residual block: two 3x3 convolutions with batch norm and an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(x + y)


class Cnn(nn.Module):
    """Small ResNet-style convnet: FP32 [B, 3, 64, 64] -> [B, 10], compute-bound."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 32, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(32),
            nn.ReLU(),
        )
        self.stage1 = Block(32)
        self.down = nn.Sequential(
            nn.Conv2d(32, 64, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(),
        )
        self.stage2 = Block(64)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = self.stage1(x)
        x = self.down(x)
        x = self.stage2(x)
        x = torch.mean(x, dim=(2, 3))
        return self.head(x)


class RaiseOnNegative(nn.Module):
    """Test model: returns its input, raises when any element is negative."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if bool((x < 0).any()):
            raise RuntimeError("negative input is not allowed")
        return x * 2


class Identity(nn.Module):
    """Test model: returns its input unchanged, whatever its datatype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clone()


class AddSub(nn.Module):
    """Test model with two inputs and two outputs: (a + b, a - b)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor):
        return a + b, a - b


def randomize_batch_norm(module: nn.Module, gen: torch.Generator) -> None:
    """Give batch norm layers non-trivial running statistics, as a trained model has."""
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def save(module: nn.Module, path: Path) -> torch.jit.ScriptModule:
    path.parent.mkdir(parents=True, exist_ok=True)
    scripted = torch.jit.script(module.eval())
    tmp = path.with_suffix(".pt.tmp")
    torch.jit.save(scripted, str(tmp))
    os.replace(tmp, path)
    return scripted


def write_reference(name: str, scripted, shape: list[int], out_dir: Path, gen) -> None:
    """Input and expected output at batch 8, as raw little-endian FP32."""
    out_dir.mkdir(parents=True, exist_ok=True)
    x = torch.randn(*shape, generator=gen, dtype=torch.float32)
    with torch.no_grad():
        y = scripted(x)
    (out_dir / f"{name}.input.bin").write_bytes(x.contiguous().numpy().astype("<f4").tobytes())
    (out_dir / f"{name}.output.bin").write_bytes(y.contiguous().numpy().astype("<f4").tobytes())
    meta = {
        "model": name,
        "input": {"name": "INPUT__0", "datatype": "FP32", "shape": list(x.shape)},
        "output": {"name": "OUTPUT__0", "datatype": "FP32", "shape": list(y.shape)},
    }
    (out_dir / f"{name}.json").write_text(json.dumps(meta, indent=2) + "\n")


def export_bundled(repo: Path) -> None:
    gen = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED)
    mlp = Mlp()
    cnn = Cnn()
    randomize_batch_norm(cnn, gen)
    ref = repo / ".reference"
    for name, module, shape in (("mlp", mlp, [8, 64]), ("cnn", cnn, [8, 3, 64, 64])):
        scripted = save(module, repo / name / "1" / "model.pt")
        write_reference(name, scripted, shape, ref, gen)
        print(f"wrote {repo / name / '1' / 'model.pt'}")


def export_test_models(repo: Path) -> None:
    """Weights for the test-only repository; the tests write their own config.pbtxt."""
    save(RaiseOnNegative(), repo / "raise_on_negative.pt")
    save(Identity(), repo / "identity.pt")
    save(AddSub(), repo / "add_sub.pt")
    print(f"wrote test weights under {repo}")


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repo", type=Path, default=HERE, help="bundled repository (default: %(default)s)")
    p.add_argument("--test-weights", type=Path, help="also write the test-only model weights here")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    export_bundled(args.repo)
    if args.test_weights:
        export_test_models(args.test_weights)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
