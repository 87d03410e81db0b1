"""Fuzz the entry points for N seconds: `python scripts/fuzz_cli.py --seconds 600 [--seed 0]`.

Each case starts from a fresh copy of a few tiny runs (`make_assets`: a corpus, a finished base, a
second base, a run stopped half-way, a LoRA adapter run, an evolve run) and either gives an entry
point (train.py, evolve.py, scripts/quantize.py, scripts/report.py, scripts/prepare_data.py) one or
two flags with random values, or damages one file that the entry point reads (truncation, flipped
bytes, an edited safetensors header, another file of the set in its place, other JSON) and runs it.
A case runs in a forked child (torch is imported once) with a memory limit and a time limit, and is
judged against what the value or the damage is:

* clean error: exit code 2, one to three lines on stderr, no traceback;
* accepted: exit code 0 for a valid value, or for a damage that changes nothing the reader sees
  (a tab for a space in a header) or that a log is built to tolerate (a torn last line);
* traceback: an exception other than the library's own errors;
* silent acceptance: exit code 0 for a value out of its range or a damage the reader should see;
* damaged files: a file that was there before changed, other than the run's own output of an
  accepted run;
* left behind: a lock or temporary file, or a new empty folder;
* timeout: the case ran past its time limit.

tests/test_reliability.py makes its runs with `make_assets` too.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import pickle
import random
import resource
import shutil
import signal
import struct
import sys
import tempfile
import time
import typing
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from h2q import checkpoint
from h2q.cli import flag_name, run_main

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--data-dir", "corpus", "--data-root", "prep", "--preset", "tiny", "--device", "cpu", "--no-progress",
         "--batch-size", "2", "--block-size", "32", "--eval-batches", "1", "--eval-every", "2", "--save-every", "2",
         "--warmup", "1"]
EVOLVE = ["--agents", "2", "--steps", "4", "--eval-episodes", "1", "--lora-rank", "2", "--device", "cpu",
          "--threads", "1", "--no-progress"]
MEMORY_LIMIT = 8 << 30  # bytes of address space a case may take
CASE_SECONDS = 60


def train_args(out: str, steps: int = 4, *extra: str) -> list[str]:
    return [*TRAIN, "--out", out, "--steps", str(steps), *extra]


def entry_points() -> dict:
    """The main(argv) of every entry point, scripts included."""
    import importlib.util

    from h2q.evolve.run import main as evolve_main
    from h2q.infer import main as infer_main
    from h2q.train import main as train_main

    def script(name: str):
        spec = importlib.util.spec_from_file_location(f"h2q_script_{name}", ROOT / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.main

    return {"train": train_main, "evolve": evolve_main, "infer": infer_main, "quantize": script("quantize"),
            "report": script("report"), "prepare": script("prepare_data"), "export": script("export"),
            "import": script("import")}


def make_assets(root: Path) -> Path:
    """corpus/ (text) and prep/ (its prepared corpus); base/ (tiny, 4 steps, finished), base2/ (another
    seed), half/ (4 steps, stopped at 2), lora/ (a rank-4 adapter on base, finished), mini/ (another
    preset), nanbase/ (a model file holding NaN), ev/ (an evolve run on base, 1 cycle), afile (a file)."""
    from h2q import train as train_module
    mains = entry_points()
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus"
    corpus.mkdir()
    words = ["the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "agents", "evolve", "adapters"]
    for i in range(24):
        body = " ".join(words[(i + j) % len(words)] for j in range(120))
        (corpus / f"doc{i:02d}.txt").write_text(f"Document {i}.\n{body}\n", encoding="utf-8")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        def run(entry, argv):
            assert run_main(mains[entry], argv) == 0, argv

        run("train", train_args("base"))
        run("train", train_args("base2", 2, "--seed", "2"))
        run("train", train_args("lora", 2, "--init-from", "base", "--lora-rank", "4"))
        run("train", [*train_args("mini", 1), "--preset", "mini"])

        def stop_at_2(step, loss):
            if step == 2:
                raise KeyboardInterrupt
        cfg = train_module.TrainConfig(data_dir="corpus", data_root="prep", out="half", preset="tiny", steps=4,
                                       batch_size=2, block_size=32, eval_batches=1, eval_every=2, save_every=2,
                                       warmup=1, device="cpu", progress=False)
        assert train_module.train(cfg, on_step=stop_at_2)["steps"] == 2
        run("evolve", ["--base", "base", "--cycles", "1", "--out", "ev", *EVOLVE])
        model, _ = checkpoint.load_model("base")
        with torch.no_grad():
            model.layers[0].attn.q_proj.weight[0, 0] = float("nan")
        checkpoint.save_model("nanbase", model)
        (root / "afile").write_text("a file, not a folder\n")
    finally:
        os.chdir(cwd)
    return root


# -- random flag values ------------------------------------------------------------------------------------
def flag_specs() -> dict[str, list[tuple[str, type, dict, list | None]]]:
    """Per entry point: (flag, type, bounds, choices) of the flags worth fuzzing."""
    from h2q.evolve.evolution import BreedConfig
    from h2q.evolve.run import EvolveConfig
    from h2q.quant import QuantScheme
    from h2q.train import TrainConfig

    skip = {"data_dir", "data_root", "out", "device", "init_from", "resume", "progress", "compile", "base", "render",
            "report", "threads", "ckpt", "prompt", "interactive", "mode", "run", "adapter"}

    def of(*classes):
        specs = []
        for cls in classes:
            hints = typing.get_type_hints(cls)
            for f in dataclasses.fields(cls):
                kind = hints[f.name]
                kind = next((t for t in typing.get_args(kind) if t is not type(None)), kind)
                if f.name not in skip and f.metadata.get("cli", True) is not False:
                    specs.append((flag_name(f.name), kind, f.metadata.get("bounds") or {}, f.metadata.get("choices")))
        return specs

    calibration = [("--calib-batches", int, {"at_least": 1}, None), ("--calib-batch-size", int, {"at_least": 1}, None),
                   ("--calib-len", int, {"at_least": 1}, None), ("--seed", int, {"at_least": 0, "below": 2**63}, None)]
    return {"train": of(TrainConfig), "evolve": of(EvolveConfig, BreedConfig), "quantize": of(QuantScheme) + calibration}


# valid draws of the flags that set how long a run is stay short (and never huge)
SMALL_SIZES = {"--steps": 3, "--cycles": 2, "--agents": 4, "--eval-episodes": 2, "--calib-batches": 2,
               "--calib-batch-size": 2, "--memory": 2, "--grad-accum": 2, "--eval-batches": 2, "--calib-len": 16}


# flags whose huge valid values only make a run long: never drawn huge
LONG_RUNS = {"--steps", "--cycles", "--eval-episodes", "--grad-accum", "--eval-batches"}


def draw_value(rng: random.Random, flag: str, kind: type, bounds: dict, choices) -> tuple[str, bool]:
    """(a value as typed on the command line, whether it is valid for the flag)."""
    if kind is bool:
        return rng.choice(["1", "yes", "nan"]), False  # a switch given a value: argparse refuses it
    if choices is not None and rng.random() < 0.5:
        if rng.random() < 0.6:
            return str(rng.choice(choices)), True
        return rng.choice(["", "none?", "int3", "7", "auto "]), False
    if kind not in (int, float):
        return rng.choice(["", "x" * 300, "nowhere/at/all"]), True  # a free string: any answer but a traceback
    low = bounds.get("at_least", bounds.get("above"))
    high = bounds.get("at_most", bounds.get("below"))
    pick = rng.random()
    if pick < 0.15:
        return rng.choice(["abc", "", "1e", "0x10", "--", "1,5"]), False
    if pick < 0.3 and kind is float:
        return rng.choice(["nan", "inf", "-inf", "NaN", "1e999"]), False
    if pick < 0.5 and low is not None:
        below = low - 1 if kind is int else low - rng.choice([1e-9, 0.5, 1e30])
        if "above" in bounds and rng.random() < 0.5:
            below = low  # an exclusive bound itself
        return str(below), False
    if pick < 0.6 and high is not None:
        return str(high + 1 if kind is int else high + rng.choice([1e-6, 1.0, 1e30])), False
    if pick < 0.65 and flag not in LONG_RUNS:  # sizes past memory, or past 64 bits: refused, or honoured (an interval)
        huge = rng.choice([10**9, 2**62, 10**23])
        return str(huge), high is None or huge < high or (huge == high and "at_most" in bounds)
    start = low if low is not None else 0
    if kind is int:
        start += 1 if "above" in bounds or (flag in SMALL_SIZES and start == 0) else 0  # --steps 0: 15 minutes
        stop = min(high - (1 if "below" in bounds else 0), start + 3) if high is not None else start + 3
        return str(rng.randint(int(start), int(min(stop, SMALL_SIZES.get(flag, stop))))), True
    stop = high if high is not None else start + 2.0
    value = rng.uniform(start, min(stop, start + 2.0))
    if "above" in bounds and value == start:
        value = start + 1e-3
    return repr(value), True


def flag_case(rng: random.Random, specs) -> dict:
    entry = rng.choice(["train", "train", "evolve", "quantize"])
    base = {"train": train_args("fresh", 2) if rng.random() < 0.8 else train_args("half", 4, "--resume"),
            "evolve": ["--base", "base", "--cycles", "1", "--out", "fresh", *EVOLVE],
            "quantize": ["--ckpt", "base", "--out", "q", "--data-dir", "corpus"]}[entry]
    extra, valid = [], True
    for spec in rng.sample(specs[entry], rng.choice([1, 1, 2])):
        value, ok = draw_value(rng, *spec)
        extra += [spec[0], value] if spec[1] is not bool else [f"{spec[0]}={value}"]
        valid &= ok
    argv = [*base, *extra]
    out = argv[argv.index("--out") + 1]
    return {"entry": entry, "argv": argv, "expect_refusal": not valid, "outputs": [out, "prep"],
            "what": f"{entry} {' '.join(extra)}"}


# -- random damage to files ---------------------------------------------------------------------------------
RESUME_HALF = train_args("half", 4, "--resume")
RESUME_LORA = train_args("lora", 2, "--init-from", "base", "--lora-rank", "4", "--resume")
RESUME_EV = ["--base", "base", "--cycles", "2", "--out", "ev", "--resume", *EVOLVE]
# file -> the runs that read it: (entry, argv, output folders an accepted run may change)
READERS = {
    "base/model.safetensors": [("quantize", ["--ckpt", "base", "--out", "q"], ["q"]),
                               ("train", train_args("fresh", 2, "--init-from", "base", "--lora-rank", "2"), ["fresh"]),
                               ("evolve", ["--base", "base", "--cycles", "1", "--out", "fresh", *EVOLVE], ["fresh"]),
                               ("infer", ["--ckpt", "base", "--prompt", "hi", "--max-new-tokens", "2", "--seed", "1",
                                          "--device", "cpu"], [])],
    "half/train_state.safetensors": [("train", RESUME_HALF, ["half"])],
    "lora/train_state.safetensors": [("train", RESUME_LORA, ["lora"])],
    "lora/adapter_model.safetensors": [("infer", ["--ckpt", "base", "--adapter", "lora", "--prompt", "hi",
                                                  "--max-new-tokens", "2", "--seed", "1", "--device", "cpu"], [])],
    "lora/adapter_config.json": [("infer", ["--ckpt", "base", "--adapter", "lora", "--prompt", "hi",
                                            "--max-new-tokens", "2", "--seed", "1", "--device", "cpu"], [])],
    "ev/state/evolve_state.safetensors": [("evolve", RESUME_EV, ["ev"])],
    "ev/state/env_c001_r0.safetensors": [("evolve", RESUME_EV, ["ev"])],
    "ev/config.json": [("evolve", RESUME_EV, ["ev"])],
    "ev/metrics.jsonl": [("evolve", RESUME_EV, ["ev"])],
    "half/metrics.jsonl": [("train", RESUME_HALF, ["half"])],
}
SWAPS = ["base/model.safetensors", "half/train_state.safetensors", "lora/train_state.safetensors",
         "lora/adapter_model.safetensors", "ev/state/evolve_state.safetensors", "ev/state/env_c001_r0.safetensors",
         "base2/model.safetensors", "mini/model.safetensors", "ev/config.json", "lora/adapter_config.json"]


def header_end(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0] if len(data) >= 8 else 0


def damage(rng: random.Random, root: Path, name: str) -> str:
    """Damage root/name at random; returns what was done."""
    path = root / name
    data = bytearray(path.read_bytes())
    jsonl, is_json = name.endswith(".jsonl"), name.endswith(".json")
    ops = ["truncate", "empty", "append"] + (["garbage_line"] if jsonl else ["swap"]) + \
        ([] if jsonl else ["flip"]) + (["json"] if is_json else []) + \
        (["header", "flip_header"] if name.endswith(".safetensors") else [])
    op = rng.choice(ops)
    if op == "truncate":
        at = rng.randrange(len(data)) if rng.random() < 0.7 else header_end(data)
        path.write_bytes(bytes(data[:at]))
        return f"truncate at {at} of {len(data)}"
    if op == "empty":
        path.write_bytes(b"")
        return "empty"
    if op == "append":
        path.write_bytes(bytes(data) + os.urandom(rng.choice([1, 7, 100])))
        return "append junk"
    if op == "garbage_line":
        lines = bytes(data).split(b"\n")
        lines.insert(rng.randrange(len(lines)), b'{"cycle": 1, "step": 2, broken')
        path.write_bytes(b"\n".join(lines))
        return "garbage line"
    if op == "swap":
        other = rng.choice([s for s in SWAPS if s != name])
        shutil.copyfile(root / other, path)
        return f"replaced by {other}"
    if op in ("flip", "flip_header"):
        end = header_end(data) if op == "flip_header" else len(data)
        start = 8 if op == "flip_header" else 0
        count = min(rng.choice([1, 2, 8, 4000]), max(end - start, 1))
        for i in rng.sample(range(start, end), count):
            data[i] ^= rng.randrange(1, 256)
        path.write_bytes(bytes(data))
        return f"flip {count} bytes{' of the header' if op == 'flip_header' else ''}"
    if op == "json":
        value = rng.choice([[], {}, "x", 1, None, {"format": "h2q-lora-v1"}])
        what = f"json replaced by {json.dumps(value)}"
        try:
            obj = json.loads(bytes(data))
            if isinstance(obj, dict) and obj and rng.random() < 0.6:
                key = rng.choice(sorted(obj))
                if rng.random() < 0.5:
                    del obj[key]
                    what = f"json key {key!r} deleted"
                else:
                    obj[key] = value
                    what = f"json key {key!r} set to {json.dumps(value)}"
                value = obj
        except ValueError:
            pass
        path.write_text(json.dumps(value))
        return what
    header = json.loads(bytes(data[8:header_end(data)]))  # op == "header"
    entries = [v for k, v in sorted(header.items()) if k != "__metadata__"]
    entry = rng.choice(entries)
    field_ = rng.choice(["dtype", "shape", "offsets", "metadata"])
    if field_ == "dtype":
        entry["dtype"] = rng.choice([d for d in ("F32", "I32", "F16", "BF16", "U8", "I64") if d != entry["dtype"]])
    elif field_ == "shape" and entry["shape"]:
        entry["shape"] = entry["shape"][::-1] if len(entry["shape"]) > 1 else [entry["shape"][0] + 1]
    elif field_ == "offsets":
        entry["data_offsets"] = [entry["data_offsets"][0] + 4, entry["data_offsets"][1] + 4]
    else:
        meta = header.setdefault("__metadata__", {})
        key = rng.choice(sorted(meta) or ["step"])
        meta[key] = rng.choice(["", "[]", "0", "nan", "{}"])
    text = json.dumps(header, separators=(",", ":")).encode()
    size = header_end(data) - 8
    if len(text) > size:
        path.write_bytes(struct.pack("<Q", len(text)) + text + bytes(data[header_end(data):]))
    else:
        path.write_bytes(bytes(data[:8]) + text.ljust(size) + bytes(data[header_end(data):]))
    return f"header {field_}"


def sees_the_same(original: bytes, damaged: bytes, name: str) -> bool:
    """Whether a reader is owed nothing by this damage: the same tensors and metadata, the same JSON,
    or (a log) the same records but a torn last line."""
    if name.endswith(".safetensors"):
        from safetensors.torch import load
        try:
            return _same_safetensors(load(original), load(damaged), original, damaged)
        except Exception:
            return False
    if name.endswith(".jsonl"):  # whole lines as they were (or fewer, cut short); a torn last line is ignored
        whole = [json.loads(line) for line in original.decode().split("\n") if line.strip()]
        try:
            got = [json.loads(line) for line in damaged.decode("utf-8").split("\n")[:-1] if line.strip()]
        except ValueError:
            return False
        return got == whole[:len(got)]
    try:
        return json.loads(original) == json.loads(damaged)
    except ValueError:
        return False


def _same_safetensors(a, b, raw_a: bytes, raw_b: bytes) -> bool:
    def meta(raw):
        return json.loads(raw[8:header_end(raw)]).get("__metadata__")
    def same(x, y):  # bit for bit (a NaN equals itself)
        return x.dtype == y.dtype and x.shape == y.shape and torch.equal(x.reshape(-1).view(torch.uint8),
                                                                         y.reshape(-1).view(torch.uint8))
    return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a) and meta(raw_a) == meta(raw_b)


def file_case(rng: random.Random, root: Path) -> dict:
    name = rng.choice(sorted(READERS))
    entry, argv, outputs = rng.choice(READERS[name])
    original = (root / name).read_bytes()
    what = damage(rng, root, name)
    harmless = sees_the_same(original, (root / name).read_bytes(), name)
    return {"entry": entry, "argv": argv, "expect_refusal": not harmless, "outputs": outputs,
            "what": f"{entry} reading {name}: {what}", "damaged_file": name}


# -- running and judging a case ------------------------------------------------------------------------------
def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def folders(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_dir()}


def left_behind(root: Path, before: dict[str, bytes], before_folders: set[str]) -> list[str]:
    """What a run left that it should not: a lock or temporary file, or a new empty folder (the --out
    of a run refused at its start)."""
    left = [name for name in snapshot(root).keys() - before.keys()
            if Path(name).name == checkpoint.LOCK_FILE or checkpoint.STALE_TEMP.fullmatch(Path(name).name)]
    left += [f"{name}/" for name in folders(root) - before_folders if not any((root / name).iterdir())]
    return sorted(left)


def run_forked(main, argv: list[str], root: Path) -> tuple[object, str]:
    """(exit code or 'traceback: ...' or 'timeout', stderr) of main(argv) in a child process in `root`."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        code, err = "traceback: the child failed", ""
        try:
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
            signal.alarm(CASE_SECONDS)
            os.chdir(root)
            buffer = io.StringIO()
            with contextlib.redirect_stderr(buffer), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = run_main(main, argv)
                except SystemExit as e:
                    code = e.code
                except BaseException as e:  # noqa: BLE001 (anything escaping is what a user sees as a traceback)
                    code = f"traceback: {type(e).__name__}: {str(e)[:200]}"
            err = buffer.getvalue()
        finally:
            with os.fdopen(write, "wb") as f:
                f.write(pickle.dumps((code, err[-4000:])))
            os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        raw = f.read()
    os.waitpid(pid, 0)
    return pickle.loads(raw) if raw else ("timeout", "")


def judge(case: dict, code, err: str, before: dict, after: dict, left: list[str]) -> list[str]:
    """The case's verdicts: one of clean/accepted/traceback/silent/timeout, plus damaged/left."""
    lines = [line for line in err.splitlines() if line.strip()]
    if code == "timeout":
        verdicts = ["timeout"]
    elif isinstance(code, str) or "Traceback" in err:
        verdicts = ["traceback"]
    elif code == 0:
        verdicts = ["silent" if case["expect_refusal"] else "accepted"]
    elif code == 2 and 1 <= len(lines) <= 3:
        verdicts = ["clean"]
    else:
        verdicts = ["unclear"]
    free = tuple(f"{o}/" for o in case["outputs"]) if code == 0 else ()
    if any(after.get(name) != data for name, data in before.items() if not name.startswith(free)):
        verdicts.append("damaged")
    if code != "timeout" and left:  # a killed run leaves them, as a kill -9 does
        verdicts.append("left")
    return verdicts


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60, help="how long to fuzz (default: 60)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random cases (default: 0)")
    parser.add_argument("--show", type=int, default=20, help="cases to list per bad verdict (default: 20)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="h2q-fuzz-"))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            assets = make_assets(work / "assets")
        mains, specs = entry_points(), flag_specs()
        counts = dict.fromkeys(["clean", "accepted", "traceback", "silent", "unclear", "timeout", "damaged", "left"], 0)
        examples: dict[str, list[str]] = {}
        tried, start = 0, time.time()
        while time.time() - start < args.seconds:
            root = work / "case"
            shutil.rmtree(root, ignore_errors=True)
            shutil.copytree(assets, root)
            case = file_case(rng, root) if rng.random() < 0.5 else flag_case(rng, specs)
            before, before_folders = snapshot(root), folders(root)
            code, err = run_forked(mains[case["entry"]], case["argv"], root)
            tried += 1
            left = left_behind(root, before, before_folders)
            for verdict in judge(case, code, err, before, snapshot(root), left):
                counts[verdict] += 1
                if verdict not in ("clean", "accepted"):
                    last = (err.strip().splitlines() or [""])[-1][:160]
                    extra = f" (left {', '.join(left)})" if verdict == "left" else ""
                    examples.setdefault(verdict, []).append(f"{case['what']} -> {code}: {last}{extra}")
        print(f"fuzz_cli: {tried} cases in {time.time() - start:.0f} s (seed {args.seed})")
        print("| cases | clean errors | accepted | tracebacks | silent acceptances | unclear | timeouts "
              "| damaged files | left behind |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {tried} | {counts['clean']} | {counts['accepted']} | {counts['traceback']} | {counts['silent']} "
              f"| {counts['unclear']} | {counts['timeout']} | {counts['damaged']} | {counts['left']} |")
        for verdict, found in examples.items():
            print(f"{verdict}: {len(found)}")
            for line in found[:args.show]:
                print(f"  {line}")
        return 1 if any(counts[k] for k in ("traceback", "silent", "unclear", "timeout", "damaged", "left")) else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
