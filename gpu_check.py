"""The GPU check: what a lent GPU can answer that this project's CPUs cannot, in one command and one table.

    python gpu_check.py                           # one CUDA device, about 8 minutes; writes gpu_check.json
    python gpu_check.py --smoke --out check.json  # the same stages at smoke size on any machine (the tests)

Every stage runs even when an earlier one failed; its row then says why, and the exit status is 1.
  1. The tiny pipeline end to end through the real scripts on the device: generate_cache.py (the random tiny
     teacher, CFG), kd.py and kd_causal.py for a few dozen steps, each under `torchrun --nproc_per_node=1`,
     then export.py --verify (one CPU process). The device's cache must equal a CPU cache of the same config
     (written with CUDA hidden) within bf16 (CACHE_TOLERANCE), and the losses must fall. Without CUDA the
     device's cache is the CPU cache, compared with itself.
  2. KD training steps read nothing back to the host but each micro-batch's uniform flag and count of noisy
     frames (both computed on its CPU step indices); on CUDA the steps also run under
     torch.cuda.set_sync_debug_mode("error").
  3. bench_gpu.py at real size (--smoke: its smoke size): the 14B teacher step with CFG batched and as two
     forwards, the 1.3B student KD steps; seconds, TFLOP/s, MFU and peak memory per row; the faster CFG way.

The table's rows: stage, status (pass | FAIL | oom), seconds, TFLOP/s, MFU, peak GiB, detail. The JSON file
holds {"check": "gpu" | "smoke", "device", "torch", "passed", "rows": [...], "bench": bench_gpu.py's JSON or
null, "cfg_forward": {"batched_over_separate", "faster"} or null}; docs/performance.md describes each field.
"""

import argparse
import collections
import json
import math
import os
import sys
import tempfile
import time

import torch
from safetensors import safe_open
from torch.utils._python_dispatch import TorchDispatchMode

import kd
import processes
from config import load_config
from distributed import init_distributed, shutdown_distributed
from errors import one_line
from tiny_demo import random_tiny_overrides

REPO = os.path.dirname(os.path.abspath(__file__))
TINY = os.path.join(REPO, "configs", "tiny.yaml")
# check: (cache samples, training steps per script, bench_gpu.py arguments, seconds allowed per pipeline
# script, seconds allowed to the benchmark)
SIZES = {"gpu": (8, 40, [], 150, 420), "smoke": (6, 30, ["--smoke"], 300, 300)}
CACHE_TOLERANCE = 0.05  # max relative RMS distance of a device cache tensor from the CPU cache's (bf16)
LOSS_FALL = 0.8  # the last third of the logged losses must average below this fraction of the first third
SYNC_STEPS = 3  # training steps watched for host reads
CPU_READS_PER_STEP = 2  # a one-micro-batch step's uniform flag and noisy-frame count, of its CPU step indices


class StageFailed(Exception):
    """A stage's check did not hold; the message is its table detail."""


# ----------------------------------------------------------------------------------------------------------
# Stage 1: the tiny pipeline on the device


def pipeline_overrides(cache_dir, samples, *extra):
    """configs/tiny.yaml overrides: the random tiny models of the tests, `samples` prompts, CFG on."""
    return [*random_tiny_overrides(cache_dir), f"data.num_samples={samples}", *extra]


def run_script(script, args, timeout, cuda=True, torchrun=True):
    """stdout of `script`, under torchrun --nproc_per_node=1 unless torchrun=False (StageFailed naming its
    first error line); cuda=False hides every CUDA device from it."""
    env = processes.environment() if cuda else processes.environment(CUDA_VISIBLE_DEVICES="")
    try:
        [proc] = processes.run_together([processes.command(script, args, torchrun=torchrun)], timeout, env)
    except TimeoutError:
        raise StageFailed(f"{script} ran past {timeout} s") from None
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.splitlines() if "rror" in line] or proc.stderr.splitlines()
        raise StageFailed(f"{script} exited {proc.returncode}: {lines[0] if lines else 'no output'}"[:300])
    return proc.stdout


def cache_difference(cache, reference):
    """Max over the sample files and their tensors of ||a - b|| / ||b|| (relative RMS distance), float64.

    The two caches must hold the same files, metadata and tensor shapes (ValueError otherwise)."""
    names = sorted(os.listdir(os.path.join(reference, "samples")))
    if sorted(os.listdir(os.path.join(cache, "samples"))) != names:
        raise ValueError(f"{cache} and {reference} hold different sample files")
    with open(os.path.join(cache, "metadata.json")) as a, open(os.path.join(reference, "metadata.json")) as b:
        if json.load(a) != json.load(b):
            raise ValueError(f"{cache} and {reference} have different metadata.json")
    worst = 0.0
    for name in names:
        with (safe_open(os.path.join(cache, "samples", name), framework="pt") as a,
              safe_open(os.path.join(reference, "samples", name), framework="pt") as b):
            for key in b.keys():
                x, y = a.get_tensor(key).double(), b.get_tensor(key).double()
                if x.shape != y.shape:
                    raise ValueError(f"{name}:{key} has shape {list(x.shape)}, the reference {list(y.shape)}")
                worst = max(worst, ((x - y).norm() / y.norm().clamp_min(1e-30)).item())
    return worst


def losses_fall(run_dir):
    """The detail line of a run whose losses fell (StageFailed otherwise): first and last third of
    metrics.jsonl, and the final rollout error against the untrained student's."""
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        losses = [json.loads(line)["loss"] for line in f]
    with open(os.path.join(run_dir, "eval.jsonl")) as f:
        final = [json.loads(line) for line in f][-1]
    third = max(1, len(losses) // 3)
    first, last = sum(losses[:third]) / third, sum(losses[-third:]) / third
    detail = (f"loss {first:.4f} -> {last:.4f} (first / last third of {len(losses)} steps); rollout error "
              f"{final['rollout_error']:.4f}, untrained {final['rollout_error_untrained']:.4f}")
    if not (last < LOSS_FALL * first and final["rollout_error"] < final["rollout_error_untrained"]):
        raise StageFailed(f"the losses did not fall: {detail}")
    return detail


def training_args(cache_dir, samples, steps, out_dir, *extra):
    """kd.py's arguments: `steps` steps on the first samples, a loss line per step, one eval at the end."""
    return [TINY, *pipeline_overrides(cache_dir, samples, f"training.output_dir={out_dir}",
                                      f"training.max_steps={steps}", "training.log_every=1",
                                      f"training.eval_every={steps}", f"training.checkpoint_every={steps}",
                                      "training.eval_samples=2", "training.num_workers=1", *extra)]


# ----------------------------------------------------------------------------------------------------------
# Stage 2: host reads in the training step


class ScalarReads(TorchDispatchMode):
    """Counts the ops that read a tensor's value back to the host (.item(), bool(), float() of a tensor)."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.counts[str(args[0].device)] += 1
        return func(*args, **(kwargs or {}))


def host_reads_per_step(cache_dir, samples, out_dir):
    """{device: values read back} over SYNC_STEPS KD training steps on this process's device (after a warm-up
    step), under CUDA's sync debug mode "error" on a GPU (a synchronising op raises)."""
    cfg = load_config(TINY, pipeline_overrides(cache_dir, samples, f"training.output_dir={out_dir}",
                                               "models.teacher=null", "training.eval_samples=0",
                                               "training.num_workers=0"))
    rank, world_size, device = init_distributed()
    try:
        trainer = kd.KDTrainer(cfg, rank, world_size, device)
        trainer.prepare()
        batches = iter(trainer.data_loader(start=0))
        trainer.train_step([kd.next_batch(batches)])  # warm-up: lazy initialisation may read values once
        chosen = [kd.next_batch(batches) for _ in range(SYNC_STEPS)]
        reads = ScalarReads()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
        try:
            with reads:
                for batch in chosen:
                    trainer.train_step([batch])
        finally:
            if device.type == "cuda":
                torch.cuda.set_sync_debug_mode("default")
                torch.cuda.synchronize(device)
    finally:
        shutdown_distributed()
    return dict(reads.counts)


def host_reads_check(cache_dir, samples, out_dir):
    """The detail line when the training steps read back only the values of their CPU step indices (StageFailed
    otherwise)."""
    reads = host_reads_per_step(cache_dir, samples, out_dir)
    on_cpu, elsewhere = reads.get("cpu", 0), {k: v for k, v in reads.items() if k != "cpu"}
    sync_mode = "; no synchronising op under CUDA's sync debug mode" if torch.cuda.is_available() else ""
    detail = f"{on_cpu} value reads in {SYNC_STEPS} steps, all of CPU tensors{sync_mode}"
    if elsewhere or on_cpu != SYNC_STEPS * CPU_READS_PER_STEP:
        raise StageFailed(f"host reads in {SYNC_STEPS} training steps: {reads} (expected "
                          f"{SYNC_STEPS * CPU_READS_PER_STEP} on cpu: each step's uniform flag and noisy-frame "
                          "count)")
    return detail


# ----------------------------------------------------------------------------------------------------------
# The stages, the table, the JSON


class Report:
    """The rows of the table, filled stage by stage; a stage that raises is a FAIL row with its reason."""

    def __init__(self):
        self.rows = []

    def stage(self, name, check):
        """Run check() -> detail; one row with its status and seconds. Returns whether it passed."""
        start = time.perf_counter()
        try:
            detail, status = check(), "pass"
        except StageFailed as e:
            detail, status = str(e), "FAIL"
        except Exception as e:  # any failure is a row: the next stage still runs
            detail, status = f"{type(e).__name__}: {one_line(e)}"[:300], "FAIL"
        self.rows.append({"stage": name, "status": status, "seconds": time.perf_counter() - start,
                          "tflops_per_s": None, "mfu": None, "peak_memory_gib": None, "detail": detail})
        return status == "pass"

    def bench_rows(self, bench):
        """One row per bench_gpu.py result: pass, oom (the benchmark's own fallback) or FAIL."""
        for row in bench["results"]:
            status = {"ok": "pass", "out of memory": "oom"}.get(row["status"], "FAIL")
            self.rows.append({"stage": f"bench: {row['name']}", "status": status, "seconds": row["seconds"],
                              "tflops_per_s": row["tflops_per_s"], "mfu": row["mfu"],
                              "peak_memory_gib": row["peak_memory_gib"],
                              "detail": f"latents {row['latents']}" + ("" if status == "pass"
                                                                        else f": {row['status']}")})


def run_pipeline(report, work, device_name, samples, steps, timeout):
    """Stage 1 and 2: the tiny pipeline through the real scripts on the device, then the host-read check."""
    cache = os.path.join(work, "cache")
    cpu_cache = os.path.join(work, "cache-cpu") if device_name != "cpu" else cache
    kd_run, causal_run = os.path.join(work, "kd"), os.path.join(work, "kd_causal")

    def generate(cache_dir, cuda):
        out = run_script("generate_cache.py", [TINY, *pipeline_overrides(cache_dir, samples)], timeout, cuda)
        return out.strip().splitlines()[-1]

    def compare():
        difference = cache_difference(cache, cpu_cache)
        detail = f"max relative RMS distance {difference:.2e} (tolerance {CACHE_TOLERANCE:g})"
        if not difference <= CACHE_TOLERANCE:
            raise StageFailed(detail)
        return detail

    def train(script, out_dir, *extra):
        run_script(script, training_args(cache, samples, steps, out_dir, *extra), timeout)
        return losses_fall(out_dir)

    def export():
        out = run_script("export.py", ["--checkpoint", kd_run, "--output-dir", os.path.join(work, "export"),
                                       "--verify"], timeout, torchrun=False)  # one CPU process, as documented
        verified = [line for line in out.splitlines() if line.startswith("verified:")]
        if not verified:
            raise StageFailed(f"export.py printed no verification: {out.strip()[-200:]}")
        return verified[0]

    if cpu_cache != cache:
        report.stage("generate_cache.py on CPU (CUDA hidden): the reference",
                     lambda: generate(cpu_cache, False))
    report.stage(f"generate_cache.py on {device_name}", lambda: generate(cache, True))
    report.stage(f"{device_name} cache = CPU cache within bf16", compare)
    report.stage(f"kd.py, {steps} steps: losses fall", lambda: train("kd.py", kd_run))
    report.stage(f"kd_causal.py, {steps} steps: losses fall",
                 lambda: train("kd_causal.py", causal_run, "models.student.attention=block_causal",
                               "method.num_frames_per_block=4"))
    report.stage("export.py --verify", export)
    report.stage("KD step: no host sync",
                 lambda: host_reads_check(cache, samples, os.path.join(work, "sync")))


def run_bench(report, work, bench_args, timeout):
    """Stage 3: bench_gpu.py in its own process; its JSON, or None when it failed."""
    path = os.path.join(work, "bench_gpu.json")
    report.stage("bench_gpu.py " + " ".join(bench_args), lambda: run_script(
        "bench_gpu.py", [*bench_args, "--out", path], timeout) and f"results in {path}")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        bench = json.load(f)
    report.bench_rows(bench)
    return bench


def cfg_choice(bench):
    """{"batched_over_separate", "faster"} from the benchmark's teacher rows, or None."""
    ratio = bench and bench.get("cfg_batched_over_separate")
    if ratio is None:
        return None
    return {"batched_over_separate": ratio, "faster": "batched" if ratio <= 1 else "separate"}


def run(check, out_path):
    samples, steps, bench_args, script_timeout, bench_timeout = SIZES[check]
    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name(0) if cuda else "CPU"
    report = Report()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        run_pipeline(report, work, "cuda:0" if cuda else "cpu", samples, steps, script_timeout)
        bench = run_bench(report, work, bench_args, bench_timeout)
    choice = cfg_choice(bench)
    passed = all(row["status"] != "FAIL" for row in report.rows)
    result = {"check": check, "device": device_name, "torch": torch.__version__, "passed": passed,
              "rows": report.rows, "bench": bench, "cfg_forward": choice}
    with open(out_path, "w") as f:
        json.dump(result, f, indent=2)
    print_table(result)
    return result


def cell(value, fmt):
    return format(value, fmt) if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def print_table(result):
    print(f"gpu_check ({result['check']}) on {result['device']}, torch {result['torch']}: "
          f"{'PASSED' if result['passed'] else 'FAILED'}")
    print(f"| {'stage':<62} | status | {'seconds':>8} | {'TFLOP/s':>8} | {'MFU':>6} | {'peak GiB':>8} "
          "| detail")
    print(f"|{'-' * 64}|--------|{'-' * 10}|{'-' * 10}|{'-' * 8}|{'-' * 10}|-------")
    for row in result["rows"]:
        print(f"| {row['stage']:<62} | {row['status']:<6} | {cell(row['seconds'], '8.2f'):>8} | "
              f"{cell(row['tflops_per_s'], '8.3g'):>8} | {cell(row['mfu'], '6.1%'):>6} | "
              f"{cell(row['peak_memory_gib'], '8.1f'):>8} | {row['detail']}")
    choice = result["cfg_forward"]
    if choice:
        print(f"CFG teacher step: batched / separate = {choice['batched_over_separate']:.3f}: "
              f"method.teacher_cfg_forward={choice['faster']} is faster on {result['device']}")


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="the same stages at smoke size, on any machine")
    parser.add_argument("--out", default="gpu_check.json", help="JSON results file")
    args = parser.parse_args(argv)
    if not args.smoke and not torch.cuda.is_available():
        raise SystemExit("gpu_check.py: no CUDA device is visible; run it on a GPU, or with --smoke")
    result = run("smoke" if args.smoke else "gpu", args.out)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
