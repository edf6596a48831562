"""The run's log files beside its checkpoints: eval_reference.json, the rollout errors the student is compared
with (measured once per run), and metrics.jsonl / eval.jsonl, trimmed back to the step a run resumes from."""

import json
import math
import os

from atomic_files import write_lines


def reference_path(output_dir):
    """eval_reference.json: the rollout errors the student is compared with, measured once per run."""
    return os.path.join(output_dir, "eval_reference.json")


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
