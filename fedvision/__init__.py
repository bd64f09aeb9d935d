"""fedvision: federated fine-tuning of pretrained CNNs on ImageNet-style data."""

__version__ = "0.1.0"
