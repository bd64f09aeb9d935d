#!/usr/bin/env bash
# The transfer experiment (docs/results/transfer.md): federated fine-tuning from the
# pretrained checkpoint vs from scratch, under IID / Dirichlet 0.5 / Dirichlet 0.1, with FedAvg and
# FedProx, 3 seeds each; plus central references on the same training images with the same
# budget (4 epochs): fine-tuning everything, and fitting only the head (a linear probe, the
# accuracy *before* federated fine-tuning), from the pretrained backbone and from random weights.
# Writes multirun/transfer/{federated,central}/ and the tables in multirun/transfer/report-*/.
set -euo pipefail
cd "$(dirname "$0")/.."
FV=${FV:-.venv/bin/fedvision}
OUT=${OUT:-multirun/transfer}
export FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1

# Central references: the clients' optimiser settings (SGD lr 0.02, batch 32, no warm-up or label
# smoothing, light augmentation), 4 epochs over the 2,700 training images the clients share.
$FV pretrain -m data.subset=target model.weights=pretrained,none model.finetune=full,head \
  recipe.epochs=4 recipe.lr=0.02 recipe.batch_size=32 recipe.warmup_epochs=0 \
  recipe.label_smoothing=0 seed=0,1,2 progress=false "hydra.sweep.dir=$OUT/central"

$FV run -m experiment=transfer "hydra.sweep.dir=$OUT/federated"

$FV report "$OUT/federated" --out "$OUT/report-federated" --target 0.3
$FV report "$OUT/central" --out "$OUT/report-central" --target 0.3
