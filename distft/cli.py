"""The `distft` command line. YAML + dotted overrides in; one clear message out on bad input."""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

from distft.config import DistftConfig, load_config
from distft.errors import UserError

EPILOG = """examples:
  distft train configs/quickstart.yaml
  distft train configs/quickstart.yaml train.lr=1e-3 scaling.num_workers=1
  distft validate configs/quickstart.yaml
  distft resume runs/<run>                      # after an interruption: continues from the last checkpoint
  distft pipeline configs/rlhf_quickstart.yaml  # sft -> reward -> ppo in runs/rlhf_quickstart; reruns skip done stages
  distft generate runs/<run> --prompt "Which animal is in this sentence?" --input "The red fox walked to Oslo."
  distft eval runs/<run> --data configs/data/facts_test.jsonl
  distft runs show runs/<run>                   # stages, metrics, model, provenance; `distft runs list` for all
  distft cluster up --workers 2 && distft train configs/quickstart.yaml --address 127.0.0.1:6379
  distft submit configs/quickstart.yaml --follow   # a Ray Job on the `distft cluster up` job server
  distft jobs list | distft jobs logs JOB_ID --follow | distft jobs stop JOB_ID
"""


class UsageError(UserError):
    """A problem the user can fix; printed without a traceback."""


def _load(args) -> DistftConfig:
    from distft.launch.preflight import absolutize_paths, beside_config

    return absolutize_paths(beside_config(load_config(args.config, args.overrides), args.config))


def cmd_validate(args) -> int:
    from distft.launch.lifecycle import check_paths
    from distft.launch.preflight import describe_plan, preflight
    from distft.launch.session import cluster_address

    cfg = _load(args)
    # The memory check first: it needs no cluster, and an over-budget plan is worth seeing even when
    # this machine cannot host the run (a GPU config validated on a laptop).
    if cfg.scaling.use_gpu and cfg.scaling.gpu_memory_gib:
        from distft.launch.sizing import fit_warnings

        warnings = fit_warnings(cfg)
        for line in warnings:
            print(f"warning {line}", file=sys.stderr)
        if not warnings:
            print(f"check   memory: every stage fits {cfg.scaling.gpu_memory_gib:g} GiB per GPU (see `distft plan`)")
    notes = preflight(cfg, cluster_address(cfg, args.address))
    notes += check_paths(cfg, cluster_address(cfg, args.address))
    print(describe_plan(cfg))
    for note in notes:
        print(f"check   {note}")
    print(f"config OK: {args.config}")
    return 0


def _gib(text: str) -> float:
    """'80GiB', '80G', '80' -> 80.0 (GiB)."""
    value = text.strip().lower().removesuffix("ib").removesuffix("gb").removesuffix("g")
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a memory size like 80GiB") from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def cmd_plan(args) -> int:
    from distft.launch.sizing import render_plan

    cfg = _load(args)
    gpu = args.gpu_memory or cfg.scaling.gpu_memory_gib or 80.0
    print(render_plan(cfg, gpu, args.gpus_per_node, args.gpus))
    return 0


def cmd_train(args) -> int:
    from distft.launch.lifecycle import start_run

    if args.resume:  # `distft train --resume RUN_DIR [overrides]`: the same as `distft resume`
        overrides = [args.config, *args.overrides] if args.config and "=" in args.config else args.overrides
        if args.config and "=" not in args.config:
            raise UsageError("give a config (distft train CONFIG) or --resume RUN_DIR, not both.")
        return cmd_resume(argparse.Namespace(run_dir=args.resume, overrides=overrides, address=args.address,
                                             start_from=args.start_from, hint=args.hint))
    if args.start_from:
        raise UsageError(f"--from {args.start_from} picks the checkpoint of a run to resume. Fix: distft train "
                         f"--resume RUN_DIR --from {args.start_from}, or distft resume RUN_DIR --from {args.start_from}.")
    if not args.config:
        raise UsageError("distft train needs a config. Fix: distft train CONFIG [a.b=c ...], or "
                         "distft train --resume RUN_DIR.")
    return _print_finished(start_run(_load(args), args.config, args.address, args.hint))


def cmd_resume(args) -> int:
    """Continue an interrupted run in place: finished stages are skipped, the current one resumes."""
    from distft.launch.lifecycle import resume_run

    return _print_finished(resume_run(args.run_dir, args.overrides, args.address,
                                      getattr(args, "start_from", None), args.hint))


def cmd_pipeline(args) -> int:
    """Run a multi-stage config as one job in a stable run directory; a rerun skips finished stages."""
    from distft.launch.lifecycle import start_pipeline

    return _print_finished(start_pipeline(_load(args), args.config, args.address, args.force, args.hint))


def _print_finished(done) -> int:
    from distft.launch.runs import render_summary

    print(render_summary(done.run_dir, done.summaries, done.seconds))
    return 0


def cmd_tune(args) -> int:
    """A Ray Tune search over the config's `tune.space`; --resume continues one without rerunning finished trials."""
    from distft.launch.lifecycle import run_search, start_search
    from distft.launch.tune import markdown_table

    start = start_search(args.config, args.overrides, args.resume, args.address)
    run_dir, tune_cfg = start.run_dir, start.tune_cfg
    if args.resume:
        print(f"[tune] resuming {run_dir}: finished trials are kept, unfinished ones continue", flush=True)
    print(f"search  {run_dir}", flush=True)
    for path, d in tune_cfg.space.items():
        print(f"  {path}: {d.kind} {d.values}")
    out = run_search(start, args.address, args.hint)
    print(markdown_table(out["rows"], tune_cfg.metric, out["best"]))
    if out["interrupted"]:
        what = "terminated (SIGTERM)" if out.get("terminated") else "interrupted"
        print(f"search {what}; continue it with: distft tune --resume {run_dir}", file=sys.stderr)
        return 143 if out.get("terminated") else 130
    best = out["best"]
    if best is None:
        failed = [r for r in out["rows"] if r["status"] == "failed"]
        hint = failed[0]["stop_reason"] if failed else f"no trial reported {tune_cfg.metric}"
        print(f"error: no trial produced a result ({hint}). Trials: {run_dir / 'trials'}", file=sys.stderr)
        return 1
    print(f"best    trial {best['trial']}: {tune_cfg.metric} {best['final']:.4g} with "
          + ", ".join(f"{k}={v}" for k, v in best["params"].items()))
    print(f"        config {run_dir / 'best.yaml'}  (distft train {run_dir / 'best.yaml'})")
    print(f"        model  {best['model_dir']}")
    print(f"results {run_dir / 'trials.csv'}, {run_dir / 'results.md'}, curves {run_dir / 'curves.png'}")
    return 0


def cmd_tiny_model(args) -> int:
    from distft.stages.tiny_base import build_tiny_base

    out = build_tiny_base(args.out_dir, force=args.force)
    print(f"tiny base model: {out}  (use it with model.name_or_path={out}; distft://tiny-base stays the "
          "shipped base)")
    return 0


def _user_prompt(tokenizer, prompt: str, extra: str | None, raw: bool) -> str:
    from distft.data.formats import alpaca_prompt

    text = alpaca_prompt({"instruction": prompt, "input": extra or ""})
    if raw or not getattr(tokenizer, "chat_template", None):
        return text
    return tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)


def _named_adapters(specs: list[str]) -> dict[str, str]:
    adapters = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise UsageError(f"--adapter {spec!r} is not NAME=PATH. Fix: e.g. --adapter sql=runs/sql-lora.")
        if name in adapters:
            raise UsageError(f"--adapter {name} is given twice. Fix: one name per adapter.")
        adapters[name] = path
    return adapters


def cmd_generate(args) -> int:
    from distft.models.loading import load_for_inference, load_with_adapters
    from distft.stages.evaluate import generate

    adapters = _named_adapters(args.adapter or [])
    if adapters:
        model, tokenizer = load_with_adapters(args.model, adapters, args.trust_remote_code, args.allow_pickle_weights)
    else:
        model, tokenizer = load_for_inference(args.model, trust_remote_code=args.trust_remote_code,
                                              allow_pickle=args.allow_pickle_weights)
    prompts = [_user_prompt(tokenizer, p, args.input, args.raw) for p in args.prompt]
    for name in adapters or [None]:
        if name:
            model.set_adapter(name)  # one base in memory; only the adapter changes
            print(f"[adapter {name}]")
        for prompt, answer in zip(args.prompt, generate(model, tokenizer, prompts, args.max_new_tokens)):
            print(f"> {prompt}" + (f" [{args.input}]" if args.input else ""))
            print(answer.strip())
    return 0


def cmd_export(args) -> int:
    from distft.models.export import export_model

    src = Path(args.run_dir)
    run_dir = src if (src / "config.yaml").exists() else src.parent
    out = Path(args.out) if args.out else run_dir / ("export-merged" if args.merge else "export")
    if args.push_to_hub:
        from distft.config.schema import HUB_REPO_ID
        from distft.models.publish import hub_token, push_model

        if not HUB_REPO_ID.fullmatch(args.push_to_hub):
            raise UsageError(f"--push-to-hub {args.push_to_hub}: not a Hub repository id. Fix: ORG/NAME.")
        hub_token(args.push_to_hub)  # before the export: nothing is written for a push that cannot happen
        if out.exists():  # an earlier export (a push that failed, say): pushed as it is
            from distft.models.verify import model_dir_problem

            if problem := model_dir_problem(out):
                raise UsageError(f"{out} exists but is not a complete model ({problem}). Fix: --out <a new directory>.")
            print(f"pushing the existing export {out}", flush=True)
        else:
            export_model(src, out, merge=args.merge, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
        push_model(out, args.push_to_hub, args.private, run_dir if (run_dir / "config.yaml").is_file() else None)
        return 0
    export_model(src, out, merge=args.merge, dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    return 0


def cmd_eval(args) -> int:
    from types import SimpleNamespace

    from distft.data.loading import load_checked
    from distft.models.loading import load_for_inference
    from distft.stages.evaluate import exact_match

    data = SimpleNamespace(split="train", format=args.format, text_field="text")
    rows, fmt = load_checked(args.data, data, "--data")
    if args.max_samples:
        rows = rows.select(range(min(len(rows), args.max_samples)))
    model, tokenizer = load_for_inference(args.model, trust_remote_code=args.trust_remote_code,
                                          allow_pickle=args.allow_pickle_weights)
    result = exact_match(model, tokenizer, rows, fmt, args.max_new_tokens, args.batch_size)
    for prompt, expected, got in result.examples:
        print(f"expected {expected!r:>16}  got {got.strip()!r}")
    print(f"exact match: {result.accuracy:.1%} ({result.correct}/{result.total}) on {args.data}")
    return 0


def cmd_cluster(args) -> int:
    from distft.launch import cluster

    if args.action == "up":
        cluster.up(args.workers, args.cpus_per_worker, args.port, args.dashboard_port, args.timeout)
        return 0
    return cluster.status() if args.action == "status" else cluster.down()


def cmd_runs(args) -> int:
    from distft.launch.runs import list_runs, read_run, render_run, render_run_list

    if args.action == "show":
        if not args.path:
            raise UsageError("distft runs show needs a run directory. Fix: distft runs show runs/<run>.")
        print(render_run(read_run(args.path)))
    else:
        root = args.path or "runs"
        print(render_run_list(root, list_runs(root)))
    return 0


def cmd_submit(args) -> int:
    """Submit the config as a Ray Job; prints the job id (and, with --follow, its logs to the end)."""
    from distft.launch.jobs import follow, submit
    from distft.launch.preflight import absolutize_paths, beside_config, cluster_only_paths, preflight

    # Paths stay as written (the job ships local files itself), but for those found beside the config only.
    cfg = beside_config(load_config(args.config, args.overrides), args.config)
    # Everything checkable here, before anything is uploaded. The cluster's resources, and absolute
    # paths that exist only there (a shared volume), are checked by the job itself, on the cluster.
    for note in preflight(absolutize_paths(cfg), "auto", elsewhere=cluster_only_paths(cfg)):
        if "the job checks it on the cluster" in note:
            print(f"check   {note}")
    job_id, client, run_dir = submit(cfg, args.config, args.address)
    print(f"submitted {job_id} to {client.get_address()}")
    print(f"  run      {run_dir} (on the cluster)")
    print(f"  follow   distft jobs logs {job_id} --follow   |   stop: distft jobs stop {job_id}")
    if not args.follow:
        return 0
    status = follow(client, job_id)
    print(f"[jobs] {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1


def cmd_jobs(args) -> int:
    from distft.launch.jobs import job_logs, job_status, list_jobs, stop_job

    if args.action == "list":
        return list_jobs(args.address)
    if not args.job_id:
        raise UsageError(f"distft jobs {args.action} needs a job id. Fix: distft jobs {args.action} JOB_ID "
                         "(ids: distft jobs list).")
    if args.action == "status":
        return job_status(args.job_id, args.address)
    if args.action == "logs":
        return job_logs(args.job_id, args.address, args.follow)
    return stop_job(args.job_id, args.address)


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler, `kill`): stopped like Ctrl-C, with its own exit status, 143 (128 + 15)."""


_STOPPING: list[int] = []


def _interrupt(signum, frame):
    """The first SIGINT or SIGTERM stops the run; the second is ignored while it stops (the workers, the
    private cluster and the checkpoints are being put away: an impatient second Ctrl-C must not cut that
    short); a third ends distft at once, for a stop that hangs (the reaper still stops its cluster)."""
    _STOPPING.append(signum)
    if len(_STOPPING) == 1:
        raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    if len(_STOPPING) == 2:
        print("stopping the workers and the cluster; send the signal once more to quit at once", file=sys.stderr)
        return
    os._exit(143 if signum == signal.SIGTERM else 130)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="distft",
        description="Distributed LLM fine-tuning on Ray: one YAML from laptop to cluster.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(name: str, help_: str):
        sp = sub.add_parser(name, help=help_, description=help_)
        # Optional for `train --resume RUN_DIR`; every other command checks that it is there.
        sp.add_argument("config", nargs="?" if name == "train" else None, help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 scaling.num_workers=4")
        sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a private local cluster)")
        return sp

    sp = with_config("train", "Fine-tune with Ray Train (every stage in the config)")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run instead (as `distft resume`)")
    sp.add_argument("--from", dest="start_from", metavar="CHECKPOINT",
                    help="with --resume: continue from this checkpoint (checkpoint-N), as `distft resume --from`")
    sp.set_defaults(func=cmd_train)
    sp = sub.add_parser("resume", help="Continue an interrupted run from its latest verified checkpoint",
                        description="Continue an interrupted run in place: finished stages are skipped, the "
                                    "unfinished one resumes from its latest checkpoint that verifies (local, or "
                                    "Ray's copy of it); damaged ones are reported and skipped.")
    sp.add_argument("run_dir", help="the run directory (runs/<run>)")
    sp.add_argument("--from", dest="start_from", metavar="CHECKPOINT",
                    help="continue the unfinished stage from this checkpoint (checkpoint-N) instead of the latest")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. scaling.num_workers=4 (DDP/FSDP only)")
    sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a private local cluster)")
    sp.set_defaults(func=cmd_resume)
    sp = with_config("pipeline", "Run a multi-stage config (e.g. sft -> reward -> ppo) as one job; a rerun "
                                 "skips stages that finished with the same settings")
    sp.add_argument("--force", metavar="STAGE", help="rerun this stage and every later one ('all': every stage)")
    sp.set_defaults(func=cmd_pipeline)
    sp = with_config("plan", "Per-GPU memory of every stage and the fewest GPUs that fit, from config.json "
                             "alone (no weights downloaded, nothing launched)")
    sp.add_argument("--gpu-memory", type=_gib, help="memory of each GPU, e.g. 80GiB (default: "
                    "scaling.gpu_memory_gib, else 80)")
    sp.add_argument("--gpus-per-node", type=_positive, default=8, help="GPUs per node (default 8)")
    sp.add_argument("--gpus", type=_positive, help="plan for this many GPUs (default: scaling.num_workers)")
    sp.set_defaults(func=cmd_plan)
    help_ = ("Search hyperparameters (the config's `tune:` section) with Ray Tune and ASHA early stopping; "
             "each trial is a distributed Ray Train run")
    sp = sub.add_parser("tune", help=help_, description=help_)
    sp.add_argument("config", nargs="?", help="YAML config file with a `tune:` section")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. tune.num_samples=4 train.max_steps=60")
    sp.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted search; finished trials are kept")
    sp.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a private local cluster)")
    sp.set_defaults(func=cmd_tune)
    with_config(
        "validate", "Resolve the config, check model and data files, print the plan; launches nothing"
    ).set_defaults(func=cmd_validate)

    sp = sub.add_parser("submit", help="Submit the config as a Ray Job to a cluster's job server (token auth)",
                        description="Checks the config here, ships it with the local files it names, and runs "
                                    "`distft train` (or `pipeline` for several stages) as a Ray Job; prints the job id.")
    sp.add_argument("config", help="YAML config file")
    sp.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=1e-4 scaling.num_workers=4")
    sp.add_argument("--address", help="the job server (dashboard) URL, e.g. http://127.0.0.1:8265 (default: "
                                      "RAY_ADDRESS when it is a URL, else the `distft cluster up` cluster)")
    sp.add_argument("--follow", action="store_true", help="stream the job's logs until it ends; exit 0 on success")
    sp.set_defaults(func=cmd_submit)
    sp = sub.add_parser("jobs", help="List, inspect, follow or stop Ray Jobs on a cluster's job server",
                        description="list | status JOB_ID | logs JOB_ID [--follow] | stop JOB_ID")
    sp.add_argument("action", choices=["list", "status", "logs", "stop"])
    sp.add_argument("job_id", nargs="?")
    sp.add_argument("--follow", action="store_true", help="logs: stream until the job ends")
    sp.add_argument("--address", help="the job server (dashboard) URL (default as for submit)")
    sp.set_defaults(func=cmd_jobs)

    sp = sub.add_parser("tiny-model", help="Rebuild the tiny base with the recipe that made the shipped one "
                        "(distft://tiny-base needs no build)")
    sp.add_argument("out_dir", nargs="?", help="where to put it (default: $DISTFT_CACHE/tiny-base-rebuilt)")
    sp.add_argument("--force", action="store_true", help="rebuild even if it exists")
    sp.set_defaults(func=cmd_tiny_model)

    def with_model(name: str, help_: str):
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("model", help="run directory, model directory, LoRA adapter directory or hub id")
        sp.add_argument("--max-new-tokens", type=int, default=32)
        sp.add_argument("--trust-remote-code", action="store_true", help="run the model repo's Python code (unsafe)")
        sp.add_argument("--allow-pickle-weights", action="store_true",
                        help="load .bin (pickle) weights when the model has no safetensors (unsafe)")
        return sp

    sp = with_model("generate", "Sample from a model or a run's output (adapters included)")
    sp.add_argument("--prompt", action="append", required=True, help="instruction; repeat for several")
    sp.add_argument("--input", help="optional input appended to the instruction (alpaca style)")
    sp.add_argument("--raw", action="store_true", help="do not apply the chat template")
    sp.add_argument("--adapter", action="append", metavar="NAME=PATH",
                    help="an adapter trained on MODEL (the base); repeat to load several on one base and answer "
                         "with each in turn")
    sp.set_defaults(func=cmd_generate)
    sp = sub.add_parser("export", help="Write a run's model as a standalone HF directory (safetensors, tokenizer, "
                                       "generation config); --merge folds an adapter into its base",
                        description="Write a run's model as a standalone HF directory; verified against its "
                                    "manifest first")
    sp.add_argument("run_dir", help="the run directory (runs/<run>), or a model/adapter directory")
    sp.add_argument("--out", help="where (default: <run>/export, or <run>/export-merged with --merge)")
    sp.add_argument("--merge", action="store_true", help="merge a LoRA/DoRA/IA3 adapter (QLoRA: into the "
                                                         "dequantized base) into a full model")
    sp.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                    help="dtype of the written weights (default bfloat16; adapters left unmerged keep theirs)")
    sp.add_argument("--trust-remote-code", action="store_true", help="run the model repo's Python code (unsafe)")
    sp.add_argument("--push-to-hub", metavar="ORG/NAME", help="then upload the export with a model card made from "
                                                              "the run (token: $HF_TOKEN only)")
    sp.add_argument("--private", action="store_true", help="with --push-to-hub: create the repository private")
    sp.set_defaults(func=cmd_export)

    sp = with_model("eval", "Score a model on held-out prompt/answer data by exact match")
    sp.add_argument("--data", required=True, help="JSON/JSONL/Parquet/CSV with alpaca, messages or prompt/completion rows")
    sp.add_argument("--format", default="auto", choices=["auto", "alpaca", "messages", "prompt_completion"])
    sp.add_argument("--max-samples", type=int)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.set_defaults(func=cmd_eval, max_new_tokens=16)

    from distft.launch.cluster import DEFAULT_DASHBOARD_PORT, DEFAULT_PORT

    sp = sub.add_parser(
        "cluster", help="Start, inspect or stop a multi-node Ray cluster on this machine (token auth on)",
        description="up: a Ray head (0 CPUs) and N worker raylets on this machine; status: its nodes; down: stop it.",
    )
    sp.add_argument("action", choices=["up", "status", "down"])
    sp.add_argument("--workers", type=int, default=2, help="worker raylets (up; default 2)")
    sp.add_argument("--cpus-per-worker", type=int, help="CPUs of each worker raylet (up; default: cores / workers)")
    sp.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the head's GCS port (up; default {DEFAULT_PORT})")
    sp.add_argument("--dashboard-port", type=int, default=DEFAULT_DASHBOARD_PORT,
                    help=f"dashboard and Jobs API on 127.0.0.1 (up; default {DEFAULT_DASHBOARD_PORT})")
    sp.add_argument("--timeout", type=float, help="seconds to wait for every node (up; default 60 + 20 per worker)")
    sp.set_defaults(func=cmd_cluster)

    sp = sub.add_parser(
        "runs", help="Show one run (stages, metrics, model, provenance) or list the runs in a directory",
        description="show RUN_DIR: each stage's status and key metrics, the model, whether the run finished (else "
                    "its latest checkpoint and the resume command), and provenance. list [DIR]: the runs under DIR "
                    "(default runs/).",
    )
    sp.add_argument("action", choices=["show", "list"])
    sp.add_argument("path", nargs="?", help="show: the run directory; list: the directory of runs (default runs/)")
    sp.set_defaults(func=cmd_runs)
    for command in sub.choices.values():
        command.add_argument("-v", "--verbose", action="store_true",
                             help="on a failure, print the full tracebacks too (they are always in the run's "
                                  "<stage>/error.log)")
    return p


def main(argv: list[str] | None = None) -> int:
    from distft.stages.quiet import quiet_notices

    quiet_notices(driver=True)  # before any command imports the libraries that log them
    parser = build_parser()
    # Overrides may come after options too (`train c.yaml --address X train.lr=1`), which
    # plain argparse rejects once an option has ended the positional list.
    args, extra = parser.parse_known_args(argv)
    stray = [x for x in extra if x.startswith("-") or "=" not in x or not hasattr(args, "overrides")]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    from distft.launch.rundir import ResumeHint  # after parsing: `--help` stays as quick as it was

    args.hint = ResumeHint()  # the command that continues the run, once there is one (printed on an interrupt)
    from distft.errors import DistftError, StageFailed
    from distft.launch.preflight import PreflightError

    # SIGTERM (a scheduler, `kill`) ends a run like Ctrl-C: workers stopped, checkpoints kept.
    if getattr(args, "verbose", False):
        os.environ["DISTFT_VERBOSE"] = "1"  # launch keeps every line Ray streams (launch/session.py)
    _STOPPING.clear()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return args.func(args)
    except PreflightError as e:
        print(f"error: cannot run {getattr(args, 'config', '')}:\n{e}", file=sys.stderr)
        return e.exit_code
    except DistftError as e:
        print(f"error: {e}", file=sys.stderr)
        if isinstance(e, StageFailed):
            _explain_failure(args, e)
        return e.exit_code
    except FileNotFoundError as e:
        if e.errno is not None and not e.filename:
            raise  # an OS error that names no file is a bug of ours: the traceback says where
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        hint = args.hint.command
        resume = f" (resume with: {hint})" if hint else ""
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}{resume}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        for sig, handler in previous.items():  # in-process callers (tests) get their own handlers back
            signal.signal(sig, handler)


def _explain_failure(args, e) -> None:
    """Below the one-line cause: where the tracebacks are (printed too with --verbose), and how to go on."""
    log = getattr(e, "log_path", None)
    if log:
        if getattr(args, "verbose", False):
            try:
                print(Path(log).read_text(errors="replace"), file=sys.stderr)
            except OSError:
                pass
        print(f"  details  {log} (every rank's traceback{'' if args.verbose else '; or rerun with --verbose'})",
              file=sys.stderr)
    if args.hint.command:
        print(f"  resume   {args.hint.command}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
