"""Reliability campaign on the tiny configs: kill, corrupt, fill and fuzz, then print what survived.

    python faults.py            # full mode: 10+ trials per scenario (about 15 minutes on 2 CPU cores)
    python faults.py --quick    # CI: one or two trials per scenario (about a minute)
    python faults.py --jobs 1   # one scenario at a time (default 2: two scenarios keep two cores busy)

1. generation killed with SIGKILL at a random moment (1 and 2 ranks), then rerun: the cache equals an
   uninterrupted run's, tensor for tensor, and no temporary file remains;
2. training killed with SIGKILL at a random moment or during a checkpoint write, then rerun: it resumes from
   the newest complete checkpoint and logs the uninterrupted run's losses bit for bit;
3. cache files truncated, bit-flipped or deleted: training refuses them (an error naming the file, never a bad
   tensor) and a rerun of generation rewrites exactly those files;
4. the disk filling up (a small tmpfs, when this process may mount one) or a file-size limit (`ulimit -f`)
   during generation and training: one clear error, no partial file taken as complete, and the rerun
   completes;
5. hundreds of random mutations of the shipped configs: each one a one-line ConfigError naming the field;
6. a non-finite value injected at a random step (into a batch or into the weights): the run stops with a
   message and no checkpoint holds non-finite weights;
7. causal ODE (an AR teacher): its generation and its stage-1 teacher forcing (ar_diffusion.py) SIGKILLed at a
   random moment, then rerun, must equal the uninterrupted cache and logs; a bit flipped in a sample's clean
   context latent is refused by the read that uses it, naming the file, and regeneration rewrites that file;
8. image-to-video (a Wan2.2-TI2V-style and a Wan2.1-I2V-style tiny teacher in turn): generation SIGKILLed at a
   random moment, then rerun, must equal the uninterrupted cache; an edited image makes the cache stale (one error
   naming the field); a bit flipped in a stored CLIP token is found, naming the file, and regenerated.

Every run is a real subprocess of the real scripts (torchrun for two ranks); faults are injected from outside,
except scenario 6, whose run is kd.main with a KDTrainer subclass that poisons one step. Exit status 1 if any
trial lost or corrupted something or a bad input did not end in a clear error.
"""

import argparse
import concurrent.futures
import copy
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import atomic_files
import cache_format
import checkpoints
import config
import errors
import export
import generate_cache
import kd
import tiny_demo
from processes import command, kill, run, start, wait_for

REPO = Path(__file__).resolve().parent
TINY = REPO / "configs" / "tiny.yaml"
SHIPPED_CONFIGS = ["tiny.yaml", "tiny_causal.yaml", "wan.yaml", "wan_causal.yaml"]
AR_FRAMES_PER_BLOCK = 3  # scenario 7's AR teacher: the random tiny teacher, 6 latent frames in blocks of 3
CAUSAL_SAMPLES, CAUSAL_STEPS = 4, 15  # scenario 7's cache and stage-1 run, smaller than the others
I2V_SAMPLES = 4  # scenario 8's caches
NUM_SAMPLES = 6
TRAIN_STEPS = 30
CHECKPOINT_EVERY = 5


@dataclass
class Outcome:
    """One scenario's row of the table."""

    scenario: str
    trials: int = 0
    survived: int = 0
    lost: int = 0  # files lost or corrupt (stray temporary files included)
    clear: int = 0  # bad inputs that ended in one clear error ...
    bad_inputs: int = 0  # ... out of these (0: the scenario has no bad input to report)

    def ok(self):
        return (self.trials > 0 and self.survived == self.trials and self.lost == 0
                and self.clear == self.bad_inputs)


# ----------------------------------------------------------------------------------------------------------
# Running the scripts


def overrides(cache, *extra):
    return [*tiny_demo.random_tiny_overrides(cache), f"data.num_samples={NUM_SAMPLES}",
            "training.previews=false", *extra]


def train_overrides(cache, out, *extra):
    return overrides(cache, f"training.output_dir={out}", f"training.max_steps={TRAIN_STEPS}",
                     "training.log_every=1", f"training.checkpoint_every={CHECKPOINT_EVERY}",
                     "training.keep_checkpoints=2", "training.eval_every=15", "training.eval_samples=2",
                     "training.num_workers=1", *extra)


def is_clear_error(proc, names=()):
    """Exit status 2, the last stderr line `error: ...` naming one of `names` (if given), and no traceback."""
    lines = proc.stderr.strip().splitlines()
    last = lines[-1] if lines else ""
    return (proc.returncode == 2 and "Traceback" not in proc.stderr
            and re.match(r"error( \(rank \d+\))?: ", last) is not None
            and (not names or any(str(n) in last for n in names)))


def timed_run(cmd, marker):
    """Seconds from `marker` appearing to the end of an uninterrupted run."""
    proc = start(cmd)
    wait_for(marker, proc)
    appeared = time.time()
    proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd} failed ({proc.returncode}); run it by hand to see why")
    return time.time() - appeared


# ----------------------------------------------------------------------------------------------------------
# Comparing caches and runs


def read_file(path):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def same_file(a, b):
    import torch

    try:
        (ta, ma), (tb, mb) = read_file(a), read_file(b)
    except Exception:  # missing or unreadable
        return False
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


def cache_files(cache):
    names = sorted(os.listdir(Path(cache) / "samples")) if (Path(cache) / "samples").is_dir() else []
    return [Path("samples") / n for n in names] + [Path("negative_prompt_embeds.safetensors")]


def stray_temporaries(folder):
    return [p for p in Path(folder).rglob("*") if p.name.endswith(".tmp")]


def cache_damage(cache, reference):
    """Files of `cache` that are missing, differ from `reference`'s or should not be there (temporary
    files)."""
    damage = [str(p) for p in cache_files(reference) if not same_file(Path(cache) / p, Path(reference) / p)]
    damage += [str(p) for p in stray_temporaries(cache)]
    for name in ("metadata.json", "COMPLETE"):
        a, b = Path(cache) / name, Path(reference) / name
        if not a.exists() or json.loads(a.read_text()) != json.loads(b.read_text()):
            damage.append(name)
    return damage


def read_log(path):
    """A run's metrics.jsonl or eval.jsonl without the timing field."""
    if not Path(path).exists():
        return []
    return [{k: v for k, v in json.loads(line).items() if k != "samples_per_s"}
            for line in Path(path).read_text().splitlines()]


def log_damage(run_dir, reference):
    """Log lines of a finished run that differ from the uninterrupted run's, plus temporary folders left
    behind."""
    damage = 0
    for name in ("metrics.jsonl", "eval.jsonl"):
        a, b = read_log(Path(run_dir) / name), read_log(Path(reference) / name)
        damage += sum(x != y for x, y in zip(a, b)) + abs(len(a) - len(b))
    return damage + len(stray_temporaries(run_dir))


def complete_checkpoint_steps(run_dir):

    return sorted(checkpoints.checkpoint_dirs(str(run_dir)))


def resumed_step(output):
    found = re.search(r"resumed from \S+ at step (\d+)", output)
    return int(found.group(1)) if found else None


def finite_checkpoint(path):
    """Whether the student weights of a checkpoint folder load and are all finite."""
    import torch

    model = export.load_checkpoint_student(str(path), export.run_config(str(path)))
    return all(bool(torch.isfinite(p).all()) for p in model.state_dict().values())


# ----------------------------------------------------------------------------------------------------------
# 1. Generation killed


def generation_kills(trials, rng, work, reference, write_seconds):
    outcome = Outcome("1. generation SIGKILLed at random, rerun (1 and 2 ranks)")
    for trial in range(trials):
        ranks = 1 + trial % 2
        cache = work / f"gen_kill_{trial}"
        cmd = command("generate_cache.py", [TINY, *overrides(cache)], ranks)
        proc = start(cmd)
        if trial // 2 % 2 == 0:  # at a random moment of the writing phase
            wait_for(cache / "metadata.json", proc)  # samples are written from here on
            # a subprocess writes faster than the in-process run
            time.sleep(rng.uniform(0, 0.6 * write_seconds))
        else:  # just after a random sample file appeared, while the next one is computed or written
            wait_for(cache / "samples" / f"{rng.randrange(NUM_SAMPLES - 1):08d}.safetensors", proc)
            time.sleep(rng.uniform(0, 0.5 * write_seconds / NUM_SAMPLES))
        kill(proc)
        written = (f"{count_samples(cache)}/{NUM_SAMPLES} samples written"
                   f"{', COMPLETE' * (cache / 'COMPLETE').exists()}")
        rerun = run(cmd)
        damage = cache_damage(cache, reference)
        outcome.trials += 1
        outcome.survived += rerun.returncode == 0 and not damage
        outcome.lost += len(damage)
        report(outcome, trial, f"{ranks} rank(s), killed with {written}", damage)
        shutil.rmtree(cache, ignore_errors=True)
    return outcome


def count_samples(cache):
    return len(os.listdir(cache / "samples")) if (cache / "samples").is_dir() else 0


# ----------------------------------------------------------------------------------------------------------
# 2. Training killed


def training_kills(trials, rng, work, cache, references):
    outcome = Outcome("2. training SIGKILLed at random / in a checkpoint write, resumed")
    for trial in range(trials):
        ranks = 1 + trial % 2 if 2 in references else 1
        reference, train_seconds = references[ranks]
        out = work / f"train_kill_{trial}"
        cmd = command("kd.py", [TINY, *train_overrides(cache, out)], ranks)
        proc = start(cmd)
        if trial % 4 < 2:  # during the write of a random checkpoint
            step = rng.randrange(CHECKPOINT_EVERY, TRAIN_STEPS, CHECKPOINT_EVERY)
            wait_for(out / f"checkpoint-{step}.tmp", proc)
            time.sleep(rng.uniform(0, 0.02))
            moment = f"in the write of checkpoint-{step}"
        else:
            wait_for(out / "metrics.jsonl", proc)
            delay = rng.uniform(0, 0.9 * train_seconds)
            time.sleep(delay)
            moment = f"{delay:.2f} s after the first step"
        kill(proc)
        newest = (complete_checkpoint_steps(out) or [None])[-1]
        rerun = run(cmd)
        damage = log_damage(out, reference) if rerun.returncode == 0 else 1
        right_start = resumed_step(rerun.stdout + rerun.stderr) == newest
        outcome.trials += 1
        outcome.survived += rerun.returncode == 0 and damage == 0 and right_start
        outcome.lost += damage
        report(outcome, trial, f"{ranks} rank(s), killed {moment}; resumed at {newest}",
               [] if right_start and not damage else [f"resumed at the wrong step or {damage} lines differ"])
        shutil.rmtree(out, ignore_errors=True)
    return outcome


# ----------------------------------------------------------------------------------------------------------
# 3. Corrupt cache files


def corrupt(path, rng):
    """Truncate, flip one random bit of, or delete the file; returns what was done."""
    data = bytearray(path.read_bytes())
    kind = rng.choice(["truncate", "bit flip", "delete"])
    if kind == "delete":
        path.unlink()
        return kind
    if kind == "truncate":
        cut = rng.randrange(len(data))
        path.write_bytes(bytes(data[:cut]))
        return f"truncate to {cut} bytes"
    position = rng.randrange(len(data))
    data[position] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return f"bit flip at byte {position}"


def training_reads(cache, reference, bad_paths):
    """Read every state of every sample through the training dataset (and the negative embeddings).

    Returns (bad files refused with a CacheError naming them, reads that returned a tensor differing from the
    reference's or failed in another way).
    """
    import torch

    dataset = kd.TrajectoryDataset(str(cache), [0, 1, 2, 3, 4], 512)
    reference_set = kd.TrajectoryDataset(str(reference), [0, 1, 2, 3, 4], 512)
    refused, wrong = set(), 0
    for index in range(NUM_SAMPLES):
        for step in range(4):
            key = (index, (step,) * 6)
            try:
                item = dataset[key]
            except errors.CacheError as e:
                refused.update(p for p in bad_paths if str(p) in str(e))
                wrong += not any(str(p) in str(e) for p in bad_paths)  # refusing a good file is wrong too
                continue
            expected = reference_set[key]
            wrong += not all(torch.equal(item[k], expected[k]) for k in ("x_t", "x0", "prompt_embeds"))
    negative = Path(cache_format.negative_embeds_path(str(cache)))
    try:
        wrong += not torch.equal(cache_format.read_negative_embeds(str(cache)),
                                 cache_format.read_negative_embeds(str(reference)))
    except errors.CacheError as e:
        refused.update(p for p in bad_paths if p == negative and str(p) in str(e))
        wrong += negative not in bad_paths
    return refused, wrong


def cache_corruptions(trials, rng, work, reference):

    outcome = Outcome("3. cache files truncated / bit-flipped / deleted")
    for trial in range(trials):
        cache = work / f"corrupt_{trial}"
        shutil.copytree(reference, cache)
        # sample 0 is the one training sample of the CLI check below; samples 1-5 are its held-out samples
        candidates = [Path(cache_format.sample_path(str(cache), i)) for i in range(1, NUM_SAMPLES)]
        candidates.append(Path(cache_format.negative_embeds_path(str(cache))))
        victims = rng.sample(candidates, rng.randint(1, 3))
        done = [f"{v.name}: {corrupt(v, rng)}" for v in victims]
        refused, wrong = training_reads(cache, reference, victims)
        cli = run(command("kd.py", [TINY, *train_overrides(cache, work / f"corrupt_run_{trial}",
                                                            "training.eval_samples=5",
                                                            "training.batch_size=1",
                                                            "training.max_steps=1")]))
        stamps = {p: os.stat(p).st_mtime_ns
                  for p in map(Path, candidates + [cache_format.sample_path(str(cache), 0)])
                  if p.exists() and p not in victims}
        quietly(generate_cache.generate_cache, config.load_config(TINY, overrides(cache)))
        untouched = all(os.stat(p).st_mtime_ns == t for p, t in stamps.items())
        damage = cache_damage(cache, reference)
        outcome.trials += 1
        outcome.bad_inputs += len(victims) + 1  # each bad file, and the training run started on the cache
        outcome.clear += len(refused) + is_clear_error(cli, victims)
        outcome.survived += not wrong and not damage and untouched
        outcome.lost += len(damage) + wrong
        report(outcome, trial, "; ".join(done) + f"; training refused {len(refused)}/{len(victims)}, "
               f"CLI: {cli.stderr.strip().splitlines()[-1] if cli.stderr.strip() else cli.returncode}",
               damage + ([f"{wrong} wrong reads"] if wrong else [])
               + ([] if untouched else ["good files rewritten"]))
        shutil.rmtree(cache, ignore_errors=True)
    return outcome


# ----------------------------------------------------------------------------------------------------------
# 4. Disk full / file-size limit


class SmallDisk:
    """A tmpfs of `kib` KiB mounted at `path` (needs root: `available()` says whether this process may
    mount)."""

    def __init__(self, path, kib):
        self.path, self.kib = Path(path), kib

    @staticmethod
    def available(work):
        probe = SmallDisk(work / "probe", 64)
        try:
            probe.mount()
        except (OSError, subprocess.CalledProcessError):
            return False
        probe.unmount()
        return True

    def mount(self):
        self.path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.kib}k", "tmpfs", str(self.path)],
                       check=True, capture_output=True)

    def grow(self, kib):
        subprocess.run(["mount", "-o", f"remount,size={kib}k", str(self.path)], check=True,
                       capture_output=True)

    def unmount(self):
        subprocess.run(["umount", str(self.path)], check=False, capture_output=True)


def partial_files_taken_as_complete(cache, reference):
    """Sample files present after a failed run that a rerun would keep although they differ from the
    reference."""

    fingerprint = json.loads((Path(reference) / "metadata.json").read_text())
    samples = Path(cache) / "samples"
    kept = [p for p in (samples.iterdir() if samples.is_dir() else [])
            if not p.name.endswith(atomic_files.TMP_SUFFIX)
            and cache_format.sample_file_problem(str(p), fingerprint, int(p.stem)) is None]
    return [str(p) for p in kept if not same_file(p, Path(reference) / "samples" / p.name)]


def rerun_damage(rerun, target, reference, generation):
    """What a completed rerun got wrong: cache files differing from the reference's, or differing log
    lines."""
    if rerun.returncode != 0:
        return [f"the rerun failed ({rerun.returncode})"]
    if generation:
        return cache_damage(target, reference)
    lines = log_damage(target, reference)
    return [f"{lines} log lines differ"] if lines else []


def disk_full(trials, rng, work, reference, train_reference, tmpfs):
    outcome = Outcome("4. disk full (tmpfs) / file-size limit (ulimit -f) mid-write" if tmpfs else
                      "4. file-size limit (ulimit -f) mid-write (no tmpfs: not root)")
    kinds = ["generation, tmpfs", "training, tmpfs"] if tmpfs else []
    kinds += ["generation, ulimit -f", "training, ulimit -f"]
    for trial in range(trials):
        kind = kinds[trial % len(kinds)]
        generation = kind.startswith("generation")
        folder = work / f"disk_{trial}"
        target = folder / ("cache" if generation else "run")
        script, args = ("generate_cache.py", [TINY, *overrides(target)]) if generation else \
            ("kd.py", [TINY, *train_overrides(reference, target)])
        if "tmpfs" in kind:  # room for a random number of files: the cache is 400 KiB, a checkpoint 830 KiB
            kib = rng.randint(8, 420) if generation else rng.randint(16, 2400)
            disk = SmallDisk(folder, kib)
            disk.mount()
        else:  # a limit below the largest file: a sample 64 KiB,
            # a checkpoint's model and optimizer shard 730 KiB
            kib = rng.randint(1, 63) if generation else rng.randint(1, 720)
            disk = None
        try:
            failed = run(command(script, args, file_limit_kib=None if disk else kib))
            clear = is_clear_error(failed, ["writing"])
            lost = partial_files_taken_as_complete(target, reference) if generation else []
            lost += [str(p) for p in stray_temporaries(folder)]
            if disk:
                disk.grow(8192)
            rerun = run(command(script, args))
            lost += rerun_damage(rerun, target, reference if generation else train_reference, generation)
        finally:
            if disk:
                disk.unmount()
        outcome.trials += 1
        outcome.bad_inputs += 1
        outcome.clear += clear
        outcome.survived += not lost
        outcome.lost += len(lost)
        last = (failed.stderr.strip().splitlines()[-1] if failed.stderr.strip()
                else f"exit {failed.returncode}")
        report(outcome, trial, f"{kind} {kib} KiB: {last}", lost + ([] if clear else ["no clear error"]))
        shutil.rmtree(folder, ignore_errors=True)
    return outcome


# ----------------------------------------------------------------------------------------------------------
# 5. Config fuzzing


def flat_fields(defaults, prefix=""):
    """{dotted field: default} of every leaf of config.DEFAULTS."""
    out = {}
    for key, value in defaults.items():
        path = f"{prefix}{key}"
        out.update(flat_fields(value, path + ".") if isinstance(value, dict) else {path: value})
    return out


def wrong_types(default):
    """Values of the wrong type for a field whose default is `default` (config.Opt for optional fields)."""

    kind = default.kind if isinstance(default, config.Opt) else type(default)
    values = {bool: ["yes please", 1, 0.5, [True], {"on": True}, None],
              int: [4.5, "ten", True, [1], {"n": 1}, None],
              float: ["high", True, [1.0], {"x": 1.0}, None, "1e-3e"],
              str: [3, 4.5, True, ["a"], {"a": "b"}, None],
              list: ["999, 0", 5, {"a": 1}, None, True]}[kind]
    # None is valid for optional ones
    return [v for v in values if v is not None or not isinstance(default, config.Opt)]


OUT_OF_RANGE = {
    "method.t_list": [[1001, 0], [999, 999, 0], [999, 500], [500, 999, 0], [999, float("nan"), 0],
                      [999, 940, 0], [999, -1], [999, float("inf"), 0], [], [999, "a", 0], [True, 0]],
    "method.student_sample_steps": [-1, 0, 99],
    "method.teacher_guidance_scale": [-1.0, float("nan"), float("inf")],
    "method.teacher_inference_steps": [0, -3, 10**6, 10**30],
    "method.num_frames_per_block": [0, -1],
    "method.t_list_tolerance": [-0.5, float("nan")],
    "pipeline.flow_shift": [0.0, -1.0, float("nan"), float("inf")],
    "pipeline.num_frames": [0, -16, 22],  # 22: not 4k+1, found when the teacher's VAE config is read
    "pipeline.height": [0, -64, 60],
    "pipeline.width": [0, -64, 70],
    "pipeline.max_sequence_length": [0, -1],
    "pipeline.fps": [0, -24],
    "method.teacher_solver": ["heun", "UniPC", ""],
    "method.context_cache": ["/nonexistent/cache"],
    "data.num_samples": [0, -1, 10**9],
    "data.seed": [-1, 2**64],
    "data.cache_dtype": ["int8", "bf16", ""],
    "models.student.attention": ["causal", ""],
    "training.max_steps": [0, -5], "training.batch_size": [0, -1], "training.grad_accum_steps": [0],
    "training.log_every": [0], "training.checkpoint_every": [0], "training.keep_checkpoints": [0],
    "training.eval_every": [0, -1], "training.prefetch_factor": [0], "training.num_workers": [-1],
    "training.eval_samples": [-1], "training.lr": [-1e-4, float("nan"), float("inf")],
    "training.weight_decay": [-0.1], "training.eps": [-1e-8, float("nan")], "training.warmup_steps": [-1],
    "training.max_grad_norm": [-1.0, float("inf")],
    "training.betas": [[1.0, 0.9], [0.9], [-0.1, 0.9], [0.9, 0.999, 0.5], [False, 0.99], ["a", 0.9]],
    "training.lr_schedule": ["linear", ""], "training.resume": ["sometimes", "/nonexistent/checkpoint-5"],
}
REQUIRED = ["models.student", "models.student.init_from", "models.teacher.init_from",
            "method.teacher_path_cache"]
NEEDS_LOCAL_TEACHER = {22, 60, 70}  # video sizes checked against the VAE's factors: not offline for a hub id
FILE_TEXTS = [b"[1, 2, 3]\n", b"models: {student: [\n", b"\xff\xfe garbage", b"- just\n- a list\n",
              b"method: !!python/object/apply:os.system [echo hi]\n",
              b"models:\n  student:\n\tinit_from: x\n"]


def set_field(raw, field, value, delete=False):
    *parents, leaf = field.split(".")
    node = raw
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    if delete:
        node.pop(leaf, None)
    else:
        node[leaf] = value


def misspelt(word, rng):
    i = rng.randrange(len(word))
    edits = [word[:i] + word[i + 1:], word[:i] + rng.choice("xqz_") + word[i:], word + "s", word.upper(),
             word[:i] + word[i:].replace("_", "-", 1)]
    return next((w for w in rng.sample(edits, len(edits)) if w and w != word), word + "_x")


def path_mutations(scratch):
    """(field, bad value) for paths: missing, of the wrong kind, or unreadable."""
    binary, empty, plain_file, not_a_model = (scratch / "binary.txt", scratch / "empty.txt", scratch / "file",
                                              scratch / "not_a_model")
    binary.write_bytes(b"\xff\xfe\x00bad prompts \x80\x81\n")
    empty.write_text("\n\n")
    plain_file.write_text("x")
    (not_a_model / "vae").mkdir(parents=True, exist_ok=True)
    return [("data.prompts", "/nonexistent/prompts.txt"), ("data.prompts", str(scratch)),
            ("data.prompts", str(binary)), ("data.prompts", str(empty)),
            ("models.student.init_from", "/nonexistent/student"),
            ("models.student.init_from", str(plain_file)), ("models.student.init_from", str(not_a_model)),
            ("models.teacher.init_from", "./missing/teacher/dir"),
            ("models.teacher.init_from", str(not_a_model)), ("models.teacher.init_from", str(plain_file)),
            ("method.teacher_path_cache", str(plain_file)), ("training.output_dir", str(plain_file)),
            ("training.resume", str(not_a_model))]


def mutation(raw, local_teacher, rng, paths):
    """(mutated raw config, or the bytes of a config file; the field the error must name; a description)."""

    fields = flat_fields(config.DEFAULTS)
    kind = rng.choice(["unknown key", "wrong type", "out of range", "missing", "wrong path", "structure"])
    raw = copy.deepcopy(raw)
    if kind == "unknown key":
        field = rng.choice(list(fields) + ["models", "method", "training"])
        *parents, leaf = field.split(".")
        bad = ".".join(parents + [misspelt(leaf, rng)])
        set_field(raw, bad, rng.choice([1, "x", [1], {"a": 1}]))
        return raw, bad, f"unknown key {bad}"
    if kind == "wrong type":
        field = rng.choice(list(fields))
        value = rng.choice(wrong_types(fields[field]))
        set_field(raw, field, value)
        return raw, field, f"{field} = {value!r}"
    if kind == "out of range":
        field = rng.choice(list(OUT_OF_RANGE))
        offline = [v for v in OUT_OF_RANGE[field] if not (isinstance(v, int) and v in NEEDS_LOCAL_TEACHER)]
        value = rng.choice(OUT_OF_RANGE[field] if local_teacher else offline)
        set_field(raw, field, value)
        return raw, field, f"{field} = {value!r}"
    if kind == "missing":
        field = rng.choice(REQUIRED)
        how = rng.choice(["delete", None, ""])
        if field == "models.student" and how == "":
            how = None
        set_field(raw, field, how, delete=how == "delete")
        return raw, field, f"{field} {'deleted' if how == 'delete' else f'= {how!r}'}"
    if kind == "wrong path":
        field, value = rng.choice(paths)
        set_field(raw, field, value)
        return raw, field, f"{field} = {value}"
    section = rng.choice(["models", "models.student", "method", "pipeline", "data", "training", "<file>"])
    if section == "<file>":
        text = rng.choice(FILE_TEXTS)
        return text, "config file", f"file text {text!r}"
    set_field(raw, section, rng.choice([3, "text", [1, 2], True]))
    return raw, section, f"section {section} replaced by a scalar or list"


def names_field(message, field):
    """Whether a one-line message names the dotted field (or its last part, as the seed's messages do)."""
    leaf = field.split(".")[-1]
    return "\n" not in message and (field in message
                                    or re.search(rf"(?<![\w-]){re.escape(leaf)}(?![\w-])", message)
                                    is not None)


def config_fuzz(trials, rng, work):
    import yaml

    outcome = Outcome("5. config fuzzing (4 shipped configs)")
    scratch = work / "fuzz"
    scratch.mkdir()
    paths = path_mutations(scratch)
    bases = {name: yaml.safe_load((REPO / "configs" / name).read_text()) for name in SHIPPED_CONFIGS}
    escapes, unclear = {}, []
    for trial in range(trials):
        name = rng.choice(SHIPPED_CONFIGS)
        mutated, field, what = mutation(bases[name], name.startswith("tiny"), rng, paths)
        path = scratch / f"{trial}.yaml"
        if isinstance(mutated, bytes):
            path.write_bytes(mutated)
            field = str(path)  # the error names the file
        else:
            path.write_text(yaml.safe_dump(mutated, allow_unicode=True))
        outcome.trials += 1
        outcome.bad_inputs += 1
        try:
            config.check_paths(config.load_config(path))
        except errors.ConfigError as e:
            if names_field(str(e), field):
                outcome.clear += 1
                outcome.survived += 1
            else:
                unclear.append(f"{name}: {what} -> {e}")
            continue
        except Exception as e:  # a traceback from inside a library: what this scenario drives to 0
            escapes.setdefault(f"{type(e).__name__}: {e}"[:160], []).append(f"{name}: {what}")
            continue
        unclear.append(f"{name}: {what} -> accepted")
    outcome.lost = 0
    for error, cases in escapes.items():
        print(f"  escape x{len(cases)}: {error}  (e.g. {cases[0]})")
    for line in unclear[:20]:
        print(f"  not a clear error: {line}")
    print(f"  {trials} mutations: {outcome.clear} clear errors, {sum(map(len, escapes.values()))} escapes, "
          f"{len(unclear)} unclear or accepted")
    return outcome


# ----------------------------------------------------------------------------------------------------------
# 6. Non-finite values


def train_poisoned(argv, step, where):
    """kd.main on `argv` with a trainer that puts a NaN into the batch (x0) or the weights at optimizer step
    `step`."""
    import torch

    class Poisoned(kd.KDTrainer):
        def train_step(self, batches):
            if where == "batch" and self.step + 1 == step:
                batches[0]["x0"].view(-1)[0] = float("nan")
            result = super().train_step(batches)
            if where == "weights" and self.step == step:
                with torch.no_grad():
                    next(self.model.parameters()).to_local().view(-1)[0] = float("nan")
            return result

    errors.run_cli(lambda args: kd.main(args, Poisoned), argv)


def non_finite(trials, rng, work, cache):
    outcome = Outcome("6. non-finite value injected at a random step")
    for trial in range(trials):
        where = ["batch", "weights"][trial % 2]
        step = rng.randint(2, TRAIN_STEPS)
        out = work / f"nan_{trial}"
        argv = [str(TINY), *train_overrides(cache, out)]
        code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import faults; " \
               f"faults.train_poisoned({argv!r}, {step}, {where!r})"
        proc = run([sys.executable, "-c", code])
        steps = complete_checkpoint_steps(out)
        # weights poisoned after step s are caught before checkpoint-s is written or by step s+1's loss
        stop = step if where == "batch" else step + 1
        bad = [s for s in steps if s >= step or not finite_checkpoint(out / f"checkpoint-{s}")]
        clear = is_clear_error(proc, ["non-finite"]) and (f"at step {stop};" in proc.stderr or
                                                          f"after step {step};" in proc.stderr)
        outcome.trials += 1
        outcome.bad_inputs += 1
        outcome.clear += clear
        outcome.survived += clear and not bad
        outcome.lost += len(bad)
        last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        report(outcome, trial, f"NaN in the {where} at step {step}: {last}; checkpoints kept {steps}",
               [f"checkpoint-{s} holds bad weights" for s in bad] + ([] if clear else ["no clear error"]))
        shutil.rmtree(out, ignore_errors=True)
    return outcome


# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# 7. Causal ODE: an AR teacher's generation and stage 1 killed, a context latent corrupted


def latents_byte_offset(path, state, frame):
    """File offset of element [state, 0, frame, 0, 0] of a sample file's bf16 latents (from its safetensors
    header)."""
    raw = Path(path).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    entry = json.loads(raw[8 : 8 + header_len])["latents"]
    _, channels, frames, height, width = entry["shape"]
    return 8 + header_len + entry["data_offsets"][0] + (state * channels * frames + frame) * height * width * 2


def flip_bit(path, offset, bit=0):
    data = bytearray(Path(path).read_bytes())
    data[offset] ^= 1 << bit
    Path(path).write_bytes(bytes(data))


def causal_ode_faults(trials, rng, work, reference, write_seconds):
    outcome = Outcome("7. causal ODE: generation / teacher forcing SIGKILLed, context latent corrupted")
    ar_dir = work / "ar_teacher"
    shutil.copytree(REPO / "tiny_models" / "wan-tiny-teacher", ar_dir)
    transformer = ar_dir / "transformer" / "config.json"
    transformer.write_text(json.dumps({**json.loads(transformer.read_text()),
                                       "block_causal_frames": AR_FRAMES_PER_BLOCK}))

    def generation(cache):  # the AR teacher's pairs, its context the reference cache's x0
        return overrides(cache, f"models.teacher.init_from={ar_dir}", f"method.context_cache={reference}",
                         f"method.num_frames_per_block={AR_FRAMES_PER_BLOCK}", f"data.num_samples={CAUSAL_SAMPLES}")

    def teacher_forcing(out):  # stage 1 of the random tiny student on the reference cache's x0, shorter
        return [TINY, *train_overrides(reference, out, "models.teacher=null", "models.student.attention=block_causal",
                                       f"method.num_frames_per_block={AR_FRAMES_PER_BLOCK}",
                                       f"training.max_steps={CAUSAL_STEPS}", f"training.eval_every={CAUSAL_STEPS}")]

    causal = work / "causal_reference"
    quietly(generate_cache.generate_cache, config.load_config(TINY, generation(causal)))
    stage1 = work / "ar_reference"
    stage1_seconds = timed_run(command("ar_diffusion.py", teacher_forcing(stage1)), stage1 / "metrics.jsonl")
    for trial in range(trials):
        cache = work / f"causal_kill_{trial}"
        cmd = command("generate_cache.py", [TINY, *generation(cache)])
        proc = start(cmd)
        wait_for(cache / "metadata.json", proc)
        time.sleep(rng.uniform(0, 0.5 * write_seconds))  # its 4 samples: about as long as the reference's 6
        kill(proc)
        written = count_samples(cache)
        rerun = run(cmd)
        damage = cache_damage(cache, causal) if rerun.returncode == 0 else ["generation rerun failed"]

        out = work / f"ar_kill_{trial}"
        cmd = command("ar_diffusion.py", teacher_forcing(out))
        proc = start(cmd)
        wait_for(out / "metrics.jsonl", proc)
        time.sleep(rng.uniform(0, 0.9 * stage1_seconds))
        kill(proc)
        newest = (complete_checkpoint_steps(out) or [None])[-1]
        resumed = run(cmd)
        lines = log_damage(out, stage1) if resumed.returncode == 0 else 1
        right_start = resumed_step(resumed.stdout + resumed.stderr) == newest

        index, frame = rng.randrange(CAUSAL_SAMPLES), rng.randrange(6)
        path = cache_format.sample_path(str(cache), index)
        context = len(json.loads((causal / "metadata.json").read_text())["timesteps"])  # the entry after x0
        flip_bit(path, latents_byte_offset(path, context, frame) + rng.randrange(2), rng.randrange(8))
        dataset = kd.TrajectoryDataset(str(cache), [0, 1, 2, 3, 4], 512, context=True)
        try:
            dataset[(index, (0,) * 6)]
            refused = False
        except errors.CacheError as e:
            refused = path in str(e) and f"latents[{context}, :, {frame}]" in str(e)
        quietly(generate_cache.generate_cache, config.load_config(TINY, generation(cache)))
        repaired = cache_damage(cache, causal)

        outcome.trials += 1
        outcome.bad_inputs += 1
        outcome.clear += refused
        outcome.survived += not damage and lines == 0 and right_start and refused and not repaired
        outcome.lost += len(damage) + lines + len(repaired)
        report(outcome, trial, f"generation killed with {written}/{CAUSAL_SAMPLES} samples written; teacher forcing "
               f"killed, resumed at {newest}; context latent of sample {index}, frame {frame} flipped: "
               f"{'refused' if refused else 'NOT refused'}",
               damage + repaired + ([] if lines == 0 and right_start else ["stage 1 resumed wrong"]))
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(out, ignore_errors=True)
    return outcome


# ----------------------------------------------------------------------------------------------------------
# 8. Image-to-video: generation killed, an image edited, a CLIP token corrupted


def tensor_byte_offset(path, name):
    """File offset of the first byte of tensor `name` in a safetensors file (from its header)."""
    raw = Path(path).read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    return 8 + header_len + json.loads(raw[8 : 8 + header_len])[name]["data_offsets"][0]


def i2v_faults(trials, rng, work, write_seconds):
    from PIL import Image

    outcome = Outcome("8. image-to-video: generation SIGKILLed, an image edited, a CLIP token corrupted")
    data = work / "i2v_data"
    data.mkdir()
    prompts = (REPO / "prompts" / "example.txt").read_text().splitlines()[:I2V_SAMPLES]
    for i in range(I2V_SAMPLES):
        Image.new("RGB", (80, 96), (40 * i, 200 - 30 * i, 90)).save(data / f"{i}.png")
    (data / "p.jsonl").write_text("".join(json.dumps({"prompt": p, "image": f"{i}.png"}) + "\n"
                                          for i, p in enumerate(prompts)))
    ti2v = work / "ti2v_teacher"  # the random tiny teacher marked expand_timesteps, as Wan2.2-TI2V-5B
    shutil.copytree(REPO / "tiny_models" / "wan-tiny-teacher", ti2v)
    index = ti2v / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "expand_timesteps": True}))
    teachers = [ti2v, Path(tiny_demo.ensure_model_dir(str(REPO / "tiny_models" / "wan-tiny-i2v-teacher")))]

    def generation(cache, teacher):
        return overrides(cache, f"models.teacher.init_from={teacher}", f"data.prompts={data / 'p.jsonl'}",
                         f"data.num_samples={I2V_SAMPLES}", "method.first_frame_given=true")

    references = [work / f"i2v_reference_{k}" for k in range(len(teachers))]
    for teacher, reference in zip(teachers, references):
        quietly(generate_cache.generate_cache, config.load_config(TINY, generation(reference, teacher)))
    for trial in range(trials):
        teacher, reference = teachers[trial % 2], references[trial % 2]
        cache = work / f"i2v_kill_{trial}"
        cmd = command("generate_cache.py", [TINY, *generation(cache, teacher)])
        proc = start(cmd)  # killed just after a random sample file appeared, while the next is computed
        wait_for(cache / "samples" / f"{rng.randrange(I2V_SAMPLES - 1):08d}.safetensors", proc)
        time.sleep(rng.uniform(0, 0.5 * write_seconds / NUM_SAMPLES))
        kill(proc)
        written = count_samples(cache)
        rerun = run(cmd)
        damage = cache_damage(cache, reference) if rerun.returncode == 0 else ["generation rerun failed"]

        edited = work / f"i2v_edited_{trial}"  # the same prompts file, one image repainted
        shutil.copytree(data, edited)
        Image.new("RGB", (80, 96), (255, 255, 255)).save(edited / f"{rng.randrange(I2V_SAMPLES)}.png")
        try:
            cache_format.open_cache(config.load_config(TINY, generation(cache, teacher) + [
                f"data.prompts={edited / 'p.jsonl'}"]))
            stale = False
        except errors.CacheError as e:
            stale = "conditioning: config" in str(e)

        flipped = True  # the channels teacher's samples hold CLIP tokens: flip one, find it, regenerate it
        if teacher == teachers[1]:
            path = cache_format.sample_path(str(cache), rng.randrange(I2V_SAMPLES))
            flip_bit(path, tensor_byte_offset(path, "image_embeds") + rng.randrange(16), rng.randrange(8))
            problem = cache_format.sample_file_problem(path, json.loads((cache / "metadata.json").read_text()),
                                                       int(Path(path).stem))
            flipped = problem == "image_embeds fail their CRC32 checksum"
            quietly(generate_cache.generate_cache, config.load_config(TINY, generation(cache, teacher)))
        repaired = cache_damage(cache, reference)

        outcome.trials += 1
        outcome.bad_inputs += 2
        outcome.clear += stale + flipped
        outcome.survived += not damage and stale and flipped and not repaired
        outcome.lost += len(damage) + len(repaired)
        report(outcome, trial, f"{teacher.name}: generation killed with {written}/{I2V_SAMPLES} samples written; "
               f"an edited image {'refused' if stale else 'NOT refused'}; a flipped CLIP token "
               f"{'found' if flipped else 'NOT found'}", damage + repaired)
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(edited, ignore_errors=True)
    return outcome


def report(outcome, trial, text, problems):
    status = "ok" if not problems else "FAILED: " + "; ".join(map(str, problems[:5]))
    print(f"  [{outcome.scenario[:2]} trial {trial + 1}] {text} -> {status}", flush=True)


def table(outcomes):
    header = ["scenario", "trials", "survived", "files lost/corrupt", "clear errors"]
    rows = [[o.scenario, str(o.trials), str(o.survived), str(o.lost),
             f"{o.clear}/{o.bad_inputs}" if o.bad_inputs else "n/a"] for o in outcomes]
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in [header] + rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one or two trials per scenario (CI)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random moments, files and mutations")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument("--jobs", type=int, default=2, help="scenarios run at a time (default 2: two cores)")
    args = parser.parse_args()
    trials = dict(gen=1, train=1, corrupt=1, disk=2, fuzz=300, nan=1, causal=1, i2v=2) if args.quick else \
        dict(gen=10, train=12, corrupt=12, disk=12, fuzz=1000, nan=10, causal=6, i2v=6)
    os.chdir(REPO)  # the shipped configs name their paths relative to the repository
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(1)  # in-process generation must compute the floats of the one-thread subprocesses
    work = Path(tempfile.mkdtemp(prefix="faults-"))
    began = time.time()
    try:
        outcomes = campaign(trials, args.seed, work, args.quick, args.jobs)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n{'quick' if args.quick else 'full'} mode, seed {args.seed}, {time.time() - began:.0f} s:\n")
    print(table(outcomes))
    return 0 if all(o.ok() for o in outcomes) else 1


def reference_cache(cache):
    """Generate the uninterrupted cache in this process; returns the seconds it took (about a run's writing
    phase)."""

    began = time.time()
    quietly(generate_cache.generate_cache, config.load_config(TINY, overrides(cache)))
    return time.time() - began


def quietly(function, *args):
    """function(*args) with its progress bars and messages (stderr) dropped."""
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        return function(*args)


def campaign(trials, seed, work, quick, jobs):
    print("uninterrupted references ...", flush=True)
    began = time.time()
    reference = work / "reference_cache"
    write_seconds = reference_cache(reference)
    references = {}
    for ranks in (1,) if quick else (1, 2):
        out = work / f"reference_run_{ranks}"
        seconds = timed_run(command("kd.py", [TINY, *train_overrides(reference, out)], ranks),
                            out / "metrics.jsonl")
        references[ranks] = (out, seconds)
    tmpfs = SmallDisk.available(work)
    print(f"  ({time.time() - began:.0f} s)", flush=True)
    scenarios = [lambda rng: config_fuzz(trials["fuzz"], rng, work),
                 lambda rng: generation_kills(trials["gen"], rng, work, reference, write_seconds),
                 lambda rng: training_kills(trials["train"], rng, work, reference, references),
                 lambda rng: cache_corruptions(trials["corrupt"], rng, work, reference),
                 lambda rng: disk_full(trials["disk"], rng, work, reference, references[1][0], tmpfs),
                 lambda rng: non_finite(trials["nan"], rng, work, reference),
                 lambda rng: causal_ode_faults(trials["causal"], rng, work, reference, write_seconds),
                 lambda rng: i2v_faults(trials["i2v"], rng, work, write_seconds)]

    def timed(index):
        began = time.time()
        # a generator per scenario: its draws do not depend on which scenarios run beside it
        outcome = scenarios[index](random.Random(seed * len(scenarios) + index))
        print(f"  ({outcome.scenario[:2]} took {time.time() - began:.0f} s)", flush=True)
        return outcome

    # most runs of a scenario are one process, so `jobs` scenarios at a time keep `jobs` cores busy
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        outcomes = list(pool.map(timed, range(len(scenarios))))
    return sorted(outcomes, key=lambda o: o.scenario)


if __name__ == "__main__":
    sys.exit(main())
