"""The one training run under every task (classification, detection, segmentation): the runtime (rank, device,
AMP, DDP), the train state (saved and restored in one way) and the ``Trainer`` loop with its hooks.

Imports flow ops -> layers -> models -> engine -> tasks (train/, dense/) -> cli: nothing here imports a task."""
from .hooks import CheckpointHook, EvalHook, JsonlLogHook, ProgressHook, append_jsonl
from .loop import Hook, Interrupted, StepOutput, Trainer
from .runtime import Runtime, amp_dtype, cleanup_runtime, init_runtime, resolve_device, unwrap_model
from .state import TrainState, get_rng_state, seed_everything, seed_worker, set_rng_state

__all__ = ["CheckpointHook", "EvalHook", "JsonlLogHook", "ProgressHook", "append_jsonl", "Hook", "Interrupted",
           "StepOutput",
           "Trainer", "Runtime", "amp_dtype", "cleanup_runtime", "init_runtime", "resolve_device", "unwrap_model",
           "TrainState", "get_rng_state", "seed_everything", "seed_worker", "set_rng_state"]
