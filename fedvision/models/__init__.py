"""Model layer: torchvision and registered architectures, offline weights, fine-tune modes."""

from fedvision.models.factory import (
    FINETUNE_MODES,
    LoadReport,
    apply_finetune,
    build_model,
    build_model_reporting,
    find_head,
    imagenet_weights_file,
    list_architectures,
    model_num_bytes,
    read_checkpoint,
    set_train_mode,
    trainable_parameters,
)
from fedvision.models.parts import (
    ModelParts,
    batchnorm_keys,
    fingerprint,
    split_parts,
    trained_keys,
)
from fedvision.models.registry import ARCHITECTURES, Architecture, fixed_input_size
from fedvision.models.simple_cnn import SimpleCNN

__all__ = [
    "ARCHITECTURES",
    "FINETUNE_MODES",
    "Architecture",
    "LoadReport",
    "ModelParts",
    "SimpleCNN",
    "apply_finetune",
    "batchnorm_keys",
    "build_model",
    "build_model_reporting",
    "find_head",
    "fingerprint",
    "fixed_input_size",
    "imagenet_weights_file",
    "list_architectures",
    "model_num_bytes",
    "read_checkpoint",
    "set_train_mode",
    "split_parts",
    "trainable_parameters",
    "trained_keys",
]
