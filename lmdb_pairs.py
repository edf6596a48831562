"""ODE pairs in the field's LMDB layout (Self-Forcing, CausVid, Causal-Forcing) to our trajectory cache, and back.

    python lmdb_pairs.py import CONFIG.yaml PAIRS_LMDB --preset self_forcing [key.path=value ...]
    torchrun --nproc_per_node=8 lmdb_pairs.py import CONFIG.yaml PAIRS_LMDB --steps 48 --shift 8 \
        --indices 0,12,24,36,-1
    python lmdb_pairs.py export CONFIG.yaml OUT_LMDB [key.path=value ...]

The layout, as Self-Forcing's utils/lmdb.py and CausVid's causvid/ode_data/create_lmdb_iterative.py write and
read it: one LMDB environment (or a directory of shard environments, read in sorted name order as Self-Forcing's
ShardingLMDBDataset does); row i is `latents_{i}_data`, the raw fp16 bytes of [S, F, C, H, W] (frames before
channels), and `prompts_{i}_data`, its prompt in UTF-8; `latents_shape` is "N S F C H W" and `prompts_shape`
"N". The S entries are picked by fixed indices from the teacher's trajectory list [state before step 0, ...,
state before step N-1, x0] (see PRESETS).

import writes a complete cache of method.teacher_path_cache that kd.py and kd_causal.py train on with the same
config: latents [K+1, C, F, H, W] in data.cache_dtype, the grid's timesteps, prompts encoded by
models.student.init_from's UMT5 as generation encodes them, checksums, atomic files; resumable, each rank
taking its stride of the rows. The whole LMDB is checked before anything is written. export writes a complete
cache as one LMDB environment in that layout, under a temporary name renamed when complete, resumable.
"""

import argparse
import json
import math
import os
import shutil
import sys
import warnings
from dataclasses import dataclass

import lmdb
import torch
from safetensors import safe_open

from atomic_files import TMP_SUFFIX
from cache_format import (CACHE_FORMAT_VERSION, cache_fingerprint, open_cache, sample_file_problem, sample_path,
                          write_sample)
from config import CACHE_DTYPES, check_paths, latent_shape, load_config
from distributed import init_distributed, shutdown_distributed
from errors import CacheError, ConfigError, WriteError, one_line, run_cli
from generate_cache import mark_complete, missing_samples, open_for_writing
from models import load_text_encoder
from teacher import encode_prompt

ROW_DTYPE = torch.float16  # every builder in the field stores rows as fp16
IMPORTED_TEACHER = "unknown: imported from an LMDB of ODE pairs by lmdb_pairs.py"
PROVENANCE_KEY = b"kd_cache_metadata"  # our export's extra key: the exported cache's metadata.json
COMMIT_BYTES = 256 * 2**20  # export commits (one fsync) about this many bytes of rows at a time


@dataclass(frozen=True)
class PairGrid:
    """Where a row's S entries lie on the teacher's grid of `steps` Euler steps with flow shift `shift`.

    `indices` pick them, in order, from the trajectory list [state before step 0, ..., state before step
    steps-1, x0, *trailing] as the upstream script indexes it; `trailing` entries after x0 are dropped
    (Causal-Forcing appends the training video's clean latent, which conditions its teacher: 1).
    """

    steps: int
    shift: float
    indices: tuple
    trailing: int = 0

    def positions(self):
        """Each entry's place in the trajectory list: a grid step, `steps` for x0, more for a trailing one."""
        length = self.steps + 1 + self.trailing
        if self.steps < 1 or self.trailing < 0:
            raise ConfigError(f"--steps {self.steps} and --trailing {self.trailing}: expected >= 1 and >= 0")
        if not self.indices or not all(-length <= i < length for i in self.indices):
            raise ConfigError(f"--indices {list(self.indices)}: expected indices into the {length}-entry "
                              f"trajectory list ({self.steps} states, x0, {self.trailing} trailing)")
        places = [i % length for i in self.indices]
        if any(a >= b for a, b in zip(places, places[1:])) or self.steps not in places:
            raise ConfigError(f"--indices {list(self.indices)}: expected increasing positions that include "
                              f"x0 (index {self.steps} or {-1 - self.trailing})")
        return places

    def recorded_steps(self):
        """The grid steps of the entries before x0: method.recorded_steps."""
        return [p for p in self.positions() if p < self.steps]

    def kept(self):
        """Row entries our cache keeps, in order: the recorded states, then x0."""
        places = self.positions()
        return [j for j, p in enumerate(places) if p <= self.steps]

    def describe(self):
        """The grid as plain JSON values (the fingerprint's source)."""
        return {"steps": self.steps, "shift": self.shift, "indices": list(self.indices), "trailing": self.trailing}


PRESETS = {  # from each project's ODE-pair script
    "self_forcing": PairGrid(48, 8.0, (0, 12, 24, 36, -1)),  # scripts/generate_ode_pairs.py
    "causvid": PairGrid(50, 8.0, (0, 36, 44, -1)),  # causvid/models/wan/generate_ode_pairs.py
    # get_causal_ode_data_{framewise,chunkwise}.py: -2 is the ODE's x0 (the regression target), -1 the clean
    # latent of the training video that conditions its teacher
    "causal_forcing": PairGrid(48, 5.0, (0, 12, 24, 36, -2, -1), trailing=1),
}


# ----------------------------------------------------------------------------------------------------------
# The LMDB side


def row_key(name, row):
    """The key of row `row` of array `name` ('latents' or 'prompts')."""
    return f"{name}_{row}_data".encode()


def shape_key(name):
    return f"{name}_shape".encode()


def environment_paths(path):
    """The LMDB environments of `path`: itself, or every entry of a directory of shards in sorted name order."""
    if os.path.exists(os.path.join(path, "data.mdb")):
        return [path]
    if not os.path.isdir(path):
        raise ConfigError(f"{path}: no such LMDB environment or directory of shard environments")
    shards = [os.path.join(path, name) for name in sorted(os.listdir(path))]
    for shard in shards:
        if not os.path.exists(os.path.join(shard, "data.mdb")):
            raise ConfigError(f"{shard} is not an LMDB environment (no data.mdb); a directory of shards holds "
                              "only shard environments")
    if not shards:
        raise ConfigError(f"{path} is an empty directory, not an LMDB environment or a directory of shards")
    return shards


def read_shape(txn, name, path):
    """The integers of key `{name}_shape` (ConfigError naming the key and file if absent or garbled)."""
    value = txn.get(shape_key(name))
    example = "'N 5 21 16 60 104'" if name == "latents" else "'N'"
    if value is None:
        raise ConfigError(f"{path}: no key '{name}_shape' (expected the row count and the row shape as "
                          f"space-separated integers, e.g. {example})")
    try:
        return [int(x) for x in bytes(value).decode("ascii").split()]
    except (UnicodeDecodeError, ValueError):
        raise ConfigError(f"{path}: key '{name}_shape' holds {bytes(value)[:60]!r}, expected space-separated "
                          f"integers, e.g. {example}") from None


class PairSource:
    """The rows of a pair LMDB (single or sharded), numbered across shards as ShardingLMDBDataset numbers them.
    """

    def __init__(self, path, grid, latent_shape):
        """Opens every environment and checks its shape keys against `grid` and latent_shape [C, F, H, W]."""
        self.path = path
        self.envs, self.rows = [], []  # rows: (environment index, row within it) of each global row
        self.row_shape = None
        for env_path in environment_paths(path):
            env = lmdb.open(env_path, readonly=True, lock=False, readahead=False, meminit=False)
            with env.begin() as txn:
                shape = read_shape(txn, "latents", env_path)
                count = read_shape(txn, "prompts", env_path)
            self.check_shape(shape, count, grid, latent_shape, env_path)
            self.row_shape = shape[1:]
            self.rows += [(len(self.envs), r) for r in range(shape[0])]
            self.envs.append((env_path, env, shape[0]))
        self.row_bytes = math.prod(self.row_shape) * ROW_DTYPE.itemsize

    def check_shape(self, shape, count, grid, latent_shape, env_path):
        """ConfigError unless latents_shape is 'N S F C H W' for the grid and video size, prompts_shape 'N'."""
        s, (c, f, h, w) = len(grid.indices), latent_shape
        if len(shape) == 1:
            raise ConfigError(
                f"{env_path}: latents_shape is '{shape[0]}', the row count alone (the field's "
                "create_lmdb_iterative.py writes this when its last .pt file's prompt repeats an earlier one); "
                f"expected 'N S F C H W', here '{shape[0]} {s} {f} {c} {h} {w}'")
        if len(shape) != 6 or shape[1:] != [s, f, c, h, w]:
            raise ConfigError(
                f"{env_path}: latents_shape is '{' '.join(map(str, shape))}', expected 'N {s} {f} {c} {h} {w}': "
                f"{s} entries (the grid's indices) of {f} latent frames of {c} channels of {h}x{w}, from the "
                "configured video size (pipeline.num_frames/height/width) and the model's latent channels")
        if count != shape[:1]:
            raise ConfigError(f"{env_path}: prompts_shape is '{' '.join(map(str, count))}', expected "
                              f"'{shape[0]}' (latents_shape's row count)")
        if self.row_shape is not None and shape[1:] != self.row_shape:
            raise ConfigError(f"{env_path}: rows of shape {shape[1:]}, the other shards' are {self.row_shape}")

    def where(self, row):
        """(environment path, row within it) of global row `row`."""
        env_index, local = self.rows[row]
        return self.envs[env_index][0], local

    def prompts(self):
        """Every row's prompt, after checking every row (ConfigError naming the file, row and key of the first
        whose latents are absent, empty or of the wrong length, or whose prompt is absent or not UTF-8)."""
        prompts = []
        for env_path, env, count in self.envs:
            with env.begin(buffers=True) as txn:  # lengths without reading the rows
                for row in range(count):
                    prompts.append(self.checked_prompt(txn, env_path, row, count))
        return prompts

    def checked_prompt(self, txn, env_path, row, count):
        latents, prompt = txn.get(row_key("latents", row)), txn.get(row_key("prompts", row))
        where = f"{env_path}: row {row}"
        for name, value in (("latents", latents), ("prompts", prompt)):
            if value is None:
                raise ConfigError(f"{where}: key {name}_{row}_data is missing (latents_shape counts {count} "
                                  "rows)")
        if len(latents) == 0:
            raise ConfigError(f"{where}: key latents_{row}_data is empty, expected {self.row_bytes} bytes "
                              f"(fp16 {self.row_shape})")
        if len(latents) != self.row_bytes:
            raise ConfigError(f"{where}: key latents_{row}_data holds {len(latents)} bytes, expected "
                              f"{self.row_bytes} (fp16 {self.row_shape} from latents_shape)")
        try:
            return bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"{where}: key prompts_{row}_data is not UTF-8 text ({e})") from None

    def states(self, row, kept, dtype):
        """Entries `kept` of global row `row` as our latents [K+1, C, F, H, W] in `dtype`, in one copy."""
        env_index, local = self.rows[row]
        s, f, c, h, w = self.row_shape
        out = torch.empty(len(kept), c, f, h, w, dtype=dtype)
        with self.envs[env_index][1].begin(buffers=True) as txn:
            with warnings.catch_warnings():  # a read-only view of the memory map, only read from
                warnings.simplefilter("ignore", UserWarning)
                flat = torch.frombuffer(txn.get(row_key("latents", local)), dtype=ROW_DTYPE)
            for k, entry in enumerate(kept):
                out[k].copy_(flat.view(self.row_shape)[entry].transpose(0, 1))  # [F, C, H, W] -> [C, F, H, W]
        return out


# ----------------------------------------------------------------------------------------------------------
# LMDB -> our cache


def import_config_problems(cfg, grid):
    """The overrides cfg needs so that kd.py trains on the imported cache with it ([] if none)."""
    m = cfg.method
    needs = {"method.teacher_inference_steps": (m.teacher_inference_steps, grid.steps),
             "pipeline.flow_shift": (cfg.pipeline.flow_shift, grid.shift),
             "method.recorded_steps": (m.recorded_steps, grid.recorded_steps()),
             "models.teacher": (cfg.models.teacher, None),
             "data.prompts": (cfg.data.prompts, None)}
    return [f"{key}={json.dumps(want) if want is not None else 'null'}"
            for key, (have, want) in needs.items() if have != want]


def check_encoder_dir(model_dir):
    """ConfigError unless a local model directory has the UMT5, tokenizer and VAE config that import reads."""
    if not os.path.isdir(model_dir):
        return  # a hub id
    absent = [part for part in ("text_encoder/config.json", "tokenizer", "vae/config.json")
              if not os.path.exists(os.path.join(model_dir, part))]
    if absent:
        raise ConfigError(f"models.student.init_from: {model_dir} has no {', '.join(absent)} (import encodes "
                          "the prompts with its UMT5 and reads the latent size from its VAE)")


def import_fingerprint(cfg, source, grid, preset, prompts, shape, unique_prompts):
    """Our fingerprint for the imported rows: what the LMDB cannot tell (guidance, negative prompt, seed, solver) is
    None and never compared; the source is recorded so that a rerun from another LMDB or grid is refused."""
    fingerprint = cache_fingerprint(cfg, prompts, shape)
    fingerprint.update(teacher=IMPORTED_TEACHER, teacher_guidance_scale=None, teacher_negative_prompt=None,
                       seed=None, teacher_solver=None, teacher_solver_settings=None)
    fingerprint["source"] = {"lmdb": os.path.abspath(source.path), "rows": len(source.rows), "preset": preset,
                             "grid": grid.describe(), "unique_prompts": unique_prompts}
    return fingerprint


def chosen_rows(prompts, unique_prompts, limit):
    """The LMDB rows that become cache samples 0, 1, ...: all, or the first of each prompt; the first `limit`."""
    rows = range(len(prompts))
    if unique_prompts:
        first = {}
        for row, prompt in enumerate(prompts):
            first.setdefault(prompt, row)
        rows = sorted(first.values())
    return list(rows)[:limit]


def import_pairs(cfg, lmdb_path, grid, preset=None, unique_prompts=False, rank=0, world_size=1,
                 device=torch.device("cpu")):
    """Complete cfg's cache from a pair LMDB, all ranks together (call on every rank); the number written."""
    problems = import_config_problems(cfg, grid)
    if problems:
        raise ConfigError(f"the pairs' grid ({grid.steps} steps, flow shift {grid.shift}, states at steps "
                          f"{grid.recorded_steps()}) and an import without teacher or prompts file need, in the "
                          f"config that kd.py then trains with: {' '.join(problems)}")
    model_dir = cfg.models.student.init_from
    check_encoder_dir(model_dir)
    shape = latent_shape(model_dir, cfg)  # [C, F, H, W]
    source = PairSource(lmdb_path, grid, shape)
    all_prompts = source.prompts()  # every row checked before anything is written
    rows = chosen_rows(all_prompts, unique_prompts, cfg.data.num_samples)
    if cfg.data.num_samples is not None and len(rows) < cfg.data.num_samples:
        raise ConfigError(f"data.num_samples={cfg.data.num_samples} but {lmdb_path} holds {len(rows)} "
                          f"{'distinct prompts' if unique_prompts else 'rows'}")
    prompts = [all_prompts[r] for r in rows]
    fingerprint = import_fingerprint(cfg, source, grid, preset, prompts, shape, unique_prompts)
    cache_dir = cfg.method.teacher_path_cache
    open_for_writing(cache_dir, fingerprint, rank)
    missing = missing_samples(cache_dir, fingerprint, rank, world_size)
    mine = missing[rank::world_size]
    if mine:
        encoder, tokenizer = load_text_encoder(model_dir, device)
        dtype, max_len = CACHE_DTYPES[cfg.data.cache_dtype], cfg.pipeline.max_sequence_length
        timesteps = torch.tensor(fingerprint["timesteps"], dtype=torch.float32)
        kept = grid.kept()
        for i in mine:
            latents = source.states(rows[i], kept, dtype)  # [K+1, C, F, H, W]
            if not torch.isfinite(latents).all():
                env_path, local = source.where(rows[i])
                raise CacheError(f"{env_path}: row {local} (key latents_{local}_data) is not finite in "
                                 f"{cfg.data.cache_dtype}; nothing was written for it")
            embeds = encode_prompt(encoder, tokenizer, prompts[i], max_len, device).to(dtype)
            write_sample(sample_path(cache_dir, i), latents, timesteps, embeds,
                         {"prompt": prompts[i], "index": i, "format_version": CACHE_FORMAT_VERSION,
                          "lmdb_row": rows[i]})
    mark_complete(cache_dir, [sample_path(cache_dir, i) for i in range(len(rows))], len(rows), rank)
    return len(missing)


# ----------------------------------------------------------------------------------------------------------
# Our cache -> LMDB


def cache_row(cache_dir, meta, index):
    """Sample `index` as the field's row: fp16 [S, F, C, H, W] bytes (S: the K+1 entries, and a causal ODE cache's
    context) and its prompt (CacheError if unusable)."""
    path = sample_path(cache_dir, index)
    problem = sample_file_problem(path, meta, index)
    if problem is not None:
        raise CacheError(f"cached sample {path} is unusable ({problem}); rerun generate_cache.py with the "
                         "same config to regenerate it")
    with safe_open(path, framework="pt") as f:
        latents, prompt = f.get_tensor("latents"), f.metadata()["prompt"]  # [K+1, C, F, H, W]
    row = latents.to(ROW_DTYPE).transpose(1, 2).contiguous()  # [K+1, F, C, H, W]
    if not torch.isfinite(row).all():
        raise CacheError(f"cached sample {path} overflows fp16, the LMDB layout's dtype")
    return memoryview(row.view(torch.uint8).numpy()), prompt


def export_pairs(cfg, out_path):
    """Write cfg's complete cache to `out_path` as one LMDB environment in the field's layout; rows exported."""
    meta = open_cache(cfg)
    cache_dir, n = cfg.method.teacher_path_cache, meta["num_samples"]
    if os.path.exists(out_path):
        raise ConfigError(f"{out_path} exists; export writes a new LMDB environment (delete it or choose "
                          "another path)")
    c, f, h, w = meta["latent_shape"]
    # a causal ODE cache's rows end with the clean context latent, after x0 (Causal Forcing's layout)
    row_shape = [len(meta["timesteps"]) + bool(meta.get("causal_ode")), f, c, h, w]
    row_bytes = math.prod(row_shape) * ROW_DTYPE.itemsize
    stamp = json.dumps(meta, sort_keys=True).encode()
    tmp = out_path + TMP_SUFFIX
    env = open_export_env(tmp, stamp, n * (row_bytes + 2**16) * 5 // 4 + 2**28)
    try:
        with env.begin() as txn:
            todo = [i for i in range(n) if txn.get(row_key("latents", i)) is None]
        for start in range(0, len(todo), max(1, COMMIT_BYTES // row_bytes)):
            with env.begin(write=True) as txn:  # a batch is committed whole or not at all
                for i in todo[start : start + max(1, COMMIT_BYTES // row_bytes)]:
                    row, prompt = cache_row(cache_dir, meta, i)
                    txn.put(row_key("latents", i), row)
                    txn.put(row_key("prompts", i), prompt.encode("utf-8"))
        with env.begin(write=True) as txn:
            txn.put(shape_key("latents"), " ".join(map(str, [n, *row_shape])).encode())
            txn.put(shape_key("prompts"), str(n).encode())
        env.sync(True)
    except lmdb.Error as e:
        raise WriteError(f"writing {tmp}: {one_line(e)}") from None
    finally:
        env.close()
    os.replace(tmp, out_path)
    return len(todo)


def open_export_env(tmp, stamp, map_size):
    """The export's LMDB under its temporary name: resumed if it holds rows of this same cache, else new."""
    if os.path.exists(tmp):
        env = lmdb.open(tmp, map_size=map_size)
        with env.begin() as txn:
            same = txn.get(PROVENANCE_KEY) == stamp
        if same:
            return env
        env.close()
        shutil.rmtree(tmp)
    try:
        env = lmdb.open(tmp, map_size=map_size)
        with env.begin(write=True) as txn:
            txn.put(PROVENANCE_KEY, stamp)
    except lmdb.Error as e:
        raise WriteError(f"writing {tmp}: {one_line(e)}") from None
    return env


# ----------------------------------------------------------------------------------------------------------
# The command line


def grid_from_args(args):
    """The PairGrid of --preset, or of --steps/--shift/--indices/--trailing."""
    explicit = [args.steps, args.shift, args.indices]
    if args.preset is not None:
        if any(v is not None for v in explicit):
            raise ConfigError("--preset names the whole grid; give it or --steps/--shift/--indices, not both")
        return PRESETS[args.preset]
    if any(v is None for v in explicit):
        raise ConfigError(f"give --preset ({' | '.join(PRESETS)}) or all of --steps, --shift and --indices")
    try:
        indices = tuple(int(i) for i in args.indices.split(","))
    except ValueError:
        raise ConfigError(f"--indices {args.indices!r}: expected comma-separated integers, e.g. 0,12,24,36,-1"
                          ) from None
    return PairGrid(args.steps, args.shift, indices, args.trailing)


def parse_args(argv):
    parser = argparse.ArgumentParser(prog="lmdb_pairs.py", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    imp = commands.add_parser("import", help="a pair LMDB -> the config's trajectory cache")
    imp.add_argument("config")
    imp.add_argument("lmdb", help="an LMDB environment or a directory of shard environments")
    imp.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    imp.add_argument("--preset", choices=sorted(PRESETS), help="the grid of that project's ODE-pair script")
    imp.add_argument("--steps", type=int, help="the teacher's Euler steps")
    imp.add_argument("--shift", type=float, help="the teacher's flow shift")
    imp.add_argument("--indices", help="the row's entries in the trajectory list, e.g. 0,12,24,36,-1")
    imp.add_argument("--trailing", type=int, default=0, help="entries after x0 in the trajectory list")
    imp.add_argument("--unique-prompts", action="store_true",
                     help="keep only the first row of each prompt (default: every row is a sample)")
    exp = commands.add_parser("export", help="the config's complete cache -> a pair LMDB")
    exp.add_argument("config")
    exp.add_argument("out", help="the LMDB environment to create")
    exp.add_argument("overrides", nargs="*", help="key.path=value config overrides")
    args, rest = parser.parse_known_args(argv)  # overrides may follow the options too
    unknown = [arg for arg in rest if arg.startswith("-") or "=" not in arg]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides += rest
    return args


def main(argv):
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    check_paths(cfg)
    if args.command == "export":
        torch.set_num_threads(1)  # copies of small slices: a thread pool only adds wake-ups (10x on a busy CPU)
        written = export_pairs(cfg, args.out)
        print(f"{args.out}: {written} rows exported from {cfg.method.teacher_path_cache}")
        return
    grid = grid_from_args(args)
    rank, world_size, device = init_distributed()
    written = import_pairs(cfg, args.lmdb, grid, args.preset, args.unique_prompts, rank, world_size, device)
    if rank == 0:
        print(f"cache {cfg.method.teacher_path_cache} complete: {written} rows imported from {args.lmdb} on "
              f"{world_size} rank(s)")
    shutdown_distributed()


if __name__ == "__main__":
    run_cli(main, sys.argv[1:])
