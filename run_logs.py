"""The run's log files beside its checkpoints: eval_reference.json, the rollout errors the student is compared
with (measured once per run), and metrics.jsonl / eval.jsonl, trimmed back to the step a run resumes from."""

import json
import math
import os

from atomic_files import write_lines
from errors import WriteError, one_line


def reference_path(output_dir):
    """eval_reference.json: the rollout errors the student is compared with, measured once per run."""
    return os.path.join(output_dir, "eval_reference.json")


def eval_line(step, result, refs, num_steps, loss_name="kd loss"):
    """The console line of an eval: the held-out losses, then the student's rollout error (streaming, EMA when
    measured) beside the untrained student's and the teacher's own K steps; a causal ODE run's streaming error
    against the AR teacher's free-running samples beside the same two."""
    teacher = f"{refs['teacher']:.5f}" if "teacher" in refs else "n/a (no teacher configured)"
    per_entry = ", ".join(f"{k}={v:.5f}" for k, v in result.items() if k.startswith("loss_t"))
    if "rollout_error" not in result:  # clean data: nothing to roll out against
        return f"eval step {step}: {loss_name} {result['loss']:.5f} ({per_entry})"
    student = f"{result['rollout_error']:.5f}"
    untrained = f"{refs.get('untrained', math.nan):.5f}"
    if "rollout_error_streaming" in result:
        student += f" (streaming {result['rollout_error_streaming']:.5f})"
        untrained += f" (streaming {refs.get('untrained_streaming', math.nan):.5f})"
    if "rollout_error_ema" in result:
        student += f", EMA {result['rollout_error_ema']:.5f}"
        if "rollout_error_streaming_ema" in result:
            student += f" (streaming {result['rollout_error_streaming_ema']:.5f})"
    line = (f"eval step {step}: {loss_name} {result['loss']:.5f} ({per_entry}) | rollout error: student {student}, "
            f"untrained student {untrained}, teacher {num_steps}-step {teacher}")
    if "rollout_error_streaming_ar" in result:
        ema = result.get("rollout_error_streaming_ar_ema")
        line += (f" | streaming vs the AR teacher's own: student {result['rollout_error_streaming_ar']:.5f}"
                 + (f", EMA {ema:.5f}" if ema is not None else "")
                 + f", untrained student {refs.get('untrained_streaming_ar', math.nan):.5f}, teacher {num_steps}-step "
                 f"{refs.get('teacher_streaming', math.nan):.5f}")
    return line


def append_jsonl(output_dir, name, record, wandb=None):
    """Append one JSON line to output_dir/name (and log it to wandb when it is on)."""
    path = os.path.join(output_dir, name)
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise WriteError(f"writing {path}: {one_line(e)}") from None
    if wandb is not None:
        wandb.log({f"{name.removesuffix('.jsonl')}/{k}": v for k, v in record.items()}, step=record["step"])


def read_references(output_dir):
    """{untrained, teacher: rollout error} measured by an earlier start of this run, or {}."""
    if not os.path.exists(reference_path(output_dir)):
        return {}
    with open(reference_path(output_dir)) as f:
        return json.load(f)


def trim_logs(output_dir, step, rank):
    """Drop the log lines past `step`: a killed or failed run logged them after its last checkpoint (or before
    its first), and they are logged again from here."""
    if rank != 0:
        return
    for name in ("metrics.jsonl", "eval.jsonl"):
        path = os.path.join(output_dir, name)
        if os.path.exists(path):
            with open(path) as f:
                write_lines(path, [line for line in f if logged_step(line) <= step])


def logged_step(line):
    """The step of a metrics.jsonl / eval.jsonl line; a blank or torn line (a write cut short) sorts last."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf
