"""Message keys and file names, kept in one place so that writers and readers agree."""

# --- decoded cache (fedvision data prepare) ------------------------------------------------------
CACHE_META = "meta.json"  # written last: its presence marks a complete cache
CACHE_IMAGES = "images.u8"  # uint8 memmap, shape [N, 3, H, W]
CACHE_LABELS = "labels.npy"  # int64 [N]
CACHE_PROGRESS = "progress.jsonl"  # resumable prepare: one line per finished chunk

# --- partitions ----------------------------------------------------------------------------------
PARTITION_FILE = "partition.npz"
PARTITION_STATS = "partition_stats.md"
PARTITION_SUMMARY = "partition.json"  # the partition's fingerprint and heterogeneity numbers
PARTITION_HEATMAP = "partition_heatmap.png"

# --- run directory -------------------------------------------------------------------------------
RUN_CONFIG = "config.yaml"  # the resolved config as the run started; never rewritten
RUN_RESUMES = "resumes.jsonl"  # one line per resume: after which round, which keys changed
RUN_PLAN = "run.json"  # what the launcher prepared: caches, partition, classes (apps read it)
RUN_SERVER = "server.json"  # which server process writes the run now (a restarted one takes over)
RUN_INTERRUPT = "interrupt"  # the launcher got SIGINT/SIGTERM: the server stops at its next poll
RUN_NODES = "nodes.jsonl"  # which node holds which partition, and every node refused one
RUN_STATUS = "status.json"  # written by the ServerApp when it ends: finished or failed, and why
SWEEP_SUMMARY = "sweep.json"  # a sweep directory's list of its runs and how each ended
SWEEP_REFUSED = "refused.jsonl"  # jobs of this sweep refused over another config's directory
HYDRA_RECORD = ".hydra"  # Hydra's config, hydra.yaml and overrides.yaml of a run
RUN_INITIAL = "initial_weights.pt"  # the round-0 global model, written before the runtime starts
RUN_WEIGHTS = "weights.json"  # where the round-0 weights came from: kept / re-initialised layers
SERVER_VAL = "server_val.npy"  # training-set indices the server holds out for model selection
RUN_VERSIONS = "versions.json"
RUN_METRICS = "metrics.jsonl"
RUN_SUMMARY = "summary.json"
RUN_CURVES = "curves.png"
CKPT_LATEST = "checkpoint_latest.pt"
CKPT_BEST = "checkpoint_best.pt"

# --- fedvision report ---------------------------------------------------------------------------
REPORT_MD = "report.md"
REPORT_CSV = "report.csv"
REPORT_PLOT = "report.png"

# --- Flower run config (the same key for `fedvision run` and `flwr run --run-config`) ---------
RUN_DIR_KEY = "run-dir"

# --- Flower message keys -------------------------------------------------------------------------
KEY_ARRAYS = "arrays"
KEY_FLAT = "flat"  # the one array of a packed model (fedvision/fl/arrays.py: pack)
KEY_METRICS = "metrics"
KEY_CONFIG = "config"
KEY_NUM_EXAMPLES = "num-examples"  # Flower's strategies weight by this key
KEY_PROXIMAL_MU = "proximal-mu"  # set by flwr.serverapp.strategy.FedProx
KEY_SERVER_ROUND = "server-round"
KEY_PARTITION_ID = "partition-id"
KEY_NUM_PARTITIONS = "num-partitions"

# --- node config (what a client knows about itself) ---------------------------------------------
NODE_CACHE_DIR = "cache-dir"  # decoded train cache of this node's data
NODE_PARTITION_FILE = "partition-file"  # partition.npz naming this node's indices
NODE_DEVICE = "device"  # auto | cpu | cuda (a simulation's clients take it from run.json)
NODE_PARTITION_INDEX = "partition-index"  # which client of partition-file (default partition-id)

# --- metric keys in client replies ---------------------------------------------------------------
KEY_TRAIN_LOSS = "train_loss"
KEY_TRAIN_ACC = "train_accuracy"
KEY_TRAIN_SECONDS = "train_s"
KEY_VAL_LOSS = "val_loss"
KEY_VAL_ACC = "val_accuracy"
KEY_NUM_TRAIN = "num-train"
KEY_NUM_VAL = "num-val"

# --- dataset trees (ImageNet layout and the built-in generated dataset) --------------------------
SYNSET_MAPPING = "LOC_synset_mapping.txt"  # ImageNet's "<wnid> <names>" per line
KAGGLE_VAL_CSV = "LOC_val_solution.csv"
VAL_LABEL_FILES = ("val_labels.txt", "ILSVRC2012_val_labels.txt")
DEVKIT_GT = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_META = "meta.mat"
DATASET_JSON = "fedvision_dataset.json"  # written last: its presence marks a complete tree
SOURCE_CLASSES = "source_classes.txt"  # built-in: classes for pretraining
TARGET_CLASSES = "target_classes.txt"  # built-in: classes for federated fine-tuning

# --- partial messages and FedBN (appended; see fedvision/fl/parts.py) ---------------------------
KEY_LOCAL_BN = "local-bn"  # round config: FedBN, BatchNorm layers stay with each client
KEY_BN_MODE = "bn-mode"  # round config: "eval" keeps BatchNorm statistics frozen (not sent)
KEY_BASE_FINGERPRINT = "base-fingerprint"  # round config: sha256 of the entries never sent
KEY_BN_STATS = "bn-stats"  # train/evaluate message and train reply: packed BatchNorm statistics
KEY_NEW_BN = "new-bn"  # train reply metric: 1 when this client's BatchNorm started from the base
NODE_INITIAL_WEIGHTS = "initial-weights"  # node config: the run's initial_weights.pt
STATE_LOCAL_BN = "fedvision-local-bn"  # Context.state record: this client's own BatchNorm

# --- fedvision compress (appended; see fedvision/compress/) -------------------------------------
COMPRESS_DIR = "compress"  # default output folder, inside the run directory
COMPRESS_FLOAT = "float.pt"  # the uncompressed model as a plain {"model": state_dict}
COMPRESS_PRUNED = "pruned-{:g}.pt"  # global unstructured pruning to this sparsity
COMPRESS_CHANNELS = "channels-{:g}.pt"  # this share of each conv layer's output channels zeroed
COMPRESS_INT8 = "int8.pt"  # {"int8_model": quantized state dict}; fedvision.compress.load_int8
COMPRESS_MD = "compress.md"
COMPRESS_CSV = "compress.csv"
COMPRESS_JSON = "compress.json"

# --- SCAFFOLD and FedNova (appended; see strategies/scaffold.py, strategies/fednova.py) ---------
KEY_CONTROL = "scaffold-c"  # train message: the server's control variate c (packed like the model)
KEY_CONTROL_DELTA = "scaffold-dc"  # train reply: c_i+ - c_i (packed like the model)
STATE_CONTROL = "fedvision-scaffold-ci"  # Context.state record: this client's control variate c_i
# --- client state in the run directory (appended; see fedvision/fl/client_state.py) ----------
CLIENT_STATE_DIR = "client-state"  # run dir: per-client state (c_i, FedBN), by partition and round
KEY_CLIENT_STATE = "client-state"  # round config: that folder, when the clients can see it
KEY_STEPS = "steps"  # train reply metric: local optimiser steps done (FedNova's tau_i)
KEY_MOMENTUM = "momentum"  # train config and reply metric: the SGD momentum of local training
# --- simulated system heterogeneity (appended; see fedvision/system/) ---------------------------
RUN_SYSTEM = "system.json"  # each client's simulated device: speed (samples/s), bandwidth (B/s)
REPORT_SIM_PLOT = "report_sim_time.png"  # fedvision report: test accuracy over simulated time
REPORT_PRIVACY_PLOT = "report_privacy.png"  # fedvision report: test accuracy against epsilon
KEY_TRAIN_SAMPLES = "train_samples"  # train reply metric: samples processed (the clock's work)
# --- differential privacy (appended; see fedvision/privacy/) -------------------------------------
KEY_DP_MODE = "dp-mode"  # round config: client-level DP: none | server-/client- fixed/adaptive
KEY_DPSGD_NOISE = "dpsgd-noise-multiplier"  # round config: DP-SGD on (sample-level) when present
KEY_DPSGD_CLIP = "dpsgd-max-grad-norm"
KEY_DP_DELTA = "dp-delta"
KEY_DPSGD_EPSILON = "dpsgd-epsilon"  # train reply: this client's sample-level epsilon so far
KEY_DPSGD_STEPS = "dpsgd-steps"  # train reply: this client's DP-SGD steps so far
STATE_DPSGD = "fedvision-dpsgd"  # Context.state record: DP-SGD steps this client took in the run
KEY_DPSGD_PRIOR = "dpsgd-prior-steps"  # round config: DP-SGD steps per partition id so far
# --- secure aggregation (appended; see fedvision/fl/secagg.py) ----------------------------------
KEY_SECAGG_MAX_WEIGHT = "secagg-max-weight"  # round config: the weight that maps to ratio 1
KEY_SECAGG_CLIP = "secagg-clipping-range"  # round config: SecAgg+ clips weighted values to +-this
KEY_SECAGG_CLIPPED = "secagg-clipped"  # train reply metric: values of this update SecAgg+ clips

# --- the round's train config (server -> client; fedvision/fl/round_config.py) -------------------
KEY_MODEL_NAME = "model-name"  # the architecture, as conf/model names it
KEY_MODEL_FINETUNE = "model-finetune"  # full | head | last_k
KEY_MODEL_LAST_K = "model-last-k"  # blocks that train under last_k
KEY_NUM_CLASSES = "num-classes"  # classes of the run's dataset (the head's width)
KEY_LOCAL_EPOCHS = "local-epochs"  # epochs over the client's data (0: the step count alone)
KEY_LOCAL_STEPS = "local-steps"  # a cap on local steps (-1: none)
KEY_BATCH_SIZE = "batch-size"
KEY_OPTIMIZER = "optimizer"  # sgd | adam | adamw
KEY_LR = "lr"  # this round's learning rate (the schedule is the server's)
KEY_WEIGHT_DECAY = "weight-decay"
KEY_AUGMENT = "augment"  # an augmentation preset of fedvision/data/transforms.py
KEY_NORMALISE = "normalise"  # imagenet | none
KEY_BACKBONE_LR_FACTOR = "backbone-lr-factor"  # lr outside the head, as a multiple of lr
KEY_SEED = "seed"  # the run's seed; each client derives its own per round

# --- cohort execution (fedvision/fl/cohort.py) ----------------------------------------------------
KEY_COHORT = "cohort"  # train config to a cohort worker: the partitions it trains, in order
KEY_COHORT_CLIP = "cohort-clip"  # client-level DP: the fixed norm a worker clips each update to
KEY_COHORT_NORMALISE = "cohort-normalise"  # FedNova: a worker sums normalised updates
KEY_COHORT_CLIENTS = "cohort-clients"  # reply metric: clients behind a cohort's unweighted mean
# Simulated devices (fedvision/system): per-client lists, aligned with KEY_COHORT.
KEY_COHORT_LOCAL_STEPS = "cohort-local-steps"  # each client's local-step cap (-1: none)
KEY_COHORT_LOCAL_EPOCHS = "cohort-local-epochs"  # and its local epochs
KEY_COHORT_TRANSFER = "cohort-transfer"  # its simulated download + upload seconds
KEY_COHORT_SPEED = "cohort-speed"  # its simulated samples per second
KEY_COHORT_DEADLINE = "cohort-deadline"  # the round's deadline (s): later clients stay out
KEY_COHORT_REPORT = "cohort-report"  # its reply's ConfigRecord: per-client results, below
KEY_COHORT_DONE = "cohort-done"  # partitions that trained (their mean is the reply's arrays)
KEY_COHORT_NUM_TRAIN = "cohort-num-train"  # their example counts
KEY_COHORT_LOSSES = "cohort-losses"  # their train losses
KEY_COHORT_NORMS = "cohort-norms"  # their update norms (L2 of new - global parameters)
KEY_COHORT_FAILED = "cohort-failed"  # partitions that failed
KEY_COHORT_REASONS = "cohort-reasons"  # and why (the last line of each error)
KEY_COHORT_TRAINED = "cohort-trained"  # every partition that trained, in the mean or late
KEY_COHORT_STEPS = "cohort-steps"  # their local steps (aligned with KEY_COHORT_TRAINED)
KEY_COHORT_SAMPLES = "cohort-samples"  # their samples processed (the simulated clock's work)
KEY_COHORT_LATE = "cohort-late"  # partitions that trained but missed the deadline (not in the mean)
