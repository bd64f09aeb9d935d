"""NIID-Bench's ``simple-cnn``: the small LeNet-style CNN of its CIFAR-10 experiments."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fedvision.errors import FedvisionError

SIMPLE_CNN_INPUT_SIZE: int = 32


class SimpleCNN(nn.Module):
    """conv(3->6, 5x5) - ReLU - maxpool 2 - conv(6->16, 5x5) - ReLU - maxpool 2 - FC 400-120-84-C.

    Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An Experimental Study",
    ICDE 2022 (Xtra-Computing/NIID-Bench, ``SimpleCNN`` with ``input_dim=16*5*5``,
    ``hidden_dims=[120, 84]``). The layer names (``conv1``, ``conv2``, ``fc1``-``fc3``) are
    NIID-Bench's, so its state dicts load as they are. It takes 32x32 images, with raw
    ``[0, 1]`` pixels in NIID-Bench (transform ``normalise="none"``).

    Parameters
    ----------
    num_classes
        Outputs of the last layer, ``fc3``.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        # Registered in forward order: fine-tuning's last_k relies on it.
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of a ``[B, 3, 32, 32]`` batch."""
        if x.shape[-2:] != (SIMPLE_CNN_INPUT_SIZE, SIMPLE_CNN_INPUT_SIZE):
            # fc1's 400 inputs are 16 maps of 5x5, which only a 32x32 image gives.
            raise FedvisionError(
                f"simple_cnn takes {SIMPLE_CNN_INPUT_SIZE}x{SIMPLE_CNN_INPUT_SIZE} images, got "
                f"{x.shape[-2]}x{x.shape[-1]}; set data.size={SIMPLE_CNN_INPUT_SIZE}"
            )
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)
