"""Evaluation sweeps as Ray tasks: rows x models x context lengths, merged into one JSON and one
table.

    python -m visikv.sweep SPEC.json [--out sweep.json] [--workers N] [--address ADDR]

SPEC is a JSON file:

    {
      "models": ["default", "models/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"],
      "contexts": [1024, 4096],          # optional: one task per length, given as --window
      "context_flag": "window",          # optional: the flag the length goes to
      "rows": [                          # one evaluation command each (visikv.evaluate)
        {"command": "ppl", "options": {"tokens": 4096}},
        {"command": "ppl", "options": {"tokens": 4096, "keys": "int2:g64:tok"}},
        {"command": "eval sparse-ppl", "options": {"tokens": 2048}, "context_flag": "window"}
      ],
      "threads": 1,                      # optional: worker threads per task (--threads)
      "out": "sweep.json"                # optional: --out overrides
    }

Every task runs one command line in a Ray worker (a local Ray with --workers CPUs by default, an
existing cluster with --address, where the models and texts must be at the same paths on every
node). The output JSON is rewritten (atomically) as each task finishes; a task whose result is
already in it is not run again, so an interrupted sweep resumes where it stopped; a task that
fails is listed under "failed" (with the engine's message) and run again next time. The table goes to
standard output and, as Markdown, beside the JSON (OUT with .md).
"""

import argparse
import json
import os
import pathlib
import sys
import time

import visikv


def _task_key(task):
    return json.dumps(
        {"model": task["model"], "command": task["command"], "options": task["options"]},
        sort_keys=True,
    )


def expand(spec):
    """The tasks of a spec: every row on every model at every context length."""
    for field in ("models", "rows"):
        if not isinstance(spec.get(field), list) or not spec[field]:
            raise ValueError(f"sweep spec: '{field}' must be a non-empty list")
    contexts = spec.get("contexts") or [None]
    tasks = []
    for model in spec["models"]:
        for index, row in enumerate(spec["rows"]):
            if not isinstance(row, dict) or not isinstance(row.get("command"), str):
                raise ValueError(f"sweep spec: row {index} needs a 'command' string")
            unknown = set(row) - {"command", "options", "context_flag"}
            if unknown:
                raise ValueError(f"sweep spec: row {index} has unknown fields {sorted(unknown)}")
            flag = row.get("context_flag", spec.get("context_flag", "window"))
            for context in contexts:
                options = dict(row.get("options", {}))
                if context is not None:
                    options[flag] = context
                if "threads" in spec:
                    options["threads"] = spec["threads"]
                task = {"model": str(model), "command": row["command"], "options": options}
                task["key"] = _task_key(task)
                tasks.append(task)
    return tasks


def run_task(task, cwd):
    """One command line (in a Ray worker): its JSON, its time and where it ran."""
    os.chdir(cwd)
    options = dict(task["options"])
    threads = options.pop("threads", None)
    words = task["command"].split() + [task["model"]]
    for name, value in options.items():
        words += visikv._flag_words(name, value)
    if threads is not None:
        words = ["--threads", str(threads)] + words
    started = time.monotonic()
    outcome = {**task, "host": os.uname().nodename}
    try:
        outcome["result"] = visikv.run(*words)
    except visikv.Error as error:
        # Reported, and run again by the next sweep over the same file.
        outcome["error"] = str(error)
    outcome["seconds"] = time.monotonic() - started
    return outcome


def _write_atomically(path, document):
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(document, indent=1) + "\n")
    os.replace(temporary, path)


def _headline(result):
    """The figure a row is read by: perplexity where the command reports one."""
    if isinstance(result, dict):
        for name in ("ppl", "nll", "accuracy", "survival"):
            if isinstance(result.get(name), (int, float)):
                return f"{name} {result[name]:.4f}"
    return ""


def table(results):
    lines = [
        "| model | command | options | result | seconds |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in results:
        options = " ".join(f"{k}={v}" for k, v in sorted(r["options"].items()))
        lines.append(
            f"| {r['model']} | {r['command']} | {options} | {_headline(r['result'])} "
            f"| {r['seconds']:.1f} |"
        )
    return "\n".join(lines)


def sweep(spec, out, workers=None, address=None):
    """Runs the tasks of `spec` not yet in `out`; returns (results, how many ran now, the failed
    ones)."""
    import ray

    tasks = expand(spec)
    out = pathlib.Path(out)
    done = {}
    if out.exists():
        try:
            previous = json.loads(out.read_text())
            done = {r["key"]: r for r in previous["results"]}
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{out}: not a sweep result file ({error})") from None
    todo = [t for t in tasks if t["key"] not in done]
    print(f"sweep: {len(tasks)} tasks, {len(tasks) - len(todo)} already in {out}", file=sys.stderr)

    failed = []

    def document():
        order = {t["key"]: i for i, t in enumerate(tasks)}
        results = sorted(done.values(), key=lambda r: order.get(r["key"], len(order)))
        return {"spec": spec, "results": results, "failed": failed}

    if todo:
        if address:
            ray.init(address=address)
        else:
            ray.init(num_cpus=workers or os.cpu_count(), include_dashboard=False)
        try:
            remote = ray.remote(num_cpus=1)(run_task)
            cwd = os.getcwd()
            pending = [remote.remote(t, cwd) for t in todo]
            started = time.monotonic()
            while pending:
                finished, pending = ray.wait(pending, num_returns=1)
                result = ray.get(finished[0])
                if "error" in result:
                    failed.append(result)
                    print(f"sweep: failed: {result['command']} on {result['model']}: "
                          f"{result['error']}", file=sys.stderr)
                else:
                    done[result["key"]] = result
                _write_atomically(out, document())
                count = len(todo) - len(pending)
                elapsed = time.monotonic() - started
                eta = elapsed / count * len(pending)
                print(
                    f"sweep: {count}/{len(todo)} done ({result['command']} on {result['model']}, "
                    f"{result['seconds']:.1f} s), ETA {eta:.0f} s",
                    file=sys.stderr,
                )
        finally:
            ray.shutdown()
    final = document()
    _write_atomically(out, final)
    return final["results"], len(todo), failed


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m visikv.sweep", description=__doc__.split("\n")[0])
    parser.add_argument("spec", help="the sweep's JSON spec")
    parser.add_argument("--out", help="result JSON (default: the spec's 'out', else sweep.json)")
    parser.add_argument("--workers", type=int, help="CPUs of the local Ray (default: all)")
    parser.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    args = parser.parse_args(argv)
    try:
        spec = json.loads(pathlib.Path(args.spec).read_text())
        out = args.out or spec.get("out") or "sweep.json"
        results, ran, failed = sweep(spec, out, workers=args.workers, address=args.address)
    except (OSError, ValueError, visikv.Error) as error:
        print(f"visikv.sweep: error: {error}", file=sys.stderr)
        return 1
    markdown = table(results)
    print(markdown)
    pathlib.Path(out).with_suffix(".md").write_text(markdown + "\n")
    print(f"sweep: ran {ran} tasks; {len(results)} results in {out}, {len(failed)} failed",
          file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
