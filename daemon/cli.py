"""`diffusiond`: the daemon's command line: `serve` runs the daemon, `generate` the engine once in-process."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

from diffusiond.clients.arguments import lora_argument, model_name, path_argument, size_argument
from diffusiond.clients.progress import Progress
from diffusiond.clients.protocol import COMPUTE_UNIT_CHOICES, COMPUTE_UNITS, Code, Event

from .config import STOP_GRACE, Limits
from .engine import schedulers
from .errors import EngineError
from .models.coreml_folder import PARTS
from .models.lora import LoraFile

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffusiond", description="Local text-to-image daemon.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the daemon in the foreground (launchd and systemd run this)")
    start = commands.add_parser("start", help="run the daemon in the background and wait until it is ready")
    stop = commands.add_parser("stop", help="stop a running daemon (its running job goes back to the queue)")
    for command in (serve, start, stop):
        command.add_argument("--config", type=Path, help="TOML config (default: the platform's usual place)")
    start.add_argument("--timeout", type=float, default=300, help="seconds to wait for the model to be warm")
    install = commands.add_parser("install", help="start the daemon at login (LaunchAgent on macOS, systemd --user on Linux)")
    install.add_argument("--hotfolder", type=Path, metavar="DIR", help="also run a hot folder on DIR at login")
    install.add_argument("--config", type=Path, help="the config the service runs with")
    install.add_argument("--http", action="store_true",
                         help="also run `diffuse http` (A1111's API and a web page) at login, after the daemon")
    install.add_argument("--http-host", default="127.0.0.1", metavar="HOST",
                         help="with --http: the address to bind (default 127.0.0.1; any other needs --http-token)")
    install.add_argument("--http-port", type=int, default=7860, metavar="PORT", help="with --http: the port (default 7860)")
    install.add_argument("--http-token", default=os.environ.get("DIFFUSIOND_HTTP_TOKEN"), metavar="TOKEN",
                         help="with --http: require this token on every request; kept in the service's environment, "
                              "its file readable by you alone (env DIFFUSIOND_HTTP_TOKEN)")
    install.add_argument("--connect", metavar="tcp://HOST:PORT",
                         help="run a remote worker for the daemon there at login, instead of a daemon here")
    install.add_argument("--server-key", type=Path, help="with --connect: the daemon's server.key")
    install.add_argument("--worker-key", type=Path, help="with --connect: this worker's NAME.key_secret")
    install.add_argument("--name", help="with --connect: the worker's name in the daemon's events")
    keys = commands.add_parser("keys", help="make the CurveZMQ keys for TCP access (the server's, and a client's)")
    keys.add_argument("--client", metavar="NAME", help="also make a key pair for this client and allow it")
    keys.add_argument("--worker", metavar="NAME", help="also make a key pair for this remote worker and allow it")
    keys.add_argument("--config", type=Path, help="TOML config (default: the platform's usual place)")
    worker = commands.add_parser("worker", help="add this machine's capacity to a daemon on another machine")
    worker.add_argument("--connect", required=True, metavar="tcp://HOST:PORT", help="the daemon's tcp address")
    worker.add_argument("--server-key", type=Path, required=True, help="the daemon's server.key")
    worker.add_argument("--worker-key", type=Path, required=True, help="this worker's NAME.key_secret")
    worker.add_argument("--name", help="shown in the daemon's events (default: this host's name)")
    worker.add_argument("--config", type=Path, help="this machine's config: device, max_loaded, limits")
    commands.add_parser("uninstall", help="stop the login services and remove them")
    commands.add_parser("service-status", help="whether each login service is loaded and running, and its logs")
    gen = commands.add_parser("generate", help="make images in this process (no daemon) and write PNGs")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--out", type=path_argument, default=Path("image.png"), help="PNG path; more images get -2, -3 …")
    gen.add_argument("-m", "--model", type=model_name, default="shapes",
                     help="diffusers-format folder, or a shipped model: 'shapes' (draws shapes), 'tiny' (noise)")
    gen.add_argument("-n", "--negative-prompt", default="")
    gen.add_argument("--steps", type=int, default=25, help=f"1–{Limits.steps}")
    gen.add_argument("-g", "--guidance", type=float,
                     help="CFG scale (default: the model's own, 7.5 for most); ≤ 1 skips the unconditional pass")
    gen.add_argument("--size", type=size_argument, help="WIDTHxHEIGHT, multiples of 8 (default: the model's size)")
    gen.add_argument("--aspect", metavar="W:H", help="a shape such as 16:9 instead of --size: the model's "
                     "trained size nearest it (SDXL: its aspect buckets)")
    gen.add_argument("--seed", type=int, help="default: random, written into the PNG")
    gen.add_argument("--scheduler", default="dpmpp_2m", choices=schedulers.NAMES)
    gen.add_argument("--count", type=int, default=1, help=f"images from one generator, 1–{Limits.count}")
    gen.add_argument("--rng", default="numpy", choices=("numpy", "torch"),
                     help="numpy: Apple/Diffusers for Mac seeds; torch: diffusers' CPU generator seeds")
    gen.add_argument("--init-image", type=path_argument, help="img2img: start from this image")
    gen.add_argument("--strength", type=float, default=0.75, help="img2img: how much to change the init image (0–1]")
    gen.add_argument("--refiner", type=model_name, help="SDXL: a refiner model that runs the last steps")
    gen.add_argument("--refiner-switch", type=float, default=0.8, help="with --refiner: the share of the steps the base runs")
    gen.add_argument("--lora", type=lora_argument, action="append", default=[], metavar="NAME[:WEIGHT]",
                     help="apply a LoRA (a name in the config's lora_dir, or a file); repeatable; <lora:NAME:WEIGHT> "
                          "in the prompt works too")
    gen.add_argument("--no-safety-checker", action="store_true", help="skip the model's safety checker")
    gen.add_argument("--device", default="auto", help="auto (cuda, mps, cpu), or a torch device")
    gen.add_argument("--compute-units", default="auto", choices=COMPUTE_UNIT_CHOICES,
                     help="Core ML models: where they run")
    convert = commands.add_parser("convert", help="turn a diffusers-format model into Core ML models in Apple's layout "
                                  "(on macOS also compiled into Resources/ for Apple's Swift CLI)")
    convert.add_argument("source", type=model_name, help="a diffusers-format folder or Hub repo (org/name)")
    convert.add_argument("--out", type=Path, required=True, metavar="DIR", help="the folder for the Core ML models")
    convert.add_argument("--attention", default="split_einsum", choices=("original", "split_einsum"),
                         help="split_einsum: the Neural Engine's; original: the GPU's")
    convert.add_argument("--resolution", type=_resolution, metavar="WIDTHxHEIGHT",
                         help="the one image size the models take, e.g. 512x768, or 512 for square (default: the model's own)")
    convert.add_argument("--palettize", action="store_true", help="6-bit palettized weights (smaller, as Apple's -6bit)")
    convert.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="convert only these networks")
    convert.add_argument("--refiner", type=model_name, metavar="SOURCE",
                         help="an SDXL refiner whose Unet goes beside the SDXL base's (UnetRefiner, as Apple's base-with-refiner)")
    convert.add_argument("--lora", type=lora_argument, action="append", default=[], metavar="FILE[:WEIGHT]",
                         help="merge this LoRA (a file, a name in the config's lora_dir, or ORG/REPO/FILE.safetensors) "
                              "into the weights first; repeatable. Jobs with exactly these LoRAs then run on the result")
    bench = commands.add_parser("bench", help="time each Core ML compute-unit option; `auto` uses the fastest from then on")
    bench.add_argument("-m", "--model", help="a Core ML model (default: the config's model)")
    bench.add_argument("--compute-units", nargs="+", choices=COMPUTE_UNITS, default=list(COMPUTE_UNITS))
    bench.add_argument("--steps", type=int, default=20)
    bench.add_argument("--runs", type=int, default=2, help="timed images per option, after one to warm up")
    bench.add_argument("--config", type=Path, help="TOML config (default: the platform's usual place)")
    return parser


def _generate(args: argparse.Namespace) -> int:
    from PIL import Image

    from .config import load
    from .engine.pipeline import Pipeline, Request, resolve
    from .errors import InvalidParameter
    from .engine.png import save_result
    from .engine.runtimes import open_runtime
    from .models.diffusers_folder import ModelFolder

    width, height = args.size or (None, None)
    init_image = None
    if args.init_image:
        try:
            init_image = Image.open(args.init_image)
        except Image.UnidentifiedImageError:
            raise InvalidParameter("init_image", f"{args.init_image} is not an image PIL can read; give a PNG, JPEG or WebP file") from None
    request = Request(
        prompt=args.prompt, negative_prompt=args.negative_prompt, steps=args.steps,
        guidance_scale=args.guidance, width=width, height=height, aspect=args.aspect, count=args.count, seed=args.seed,
        scheduler=args.scheduler, rng=args.rng, init_image=init_image, strength=args.strength,
        safety_checker=not args.no_safety_checker, refiner=args.refiner, refiner_switch=args.refiner_switch,
        loras=tuple((lora["name"], lora["weight"]) for lora in args.lora),
    )
    model = ModelFolder.open(args.model)
    refiner = ModelFolder.open(args.refiner) if args.refiner else None
    config = load()
    resolve(request, model, refiner=refiner, lora_dir=config.lora_dir)  # every refusal before the seconds a load takes
    print(f"loading {args.model} …", file=sys.stderr, flush=True)
    # The model's own runtime, and one image: compiling or capturing graphs would not pay.
    settings = replace(config, runtime=model.runtime, device=args.device, compute_units=args.compute_units,
                       compile="off", cuda_graphs="off")
    runtime = open_runtime(model, settings, model.has_safety_checker and request.safety_checker)
    pipeline = Pipeline(model, runtime, lora_dir=config.lora_dir)
    second = None if refiner is None else Pipeline(refiner, open_runtime(refiner, settings, False))
    progress, started = Progress(), time.monotonic()

    def on_step(step: int, total: int, _latents: object) -> None:
        eta = (time.monotonic() - started) / step * (total - step)
        progress({"type": Event.JOB_PROGRESS, "step": step, "total": total, "eta": eta})

    try:
        result = pipeline.generate(request, on_step=on_step, refiner=second)
    finally:
        progress.end()
    if result.dropped_prompt:
        print(f"prompt truncated to 77 tokens; dropped: {result.dropped_prompt!r}", file=sys.stderr)
    for path, flagged in zip(save_result(result, args.model, args.out), result.flagged):
        print(f"{path}{'  (blacked out by the safety checker)' if flagged else ''}")
    print(f"seed {result.request.seed}, {result.timings['total']:.2f}s", file=sys.stderr)
    return EXIT_OK


def _serve(args: argparse.Namespace) -> int:
    import logging

    import zmq

    from . import config
    from .service.remote import RemoteError
    from .service.server import Server
    from .service.sockets import RuntimeDirError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = config.load(args.config)
        return Server(settings).serve()
    except (ValueError, RuntimeDirError, RemoteError, zmq.ZMQError) as exc:
        print(f"diffusiond: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _start(args: argparse.Namespace) -> int:
    """Like `pg_ctl start -w`: detach a `serve`, then wait, with a deadline, until it is warm."""
    import subprocess

    from diffusiond.clients import Client, DaemonUnreachable

    from . import config

    settings = config.load(args.config)
    with Client(settings.runtime_dir, timeout=2) as client:
        try:
            status = client.ping()
            print(f"diffusiond is running already (pid {status['pid']})", file=sys.stderr)
            return EXIT_OK
        except DaemonUnreachable:
            pass
        settings.state_dir.mkdir(parents=True, exist_ok=True)
        log = settings.state_dir / "diffusiond.log"
        command = [sys.executable, "-m", "diffusiond.daemon.cli", "serve"]
        if args.config:
            command += ["--config", str(args.config)]
        with open(log, "ab") as output:
            process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=output, stderr=output, start_new_session=True)
        print(f"starting diffusiond (pid {process.pid}, log {log}) …", file=sys.stderr, flush=True)
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-5:]
                print("diffusiond exited while starting:\n  " + "\n  ".join(tail), file=sys.stderr)
                return EXIT_FAILED
            try:
                if client.ping()["ready"]:
                    print(f"diffusiond ready (pid {process.pid})", file=sys.stderr)
                    return EXIT_OK
            except DaemonUnreachable:
                pass
            time.sleep(0.2)
        print(f"diffusiond is not ready after {args.timeout:g}s; see {log}", file=sys.stderr)
        return EXIT_FAILED


def _stop(args: argparse.Namespace) -> int:
    from diffusiond.clients import Client, DaemonUnreachable

    from . import config
    from .service.sockets import lock_held

    settings = config.load(args.config)
    with Client(settings.runtime_dir, timeout=5) as client:
        try:
            pid = client.ping()["pid"]
            client.call("shutdown")
        except DaemonUnreachable:
            print("no diffusiond is running", file=sys.stderr)
            return EXIT_OK
    print(f"stopping diffusiond (pid {pid}): a running job goes back to the queue. A model call under way cannot "
          f"be interrupted; the daemon waits {STOP_GRACE:g}s for it, then leaves it and exits", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if not lock_held(settings.runtime_dir):
            print(f"diffusiond (pid {pid}) stopped", file=sys.stderr)
            return EXIT_OK
        time.sleep(0.1)
    print(f"diffusiond (pid {pid}) is still running after 60s", file=sys.stderr)
    return EXIT_FAILED


def _install(args: argparse.Namespace) -> int:
    import subprocess

    from .service import login_service

    if args.hotfolder is not None and not args.hotfolder.is_dir():
        print(f"diffusiond: {args.hotfolder} is not a folder", file=sys.stderr)
        return EXIT_USAGE
    if args.connect:
        missing = [flag for flag, value in (("--server-key", args.server_key), ("--worker-key", args.worker_key))
                   if value is None or not value.is_file()]
        if missing:
            print(f"diffusiond: a worker needs {' and '.join(missing)}: the key files `diffusiond keys --worker NAME` "
                  "made on the daemon's machine", file=sys.stderr)
            return EXIT_USAGE
        for flag, given in (("--hotfolder", args.hotfolder is not None), ("--http", args.http)):
            if given:
                print(f"diffusiond: {flag} goes with the daemon's install, not a worker's", file=sys.stderr)
                return EXIT_USAGE
        wanted = [login_service.worker_service(args.connect, args.server_key, args.worker_key, args.name, args.config)]
    else:
        wanted = login_service.services(args.config, args.hotfolder)
        if args.http:
            from diffusiond.clients.protocol import default_runtime_dir

            from .config import load

            # `diffuse http` has no --config: a runtime folder the config names is passed on; the default
            # one the service works out at its start, as the daemon does (with the service manager's
            # XDG_RUNTIME_DIR, not this shell's).
            try:
                configured = load(args.config).runtime_dir
            except ValueError as exc:
                print(f"diffusiond: {exc}", file=sys.stderr)
                return EXIT_USAGE
            runtime_dir = None if configured == default_runtime_dir() else configured
            wanted.append(login_service.http_service(args.http_host, args.http_port, args.http_token, runtime_dir))
    manager = login_service.manager()
    try:
        paths = login_service.install(wanted, manager)
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = getattr(exc, "stderr", "") or ""
        print(f"diffusiond: installing failed: {exc} {detail.strip()}", file=sys.stderr)
        return EXIT_FAILED
    for path in paths:
        print(f"installed {path}")
    if manager == "systemd":
        print("to keep it running after you log out: loginctl enable-linger", file=sys.stderr)
    return EXIT_OK


def _keys(args: argparse.Namespace) -> int:
    from . import config
    from .service.remote import make_keys

    settings = config.load(args.config)
    for path in make_keys(settings.keys_dir, args.client, args.worker):
        print(path)
    for peer in (args.client, args.worker):
        if peer:
            print(f"give {peer} {settings.keys_dir / peer}.key_secret and {settings.keys_dir}/server.key",
                  file=sys.stderr)
    return EXIT_OK


def _worker(args: argparse.Namespace) -> int:
    import logging

    from . import config
    from .service.remote_worker import RemoteWorker

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        worker = RemoteWorker(config.load(args.config), args.connect, args.server_key, args.worker_key, args.name)
    except ValueError as exc:
        print(f"diffusiond: {exc}", file=sys.stderr)
        return EXIT_USAGE
    return worker.run()


def _uninstall(args: argparse.Namespace) -> int:
    from .service import login_service

    for path in login_service.uninstall(login_service.manager()):
        print(f"removed {path}")
    return EXIT_OK


def _service_status(args: argparse.Namespace) -> int:
    from .service import login_service

    for row in login_service.status(login_service.manager()):
        print(f"{row['service']}: installed {row['installed']}, loaded {row['loaded']}, {row['state']}, "
              f"pid {row['pid']}; logs: {row['logs']}")
    return EXIT_OK


def _resolution(text: str) -> tuple[int, int]:
    """A Core ML model's fixed size: WIDTHxHEIGHT, or one number for a square."""
    return (int(text), int(text)) if text.isdigit() else size_argument(text)


def _lora_file(name: str) -> LoraFile:
    """A --lora name's file (a Hub one fetched into the cache first), read and checked."""
    from .config import load
    from .models import lora, store

    folder = load().lora_dir
    try:
        path = lora.find(name, folder)
    except lora.LoraNotDownloaded as missing:
        path = store.pull_file(name, missing.repo, missing.file, lambda state: None)
    return lora.inspect(path, name)


def _convert(args: argparse.Namespace) -> int:
    try:
        from .coreml.converter import convert
    except ImportError as exc:
        print(f"diffusiond: converting needs torch, diffusers and coremltools ({exc}): "
              "pip install 'diffusiond[convert]'", file=sys.stderr)
        return EXIT_FAILED
    started = time.monotonic()
    loras = [(_lora_file(entry["name"]), entry["weight"]) for entry in args.lora]
    out = convert(args.source, args.out, args.attention, args.resolution, args.palettize,
                  lambda line: print(line, file=sys.stderr, flush=True), tuple(args.parts), args.refiner, loras)
    print(out)
    print(f"converted in {time.monotonic() - started:.0f}s; on a Mac: diffusiond generate -m {out} \"…\"",
          file=sys.stderr)
    return EXIT_OK


def _bench(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from .config import load
    from .coreml import compute_units
    from .coreml.compute_bench import measure, table
    from .coreml.hardware import this_machine
    from .engine.pipeline import Pipeline, Request
    from .engine.runtimes.coreml_runtime import CoreMLRuntime
    from .models.coreml_folder import CoreMLFolder
    from .models.diffusers_folder import ModelFolder

    settings = load(args.config)
    name = args.model or settings.model
    model = ModelFolder.open(name)
    if not isinstance(model, CoreMLFolder):
        print(f"diffusiond: bench times Core ML compute units and {name} is a diffusers-format model; "
              f"convert it first: diffusiond convert {model.path} --out DIR", file=sys.stderr)
        return EXIT_USAGE
    request = Request("a photo of an astronaut riding a horse on mars", steps=args.steps, seed=42, safety_checker=False)
    machine = this_machine()
    timings = measure(lambda units: Pipeline(model, CoreMLRuntime(model, units)), args.compute_units, request,
                      args.runs, lambda line: print(line, file=sys.stderr, flush=True))
    print(table(machine, name, timings))
    best = timings[0]
    compute_units.record(settings.state_dir, machine, name, best.compute_units, best.seconds_per_image,
                         datetime.now(timezone.utc).isoformat(timespec="seconds"))
    print(f"auto now runs {name} on {best.compute_units} on this machine", file=sys.stderr)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    commands = {
        "serve": _serve, "start": _start, "stop": _stop, "generate": _generate,
        "install": _install, "uninstall": _uninstall, "service-status": _service_status, "keys": _keys,
        "worker": _worker, "convert": _convert, "bench": _bench,
    }
    try:
        return commands[args.command](args)
    except EngineError as exc:
        print(f"diffusiond: {exc}", file=sys.stderr)
        return EXIT_USAGE if exc.code in (Code.INVALID_PARAMETER, Code.MODEL_NOT_FOUND) else EXIT_FAILED
    except OSError as exc:
        print(f"diffusiond: {exc}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
