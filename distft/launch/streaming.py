"""`data.streaming`: a stage's training rows as a Ray Dataset, read and tokenized by Ray Data tasks.

Ray Data reads the files block by block and tokenizes in parallel tasks on any node while the
workers train; it keeps only a bounded number of blocks in flight (backpressure), so a worker's
memory does not grow with the dataset. Ray Train gives each worker its own shard
(`ray.train.get_dataset_shard`), which reaches the stage through `StageContext.dataset_shard`:
the stage stays Ray-free and sees an iterator of token rows.

Rows are encoded by the same `encode_row` as the in-memory path, so both train on identical
token ids and loss masks; a row that cannot be encoded fails the run with its content named.
"""

from __future__ import annotations

import os
from pathlib import Path

from distft.config import DistftConfig
from distft.data.formats import IGNORE, DataError, check_row, encode_row
from distft.data.loading import LOCAL_BUILDERS

_TOKENIZERS: dict = {}  # per Ray worker process: one tokenizer load per stage, not per block


def data_files(source: str, field: str = "data.train") -> list[str]:
    """The files a streamed source names: one file, or every data file under a directory (sorted)."""
    path = Path(source).expanduser()
    files = sorted(p for p in path.rglob("*") if p.suffix in LOCAL_BUILDERS) if path.is_dir() else [path]
    if not path.exists() or not files:
        raise DataError(f"{field}: data.streaming reads local files (.jsonl, .json, .parquet, .csv, or a directory "
                        f"of them); found none at {source}. Fix: point {field} at such files, or set "
                        "data.streaming=false to load a datasets name.")
    kinds = {LOCAL_BUILDERS[p.suffix] for p in files}
    if len(kinds) > 1:
        raise DataError(f"{field}: {source} mixes {', '.join(sorted(kinds))} files; a stream reads one kind. "
                        "Fix: keep one file type in the directory.")
    return [str(p) for p in files]


def spare_cpu_problem(cfg: DistftConfig, cluster_cpus: float) -> str | None:
    """Ray Data's read and tokenize tasks take a CPU each; with every CPU held by a Train worker they
    never start and the workers wait on an empty stream forever. Refused before launch instead."""
    if not any(st.data.streaming for st in cfg.stages):
        return None
    s = cfg.scaling
    held = s.num_workers * s.cpus_per_worker
    if cluster_cpus - held >= 1:
        return None
    fit = (cluster_cpus - 1) / s.num_workers
    fix = f"scaling.cpus_per_worker={fit:g} (and scaling.torch_threads=1), or " if fit > 0 else ""
    return (f"data.streaming: Ray Data's read and tokenize tasks need 1 CPU beside the workers, but the workers hold "
            f"{held:g} of the cluster's {cluster_cpus:g} CPUs. Fix: {fix}fewer scaling.num_workers, or a bigger "
            "cluster.")


def check_sample(source: str, data, field: str = "data.train", n: int = 1000) -> str:
    """Validate the first `n` rows of a streamed source before launch (reading it all is what streaming
    avoids); rows past them are checked by the tasks that tokenize them. Returns a note for preflight."""
    files = data_files(source, field)
    first = Path(files[0])
    if first.suffix == ".jsonl":
        import json

        rows = []
        with first.open() as f:
            for lineno, line in enumerate(f, 1):
                if len(rows) >= n:
                    break
                if line.strip():
                    try:
                        rows.append((lineno, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise DataError(f"{field}: {first} line {lineno} is not valid JSON: {e.msg}.") from None
    elif first.suffix == ".parquet":
        import pyarrow.parquet as pq

        batch = next(pq.ParquetFile(first).iter_batches(batch_size=n), None)
        rows = list(enumerate(batch.to_pylist() if batch is not None else [], 1))
    elif first.suffix == ".csv":
        import pandas as pd

        rows = list(enumerate(pd.read_csv(first, nrows=n).to_dict("records"), 1))
    else:  # one JSON array: there is no reading a part of it
        return f"{field}: {source}: {len(files)} file(s), streamed; rows are checked as they are tokenized"
    if not rows:
        raise DataError(f"{field}: {first} has no rows. Fix: point it at a non-empty file.")
    for where, row in rows:
        problem = check_row(row, data.format, data.text_field) if isinstance(row, dict) else "is not an object"
        if problem:
            raise DataError(f"{field}: {first} row {where}: {problem} (format {data.format}).")
    return (f"{field}: {source}: {len(files)} file(s), streamed; the first {len(rows)} rows checked, the rest as "
            "they are tokenized")


def read_rows(files: list[str]):
    import ray.data

    kind = LOCAL_BUILDERS[Path(files[0]).suffix]
    if kind == "parquet":
        return ray.data.read_parquet(files)
    if kind == "csv":
        return ray.data.read_csv(files)
    return ray.data.read_json(files, lines=Path(files[0]).suffix == ".jsonl")


def _tokenizer(cfg_json: str, stage_index: int, run_dir: str, secrets=None):
    key = (cfg_json, stage_index, run_dir)
    if key not in _TOKENIZERS:
        from distft.models.loading import load_tokenizer

        if secrets is not None:  # run.forward_env's values (HF_TOKEN for a gated tokenizer), as the workers get them
            import ray

            from distft.launch.job_package import scrub_unpacked_secrets

            os.environ.update(ray.get(secrets))
            # This task's node may host no Train worker, which would delete the job package's copy.
            scrub_unpacked_secrets()
        from distft.stages.chain import source_path

        cfg = DistftConfig.model_validate_json(cfg_json)
        # The tokenizer the stage's model was exported with (an earlier stage's, or the base's).
        source = cfg.init_source(stage_index)
        path = source_path(cfg, Path(run_dir), source)
        # model.revision names a revision of the base only (as stage_model has it).
        model = cfg.model if source == cfg.model.name_or_path else cfg.model.model_copy(update={"revision": None})
        _TOKENIZERS[key] = load_tokenizer(model, path)
    return _TOKENIZERS[key]


def token_rows(cfg: DistftConfig, stage_index: int, run_dir: Path, env: dict[str, str] | None = None,
               secrets=None):
    """The stage's training rows as a Ray Dataset of {input_ids, labels}, tokenized lazily by Ray Data tasks.
    `env`: what the tasks' processes need, as the Train workers get it (caches, offline mode); `secrets`:
    an object ref to run.forward_env's values, which stay out of the runtime env (Ray shows those)."""
    import ray.data

    stage = cfg.stages[stage_index]
    data, max_len, loss_on = stage.data, cfg.model.max_seq_len, stage.loss_on()
    cfg_json, where = cfg.model_dump_json(), str(run_dir)

    def encode(row: dict) -> list[dict]:
        problem = check_row(row, data.format, data.text_field)
        if problem:
            excerpt = str({k: v for k, v in row.items()})[:200]
            raise DataError(f"data.train: {data.train}: a row {problem} (format {data.format}): {excerpt}")
        enc = encode_row(row, data.format, _tokenizer(cfg_json, stage_index, where, secrets), max_len, loss_on,
                         data.text_field)
        # A row with nothing left to learn from (all prompt after truncation) is skipped, as in memory.
        return [] if all(t == IGNORE for t in enc.labels) else [{"input_ids": enc.input_ids, "labels": enc.labels}]

    # Ray Data's per-operator bars redraw dozens of lines into every log; the stage prints progress.
    ray.data.DataContext.get_current().enable_progress_bars = False
    rows = read_rows(data_files(data.train))
    if data.max_train_samples:
        rows = rows.limit(data.max_train_samples)
    return rows.flat_map(encode, runtime_env={"env_vars": env} if env else None)
