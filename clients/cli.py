"""`diffuse`: submit prompts to the daemon and follow its queue from a terminal or a script.

    diffuse "a lighthouse at dusk" --steps 25 --seed 42     submit, wait with a progress bar
    diffuse jobs | show ID | cancel ID|--all | pause | resume | retry ID | watch [ID] | status
    diffuse hotfolder DIR                                   prompt files dropped into DIR become images
    diffuse http [--host H] [--port P]                      A1111's HTTP API, job events and a web page

Exit codes: 0 done, 1 the job failed, 2 bad arguments (or parameters the daemon refused),
3 cancelled, 4 no daemon answers, 5 a wait ran past its --timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .arguments import lora_argument, model_name, path_argument, size_argument
from .client import Client, ClientError, DaemonUnreachable, JobCancelled, JobFailed, RequestFailed, WaitTimeout
from .infotext import job_settings, parse_infotext
from .progress import Progress
from .pngtext import read_text
from .protocol import COMPUTE_UNIT_CHOICES, STATES, Event

EXIT_DONE, EXIT_FAILED, EXIT_USAGE, EXIT_CANCELLED, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4, 5
EXIT_INTERRUPTED = 130
COMMANDS = ("submit", "jobs", "show", "cancel", "pause", "resume", "retry", "watch", "status", "hotfolder", "models",
            "loras", "http")
LORA_HELP = ("apply a LoRA: a name in the daemon's lora_dir (`diffuse loras`) or a .safetensors file, at WEIGHT "
             "(default 1); repeatable. <lora:NAME:WEIGHT> in the prompt does the same")


def _seconds(text: str) -> float:
    """argparse type of a --timeout: refused here, before anything is submitted."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seconds must be a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"seconds must be above 0, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffuse", description="Make images with the local diffusiond daemon.",
        epilog="Exit codes: 0 done, 1 failed, 2 bad arguments, 3 cancelled, 4 no daemon, 5 timed out.",
    )
    parser.add_argument("--runtime-dir", type=Path, help="the daemon's socket folder (default: as the daemon's)")
    parser.add_argument("--connect", default=os.environ.get("DIFFUSIOND_CONNECT"), metavar="tcp://HOST:PORT",
                        help="a daemon on another machine (CurveZMQ; env DIFFUSIOND_CONNECT)")
    parser.add_argument("--server-key", type=Path, default=os.environ.get("DIFFUSIOND_SERVER_KEY"),
                        help="with --connect: the daemon's public key file (env DIFFUSIOND_SERVER_KEY)")
    parser.add_argument("--client-key", type=Path, default=os.environ.get("DIFFUSIOND_CLIENT_KEY"),
                        help="with --connect: this client's secret key file (env DIFFUSIOND_CLIENT_KEY)")
    parser.add_argument("--json", action="store_true", help="machine-readable output: JSON, one object a line")
    commands = parser.add_subparsers(dest="command", required=True)

    submit = commands.add_parser("submit", help="submit a prompt and wait for its images (the default command)")
    submit.add_argument("prompt", nargs="?", help="what to draw (may come from --reuse instead)")
    submit.add_argument("-n", "--negative-prompt")
    submit.add_argument("--steps", type=int)
    submit.add_argument("-g", "--guidance", type=float, dest="guidance_scale", help="CFG scale (default: the model's own, 7.5 for most)")
    submit.add_argument("--seed", type=int)
    submit.add_argument("--size", type=size_argument, help="WIDTHxHEIGHT, multiples of 8")
    submit.add_argument("--aspect", metavar="W:H", help="a shape such as 16:9 instead of --size: the model's "
                        "trained size nearest it (SDXL: its aspect buckets)")
    submit.add_argument("--scheduler", help="a scheduler (`diffusiond generate --help` lists the daemon's) or a sampler "
                        "name such as 'DPM++ 2M Karras'; an unknown one is refused with the list")
    submit.add_argument("-m", "--model", help="a diffusers-format folder or an alias (default: the daemon's)")
    submit.add_argument("--count", type=int, help="images from one generator")
    submit.add_argument("--rng", choices=("numpy", "torch"))
    submit.add_argument("--init-image", type=path_argument, help="img2img: start from this image")
    submit.add_argument("--strength", type=float, help="img2img: how far to move from the init image (0–1]")
    submit.add_argument("--refiner", help="SDXL: a refiner model (folder, alias or Hub id) that runs the last steps")
    submit.add_argument("--refiner-switch", type=float, dest="refiner_switch",
                        help="SDXL with --refiner: the share of the steps the base runs (0–1, default 0.8)")
    submit.add_argument("--lora", type=lora_argument, action="append", metavar="NAME[:WEIGHT]", help=LORA_HELP)
    submit.add_argument("--no-safety-checker", action="store_true")
    submit.add_argument("-o", "--out", type=path_argument, help="folder for the images (default: the daemon's)")
    submit.add_argument("--priority", type=int, help="higher runs first")
    submit.add_argument("--reuse", type=path_argument, metavar="IMAGE.png", help="take every setting, seed included, from an earlier image; flags override")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--timeout", type=_seconds, help="give up waiting after this many seconds (exit 5; the job goes on)")

    jobs = commands.add_parser("jobs", help="the queue and its history, newest first")
    jobs.add_argument("--state", action="append", choices=STATES, help="only these states (repeatable)")
    jobs.add_argument("--limit", type=int, default=20)
    jobs.add_argument("--offset", type=int, default=0)
    commands.add_parser("show", help="one job in full").add_argument("id")
    cancel = commands.add_parser("cancel", help="cancel a job, or every queued job")
    cancel.add_argument("id", nargs="?")
    cancel.add_argument("--all", action="store_true", help="every queued job (running ones go on)")
    commands.add_parser("pause", help="take no new jobs until resume; the running one finishes")
    commands.add_parser("resume", help="take jobs again")
    commands.add_parser("retry", help="queue a failed or cancelled job again").add_argument("id")
    watch = commands.add_parser("watch", help="every event as it happens (Ctrl-C stops)")
    watch.add_argument("id", nargs="?", help="only this job, until it finishes")
    commands.add_parser("status", help="the daemon's version, models and queue")
    commands.add_parser("loras", help="the LoRA files in the daemon's lora_dir: name, family, rank, size, hash")
    models = commands.add_parser("models", help="catalog and local models; pull or remove one")
    models_commands = models.add_subparsers(dest="models_command")
    pull = models_commands.add_parser("pull", help="download a Hub model (org/name[@revision] or a catalog name)")
    pull.add_argument("name")
    pull.add_argument("--compute-units", default="auto",
                      choices=COMPUTE_UNIT_CHOICES,
                      help="Core ML models: the variant these compute units run best")
    pull.add_argument("--timeout", type=_seconds, help="give up waiting after this many seconds (exit 5)")
    models_commands.add_parser("remove", help="delete a downloaded Hub model").add_argument("name")
    hot = commands.add_parser("hotfolder", help="turn .txt prompt files dropped into DIR into images (runs until stopped)")
    hot.add_argument("dir", type=path_argument)
    hot.add_argument("--out", type=path_argument, help="folder for the images (default: DIR/out)")
    hot.add_argument("--lora", type=lora_argument, action="append", metavar="NAME[:WEIGHT]",
                     help="apply this LoRA to every file's job (beside the files' own <lora:…> tags); repeatable")
    hot.add_argument("--settle", type=float, default=1.0,
                     help="seconds a file's size must hold still before it is read, where the OS reports no close")
    http = commands.add_parser("http", help="AUTOMATIC1111's HTTP API, job events (SSE) and a web page (the http extra)")
    http.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs "
                      "--token or --api-auth)")
    http.add_argument("--port", type=int, default=7860, help="port (default 7860, A1111's)")
    http.add_argument("--token", default=os.environ.get("DIFFUSIOND_HTTP_TOKEN"),
                      help="require this bearer token (or as a Basic password) on every request (env DIFFUSIOND_HTTP_TOKEN)")
    http.add_argument("--api-auth", metavar="USER:PASS[,USER:PASS]", help="require HTTP Basic credentials, as A1111's flag")
    http.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                      help="a web origin (https://app.example) allowed to call the API from a browser (repeatable)")
    http.add_argument("--allow-host", action="append", default=[], metavar="NAME",
                      help="a Host name besides localhost and the bind address that requests may use (repeatable)")
    return parser


def _http(args: argparse.Namespace) -> int:
    if args.connect:
        raise ValueError("`diffuse http` serves the daemon on this machine (it reads the images its jobs "
                         "write); run it beside that daemon instead of --connect")
    try:
        from .http_api import serve
    except ImportError as exc:
        raise ValueError(f"`diffuse http` needs the http extra: pip install 'diffusiond[http]' ({exc})") from None
    return serve(args.runtime_dir, args.host, args.port, args.token, args.api_auth, args.cors_origin,
                 args.allow_host)


def _print_json(value: Any) -> None:
    print(json.dumps(value, default=lambda v: v.hex() if isinstance(v, bytes) else str(v)), flush=True)


def _fields(args: argparse.Namespace) -> dict[str, Any]:
    """The job fields of a submit: --reuse's settings first, then the flags given."""
    fields: dict[str, Any] = {}
    if args.reuse:
        parameters = read_text(args.reuse).get("parameters")
        if not parameters:
            raise ValueError(f"{args.reuse} carries no generation settings")
        fields, unknown = job_settings(parse_infotext(parameters))
        if unknown:
            print(f"diffuse: ignoring settings this daemon does not take: {', '.join(unknown)}", file=sys.stderr)
    if args.prompt:
        fields["prompt"] = args.prompt
    if "prompt" not in fields:
        raise ValueError("give a prompt, or --reuse an image")
    for name in ("negative_prompt", "steps", "guidance_scale", "seed", "scheduler", "count", "rng", "strength",
                 "refiner_switch", "priority"):
        if getattr(args, name) is not None:
            fields[name] = getattr(args, name)
    if args.model is not None:
        fields["model"] = model_name(args.model)
    if args.refiner is not None:
        fields["refiner"] = model_name(args.refiner)
    if args.lora:
        fields["loras"] = args.lora
    if args.aspect is not None:  # a reused image's size gives way to it
        fields.pop("width", None)
        fields.pop("height", None)
        fields["aspect"] = args.aspect
    if args.size:
        fields["width"], fields["height"] = args.size
    if args.no_safety_checker:
        fields["safety_checker"] = False
    if args.init_image:
        fields["init_image"] = args.init_image.read_bytes()  # the daemon says when it is not an image
    if args.out:
        fields["output_dir"] = str(args.out.expanduser().resolve())
    return fields


def _submit(client: Client, args: argparse.Namespace) -> int:
    job = client.submit(**_fields(args))
    if args.no_wait:
        _print_json(job) if args.json else print(job["id"])
        return EXIT_DONE
    progress = Progress(quiet=args.json)
    try:
        done = client.wait(job["id"], on_event=progress, timeout=args.timeout)
    except KeyboardInterrupt:
        progress.end()
        # A second Ctrl-C leaves at once; the job's fate is then the daemon's business.
        signal.signal(signal.SIGINT, lambda *_: os._exit(EXIT_INTERRUPTED))
        print(f"diffuse: cancelling job {job['id']} (Ctrl-C again to leave now)", file=sys.stderr, flush=True)
        try:
            client.cancel(job["id"])
        except RequestFailed:
            pass  # it finished in the meantime: the wait below says how
        done = client.wait(job["id"], timeout=60)
    finally:
        progress.end()
    if args.json:
        _print_json(done)
    else:
        for path in done["outputs"]:
            print(path)
        result = done["result"] or {}
        if any(result.get("flagged", [])):
            print("diffuse: some images were blacked out by the safety checker", file=sys.stderr)
        if result.get("prompt_dropped"):
            print(f"diffuse: prompt truncated to 77 tokens; dropped: {result['prompt_dropped']!r}", file=sys.stderr)
    return EXIT_DONE


def _jobs_table(jobs: list[dict[str, Any]]) -> None:
    for job in jobs:
        when = _when(job["created"])
        prompt = job["params"]["prompt"].replace("\n", " ")
        print(f"{job['id']}  {job['state']:<9} {when}  p{job['priority']:<3} {prompt[:60]}")


def _when(epoch: float | None) -> str:
    return "-" if epoch is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(epoch))


def _show(job: dict[str, Any]) -> None:
    """One job for a person: times as local times, settings one a line, the error in words."""
    for key in ("id", "state", "model", "priority", "attempts", "output_dir", "idempotency_key"):
        if job.get(key) is not None:
            print(f"{key:>16}: {job[key]}")
    for key in ("created", "started", "finished"):
        print(f"{key:>16}: {_when(job.get(key))}")
    for path in job.get("outputs") or []:
        print(f"{'output':>16}: {path}")
    if job.get("error"):
        print(f"{'error':>16}: {job['error'].get('message')} ({job['error'].get('code')})")
    print(f"{'settings':>16}:")
    for key, value in {**job.get("params", {}), **(job.get("result") or {})}.items():
        text = value if isinstance(value, str) else json.dumps(value)
        print(f"{key:>16}  {text}".replace("\n", "\n" + " " * 18))


def _describe(event: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(event.get("ts", time.time())))
    kind = event.get("type", "?")
    subject = event.get("job") or event.get("model") or ""
    detail = ""
    if kind == Event.JOB_PROGRESS:
        detail = f"{event['step']}/{event['total']} ETA {event['eta']:.1f}s"
    elif kind == Event.JOB_DONE:
        detail = " ".join(event.get("outputs", []))
    elif kind == Event.JOB_FAILED:
        detail = f"{event.get('code')}: {event.get('message')}"
    elif kind == Event.JOB_RESYNC:
        now = event["state"]["state"]
        detail = f"(events were missed; now {now})" if event.get("missed", True) else f"is {now}"
    if event.get("worker"):
        detail = f"{detail} [worker {event['worker']}]"
    return f"{when} {kind:<16} {subject} {detail}".rstrip()


def _watch(client: Client, args: argparse.Namespace) -> int:
    try:
        for event in client.events(job_id=args.id):
            _print_json(event) if args.json else print(_describe(event), flush=True)
    except KeyboardInterrupt:
        return EXIT_DONE
    if args.id:
        state = client.get(args.id)["state"]
        return {"done": EXIT_DONE, "failed": EXIT_FAILED, "cancelled": EXIT_CANCELLED}.get(state, EXIT_DONE)
    return EXIT_DONE


def _hotfolder(client: Client, args: argparse.Namespace) -> int:
    from .hotfolder import HotFolder, json_line, text_line

    if not args.dir.is_dir():
        raise ValueError(f"{args.dir} is not a folder")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    line = json_line if args.json else text_line

    def report(event: dict[str, Any]) -> None:
        print(line({"ts": time.time(), **event}) if args.json else f"{time.strftime('%H:%M:%S')} {line(event)}", flush=True)

    HotFolder(args.dir, client, args.out, args.settle, report, args.lora or []).run(stop)
    return EXIT_DONE


def _size_text(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


def _models(client: Client, args: argparse.Namespace) -> int:
    if args.models_command == "remove":
        reply = client.call("remove", model=args.name)
        print(f"removed {reply['removed']} ({_size_text(reply['freed'])})")
        return EXIT_DONE
    if args.models_command == "pull":
        return _pull(client, args)
    listing = client.call("models")
    if args.json:
        _print_json(listing)
        return EXIT_DONE
    for model in listing["models"]:
        state = "loaded" if model.get("loaded") else "downloaded" if model.get("downloaded", True) else "not downloaded"
        where = model.get("path") or model.get("repo", "")
        print(f"{model['name']:<24} {model['runtime']:<7} {model.get('variant', ''):<17} {_size_text(model.get('size')):>9}  "
              f"{state:<14} {where}")
    return EXIT_DONE


def _loras(client: Client, args: argparse.Namespace) -> int:
    listing = client.call("models")
    if args.json:
        _print_json({"loras": listing["loras"], "lora_dir": listing["lora_dir"]})
        return EXIT_DONE
    if not listing["loras"]:
        print(f"diffuse: no LoRA files in {listing['lora_dir']}", file=sys.stderr)
    for entry in listing["loras"]:
        if entry.get("error"):
            print(f"{entry['name']:<32} cannot be applied: {entry['error']}")
            continue
        family = {"sd": "SD 1.x/2.x", "sdxl": "SDXL"}.get(entry["family"] or "", "?")
        print(f"{entry['name']:<32} {family:<10} rank {entry['rank']:<4} {_size_text(entry['size']):>9}  {entry['hash']}")
    return EXIT_DONE


def _pull(client: Client, args: argparse.Namespace) -> int:
    """Ask the daemon to pull, then follow its model events with a bar, with a deadline if asked."""
    with client.subscribe([b"model."]) as events:
        name = client.call("pull", model=args.name, compute_units=args.compute_units)["pulling"]
        progress = Progress(quiet=args.json)
        try:
            for event in events.until(None if args.timeout is None else time.monotonic() + args.timeout):
                if event.get("model") != name:
                    continue
                progress(event)
                if event["type"] == Event.MODEL_DOWNLOADED:
                    progress.end()
                    _print_json(event) if args.json else print(event["path"])
                    return EXIT_DONE
                if event["type"] == Event.MODEL_DOWNLOAD_FAILED:
                    progress.end()
                    print(f"diffuse: {event['message']} ({event['code']})", file=sys.stderr)
                    return EXIT_CANCELLED if event["code"] == "cancelled" else EXIT_FAILED
        except KeyboardInterrupt:
            progress.end()
            client.call("cancel", model=args.name)
            print(f"diffuse: cancelled the pull of {args.name}; files that arrived whole are kept", file=sys.stderr)
            return EXIT_CANCELLED
    progress.end()
    raise WaitTimeout(f"the pull of {args.name} goes on after {args.timeout:g}s")


def _run(client: Client, args: argparse.Namespace) -> int:
    if args.command == "submit":
        return _submit(client, args)
    if args.command == "jobs":
        listing = client.jobs(args.state, args.limit, args.offset)
        if args.json:
            _print_json(listing)
        else:
            _jobs_table(listing["jobs"])
            print(", ".join(f"{n} {state}" for state, n in listing["counts"].items()), file=sys.stderr)
        return EXIT_DONE
    if args.command == "show":
        job = client.get(args.id)
        _print_json(job) if args.json else _show(job)
        return EXIT_DONE
    if args.command == "cancel":
        if args.all == bool(args.id):
            raise ValueError("cancel takes a job id or --all")
        if args.all:
            cancelled = client.cancel_all_queued()
        else:
            reply = client.call("cancel", job=args.id)
            cancelled = [reply["job"]["id"]]
            if reply.get("pending"):  # a running job: when it will really stop
                print(f"diffuse: {reply['message']}", file=sys.stderr)
        if args.json:
            _print_json({"cancelled": cancelled})
        else:
            for job_id in cancelled:
                print(job_id)
            if args.all:
                print(f"diffuse: cancelled {len(cancelled)} queued job{'s' * (len(cancelled) != 1)}"
                      f"{'' if cancelled else ' (none was queued)'}; a running job goes on", file=sys.stderr)
        return EXIT_DONE
    if args.command in ("pause", "resume"):
        getattr(client, args.command)()
        return EXIT_DONE
    if args.command == "retry":
        job = client.retry(args.id)
        _print_json(job) if args.json else print(job["id"])
        return EXIT_DONE
    if args.command == "watch":
        return _watch(client, args)
    if args.command == "hotfolder":
        return _hotfolder(client, args)
    if args.command == "models":
        return _models(client, args)
    if args.command == "http":
        return _http(args)
    if args.command == "loras":
        return _loras(client, args)
    status = client.ping()
    if args.json:
        _print_json(status)
    else:
        loaded = ", ".join(status["models"]["loaded"]) or "none"
        loading = f" (loading {status['models']['loading']})" if status["models"]["loading"] else ""
        queue = ", ".join(f"{n} {state}" for state, n in status["queue"].items())
        print(f"diffusiond {status['version']} (pid {status['pid']}), {'ready' if status['ready'] else 'starting'}")
        print(f"models: {loaded}{loading}")
        print(f"queue: {queue}{' — paused' if status['paused'] else ''}")
        for worker in status.get("workers", []):
            print(f"remote worker {worker['name']}: {'running ' + worker['job'] if worker['job'] else 'idle'}")
    return EXIT_DONE


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `diffuse "a prompt" …` means `diffuse submit "a prompt" …`: the common case needs no command
    # word (a prompt that is itself a command word needs `diffuse submit`).
    at = 0
    while at < len(argv) and argv[at] in ("--json", "--runtime-dir", "--connect", "--server-key", "--client-key"):
        at += 1 if argv[at] == "--json" else 2
    if at < len(argv) and argv[at] not in (*COMMANDS, "-h", "--help"):
        argv.insert(at, "submit")
    args = _parser().parse_args(argv)
    try:
        client = Client(args.runtime_dir, connect=args.connect, server_key=args.server_key, client_key=args.client_key)
    except (ClientError, OSError, ValueError) as exc:
        print(f"diffuse: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        code = _run(client, args)
        sys.stdout.flush()  # here, where a closed pipe is caught
        return code
    except BrokenPipeError:
        # The reader went away (`diffuse show ID | head`): what it wanted it has; no traceback
        # now, and none when Python flushes stdout at exit.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_DONE
    except DaemonUnreachable as exc:
        print(f"diffuse: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except RequestFailed as exc:
        print(f"diffuse: {exc.message} ({exc.code})", file=sys.stderr)
        return EXIT_USAGE if exc.code in ("invalid_parameter", "bad_message", "model_not_found", "not_found", "invalid_state") else EXIT_FAILED
    except JobFailed as exc:
        print(f"diffuse: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except JobCancelled as exc:
        print(f"diffuse: {exc}", file=sys.stderr)
        return EXIT_CANCELLED
    except WaitTimeout as exc:
        print(f"diffuse: {exc} (it goes on in the daemon; `diffuse show ID` tells how it ends)", file=sys.stderr)
        return EXIT_TIMEOUT
    except (ValueError, OSError) as exc:
        print(f"diffuse: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ClientError as exc:
        print(f"diffuse: {exc}", file=sys.stderr)
        return EXIT_FAILED
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(main())
