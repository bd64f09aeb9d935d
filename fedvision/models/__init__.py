"""Model layer: torchvision architectures, offline weights, fine-tune modes."""

from fedvision.models.factory import (
    FINETUNE_MODES,
    apply_finetune,
    build_model,
    find_head,
    list_architectures,
    model_num_bytes,
    set_train_mode,
    trainable_parameters,
)

__all__ = [
    "FINETUNE_MODES",
    "apply_finetune",
    "build_model",
    "find_head",
    "list_architectures",
    "model_num_bytes",
    "set_train_mode",
    "trainable_parameters",
]
