"""Data preparation throughput (what `nam-train data` does) at data.workers = 1, 2, 4, 8, 16.

    NAM_COMMIT=<sha> bash bench/gpu.sh prepare

The corpus is made on the machine (it has no network): its C++ standard library headers
(``nam_trainer.data.cxx_header_dirs``), copied until the copies hold TARGET_MB. No two copies
share text: copy k appends a suffix of its own (letters, so the BPE pre-tokenizer keeps it in the
word) to every identifier that starts with an underscore, the library's reserved names
(``_M_impl``, ``__glibcxx_assert``, ``_Tp``: most names in these headers), so every document's
digest differs and the tokenizer meets new words in each copy as in a corpus of distinct code,
while keywords, public names and the syntax that tree-sitter parses stay as they are.

nam56r-small's data settings (rows of 4096 tokens, structure channels "cpp" from tree-sitter,
5% validation). Its BPE of 65,536 tokens is trained once beforehand on the first copy (by
nam-train's own ``prepare_tokenizer``) and then given by path, so each timed run, a fresh cache
directory each, is ``prepare_data``: the corpus scan (read and sha256 every file, in the workers;
with more than one, their start: spawn and imports), the units (tokenization and structure
extraction, in the workers: about TARGET_MB / 2 units of units.UNIT_BYTES, so at 16 workers the
last round is part-filled; the main process packs each unit's rows as soon as it and those before
it are done) and what follows the last unit: its rows, the entry's checksums and the workers' exit
(``pack_s``). The log lines of ``prepare_data`` split the wall time into those three, and
its line for the first unit built gives ``first_unit_s``: the workers' start and one unit.

Check: the packed files (their sha256 in the manifest) are the same at every worker count.
Rows: wall time, MB/s of corpus text (1 MB = 1e6 bytes), speed-up over 1 worker and parallel
efficiency (speed-up / workers), with the split. Goal (issue #15): near-linear speed-up to 8
workers.
"""

from __future__ import annotations

import os
import re
import shutil
import string
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import Report

WORKERS = (1, 2, 4, 8, 16)
# ~32 units of 2 MB: 4 rounds at 8 workers, 2 at 16, so a worker's start (imports, tokenizer) is not most of
# its time (at 40 MB, 19 units, it was: RESULTS.md); the five runs take about 3 minutes on 16 cores
TARGET_MB = 64
PRESET = "nam56r-small"
RESERVED = re.compile(r"\b_\w+")  # an identifier starting with an underscore
UNITS_DONE = re.compile(r"data: (\d+)/\1 units")  # the progress line once every unit is built
FIRST_UNIT = re.compile(r"data: 1/\d+ units")  # the progress line of the first unit built


def log(message: str) -> None:
    print(f"[prepare {time.strftime('%H:%M:%S')}] {message}", flush=True)


def suffix(copy: int) -> str:
    """Letters only, distinct per copy: 'qa', 'qb', ..., 'qz', 'qba', ..."""
    letters = ""
    while True:
        copy, r = divmod(copy, 26)
        letters = string.ascii_lowercase[r] + letters
        if not copy:
            return "q" + letters


def make_corpus(out: Path, target_bytes: int) -> tuple[int, int]:
    """Copies of the headers under ``out/copy-K/``, each with its own identifier suffix, until they
    hold ``target_bytes``; returns (copies, bytes). Files that are not UTF-8 text are left out, as the
    corpus scan would skip them."""
    from nam_trainer.data import cxx_header_dirs
    from nam_trainer.data.sources import file_text, walk

    headers = []
    for i, d in enumerate(cxx_header_dirs()):
        for path in walk(d):
            text, _ = file_text(path)
            if text is not None:
                headers.append((f"dir{i}/{path.relative_to(d)}", text))
    copies = total = 0
    while total < target_bytes:
        tail = suffix(copies)
        for name, text in headers:
            dest = out / f"copy-{copies:03d}" / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            data = RESERVED.sub(r"\g<0>" + tail, text).encode("utf-8")
            dest.write_bytes(data)
            total += len(data)
        copies += 1
    return copies, total


def config(corpus: str, cache_dir: Path, workers: int, tokenizer: str = "") -> Any:
    from nam_trainer.config import load_config

    overrides = ["--data.sources", f'["{corpus}"]', "--data.cache_dir", str(cache_dir)]
    overrides += ["--data.workers", str(workers), "--data.structure", "cpp"]
    return load_config(PRESET, overrides=overrides + (["--tokenizer.path", tokenizer] if tokenizer else []))


def train_tokenizer(corpus: Path, cache_dir: Path) -> str:
    """nam-train's BPE of the preset's vocabulary, trained on the first copy only."""
    from nam_trainer.data import plan_corpus, prepare_tokenizer

    cfg = config(str(corpus / "copy-000"), cache_dir, len(os.sched_getaffinity(0)))
    plan = plan_corpus(cfg.data)
    tok = prepare_tokenizer(
        cfg.tokenizer, cfg.model.vocab_size, plan.train, plan.train_texts(), cache_dir, log
    )
    return str(tok.path)


def timed_run(corpus: Path, cache_dir: Path, workers: int, tokenizer: str) -> dict[str, Any]:
    """One ``prepare_data`` into a fresh cache: wall time, its split, and the packed files' sha256."""
    from nam_trainer.data import prepare_data
    from nam_trainer.data.cache import read_manifest

    said: list[tuple[float, str]] = []

    def note(line: str) -> None:
        said.append((time.perf_counter(), line))
        log(f"  {line}")

    cfg = config(str(corpus), cache_dir, workers, tokenizer)
    start = time.perf_counter()
    data = prepare_data(cfg, note)
    end = time.perf_counter()
    scanned = next(t for t, line in said if line.startswith("corpus:"))
    units = max(t for t, line in said if UNITS_DONE.match(line))
    first = min(t for t, line in said if FIRST_UNIT.match(line))
    files = {name: meta["sha256"] for name, meta in read_manifest(data.entry)["files"].items()}
    return {
        "s": end - start,
        "scan_s": scanned - start,
        "units_s": units - scanned,
        "first_unit_s": first - scanned,
        "pack_s": end - units,
        "files": files,
    }


def main(report: Report) -> None:
    from nam_runtime.quiet import quiet

    quiet()  # megatron's rank notice, said whenever prepare_data reads a packed split outside torchrun
    # What prepare_data imports in this process on first use (megatron's indexed dataset: ~6 s of
    # CPU), imported before any timed run: else the first run, 1 worker, pays it alone.
    import megatron.core.datasets.indexed_dataset  # noqa: F401
    import tokenizers  # noqa: F401

    cores = len(os.sched_getaffinity(0))
    with tempfile.TemporaryDirectory(prefix="nam-bench-prepare-") as tmp:
        root = Path(tmp)
        log(f"making a corpus of {TARGET_MB} MB from the C++ headers ({cores} cores)")
        copies, nbytes = make_corpus(root / "corpus", TARGET_MB * 10**6)
        log(f"{copies} copies, {nbytes:,} bytes; training the tokenizer on the first copy")
        tokenizer = train_tokenizer(root / "corpus", root / "tokenizer-cache")
        results: dict[int, dict[str, Any]] = {}
        for workers in WORKERS:
            log(f"data.workers = {workers}")
            cache_dir = root / f"cache-{workers}"
            r = results[workers] = timed_run(root / "corpus", cache_dir, workers, tokenizer)
            shutil.rmtree(cache_dir)
            speedup = results[1]["s"] / r["s"]
            log(
                f"{workers} workers: {r['s']:.1f} s, {nbytes / 1e6 / r['s']:.2f} MB/s, speed-up {speedup:.2f}"
            )
    base = results[1]["files"]
    for workers, r in results.items():
        speedup = results[1]["s"] / r["s"]
        if workers > 1:
            differ = sum(r["files"].get(name) != sha for name, sha in base.items()) + len(
                set(r["files"]) - set(base)
            )
            report.check(f"packed files at {workers} workers == at 1", differ, 0)
        report.row(
            f"{workers} workers ({cores} cores), {nbytes / 1e6:.0f} MB",
            ms=r["s"] * 1e3,
            MB_s=nbytes / 1e6 / r["s"],
            speedup=speedup,
            efficiency=speedup / workers,
            scan_s=r["scan_s"],
            units_s=r["units_s"],
            first_unit_s=r["first_unit_s"],
            pack_s=r["pack_s"],
        )
