"""`tunnelvision serve | up | keys | predict | tunnel | doctor | models`. Every Settings field is a
serve (and up) flag."""

# This module imports nothing heavy: on a base install (`pip install tunnelvision`, no torch) the
# client commands work and the server commands (serve, up, models random) say what to install.

from __future__ import annotations

import argparse
import functools
import importlib.util
import logging
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from pydantic import ValidationError
from pydantic.fields import FieldInfo
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, SettingsError

from tunnelvision import __version__
from tunnelvision.config import Settings
from tunnelvision.models.family_names import RANDOM_FAMILIES
from tunnelvision.security.keys import DEFAULT_SCOPES, SCOPES, KeyCommandError, KeyStore, parse_scopes

log = logging.getLogger("tunnelvision")

# What `pip install 'tunnelvision[server]'` adds (import names). A base install has none of them.
SERVER_MODULES = (
    "torch",
    "transformers",
    "safetensors",
    "scipy",
    "fastapi",
    "fastapi_offline",
    "uvicorn",
    "python_multipart",
    "jwt",
    "prometheus_client",
)
SERVER_INSTALL = "pip install 'tunnelvision[server]'"
Handler = Callable[[argparse.Namespace], int]


def missing_server_modules() -> list[str]:
    """The server's packages that are not installed (found without importing them)."""
    return [name for name in SERVER_MODULES if importlib.util.find_spec(name) is None]


def needs_server(handler: Handler) -> Handler:
    """A command that runs the models or the web server: on a base install, say what to install
    instead of failing on an import halfway through."""

    @functools.wraps(handler)
    def checked(args: argparse.Namespace) -> int:
        missing = missing_server_modules()
        if missing:
            # A base install lacks them all; a broken one is told which.
            which = "" if len(missing) == len(SERVER_MODULES) else f" ({', '.join(missing)} missing)"
            print(
                f"tunnelvision {command_words(args)}: this needs the server{which}: {SERVER_INSTALL}",
                file=sys.stderr,
            )
            return 1
        return handler(args)

    return checked


def command_words(args: argparse.Namespace) -> str:
    """`serve`, `models random`: the command as typed."""
    words = [args.command, getattr(args, f"{args.command}_command", None)]
    return " ".join(word for word in words if word)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(build_parser(), argv)
    handler: Any = args.handler
    try:
        code = int(handler(args))
        sys.stdout.flush()  # here, not at exit, so a closed pipe is caught below
    except KeyCommandError as exc:  # a keys file that cannot be used, a name taken: a message
        print(f"tunnelvision {command_words(args)}: {exc}", file=sys.stderr)
        return 1
    except (ValidationError, SettingsError) as exc:  # a bad TUNNELVISION_* variable, in any command
        print(settings_problem(exc, args), file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (`tunnelvision doctor --json | head -1`): stop quietly, as Unix
        # tools do. Point stdout at /dev/null so the interpreter's final flush cannot fail too.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    return code


class Parser(argparse.ArgumentParser):
    """Says an error in three lines: the command's usage, the problem, where its help is (the
    full usage of `serve` is some 20 lines, which buried the message)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.short_usage()}\n{self.prog}: error: {message}\nsee `{self.prog} --help`\n")

    def short_usage(self) -> str:
        usage = self.format_usage().strip()
        if "\n" not in usage:
            return usage
        # Too long for a line: what must be typed (positionals, required flags); the rest is [options].
        needed = [action for action in self._actions if action.required or not action.option_strings]
        formatter = self._get_formatter()
        formatter.add_usage(None, needed, [], prefix="")
        words = formatter.format_help().strip().removeprefix(self.prog)
        return f"usage: {self.prog} [options]{words}"


def parse_arguments(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    args, extras = parser.parse_known_args(argv)
    if extras:  # said by the command they were given to, with its usage (argparse: by the top one)
        chosen_parser(parser, args).error(f"unrecognized arguments: {' '.join(extras)}")
    return args


def chosen_parser(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.ArgumentParser:
    """The parser of the (sub)command that `args` ran, e.g. `keys add`'s."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            name = getattr(args, action.dest, None)
            if name in action.choices:
                return chosen_parser(action.choices[name], args)
    return parser


def name_subcommands(parser: argparse.ArgumentParser) -> None:
    """`the following arguments are required: {add,list,revoke}`, not the internal `keys_command`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.metavar = "{" + ",".join(action.choices) + "}"
            for subparser in action.choices.values():
                name_subcommands(subparser)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="tunnelvision", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tunnelvision {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="serve the HTTP API", description="Flags override TUNNELVISION_* environment variables."
    )
    add_settings_flags(serve)
    serve.set_defaults(handler=run_serve)

    up = commands.add_parser(
        "up",
        help="serve, create the first key if there is none, and publish it on a quick tunnel",
        description="`tunnelvision serve` (every serve flag works here) plus a *.trycloudflare.com "
        "URL. Never open: without authentication nothing is published. Ctrl-C stops both.",
    )
    add_settings_flags(up)
    up.set_defaults(handler=run_up)

    models = commands.add_parser("models", help="model utilities")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    random = model_commands.add_parser("random", help="write random-weight checkpoints")
    random.add_argument(
        "out", type=Path, help="folder; gets detector/ and segmenter/, or one checkpoint with --family"
    )
    random.add_argument(
        "--family",
        choices=RANDOM_FAMILIES,
        help="write one checkpoint of this family into OUT",
    )
    random.add_argument(
        "--size",
        choices=["tiny", "full"],
        default="tiny",
        help="tiny: tests and demos; full: default architectures, for benchmarks",
    )
    random.add_argument("--seed", type=int, default=0)
    random.set_defaults(handler=run_models_random)
    add_models_reload_command(model_commands)

    add_keys_commands(commands)
    add_predict_command(commands)
    add_tunnel_commands(commands)
    add_doctor_command(commands)
    name_subcommands(parser)
    return parser


KEYS_FILE_HELP = "default: TUNNELVISION_KEYS_FILE or ~/.config/tunnelvision/keys.json"


def add_keys_commands(commands: Any) -> None:
    keys = commands.add_parser("keys", help="API keys: add, list, revoke")
    keys.add_argument("--keys-file", type=Path, default=None, help=KEYS_FILE_HELP)
    key_commands = keys.add_subparsers(dest="keys_command", required=True)
    add = key_commands.add_parser("add", help="create a key; it is printed once, only its hash is kept")
    add.add_argument("name")
    add.add_argument(
        "--scopes",
        type=scopes_argument,
        default=DEFAULT_SCOPES,
        help=f"what the key may call, comma-separated from {', '.join(SCOPES)} "
        f"(default: {','.join(DEFAULT_SCOPES)}; admin: /metrics and model reloads)",
    )
    add.set_defaults(handler=run_keys_add)
    listing = key_commands.add_parser("list", help="names, hints, dates and scopes (never the keys)")
    listing.set_defaults(handler=run_keys_list)
    revoke = key_commands.add_parser("revoke", help="stop a key working (no restart needed)")
    revoke.add_argument("name")
    revoke.set_defaults(handler=run_keys_revoke)
    for command in (add, listing, revoke):  # users type it after the command too
        # SUPPRESS: when absent here, the value given before the command (or None) stands.
        command.add_argument("--keys-file", type=Path, default=argparse.SUPPRESS, help=KEYS_FILE_HELP)


def scopes_argument(text: str) -> tuple[str, ...]:
    try:
        return parse_scopes(text)
    except ValueError as exc:  # argparse prints it with the usage line and exits with 2
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_settings_flags(parser: argparse.ArgumentParser, model: type[BaseSettings] = Settings) -> None:
    for name, field in model.model_fields.items():
        flag = flag_name(name)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
        annotation = field.annotation
        if annotation is bool:
            action = parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif typing.get_origin(annotation) is typing.Literal:
            action = parser.add_argument(flag, choices=typing.get_args(annotation), **kwargs)
        elif typing.get_origin(annotation) is list:  # repeatable: --pipeline a=X --pipeline b=Y
            action = parser.add_argument(flag, action="append", metavar=name.upper(), **kwargs)
        else:
            action = parser.add_argument(flag, type=_scalar_type(annotation), **kwargs)
        # Set afterwards: BooleanOptionalAction appends a "(default: ...)" of its own on some Pythons.
        action.help = flag_help(name, field, env_name(name, model))
    parser.set_defaults(settings_flags=True)  # its errors can name the flag


def flag_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def env_name(field: str, model: type[BaseSettings] = Settings) -> str:
    return f"{model.model_config.get('env_prefix', '')}{field}".upper()


def flag_help(name: str, field: FieldInfo, variable: str) -> str:
    """`DESCRIPTION (default: X; env TUNNELVISION_NAME)`: one default, in words."""
    described = field.description or ""
    facts = f"env {variable}"
    if "(default:" not in described:  # a description may say its default better than the value
        facts = f"default: {default_text(field)}; {facts}"
    return f"{described} ({facts})".strip().replace("%", "%%")  # argparse %-formats help


def default_text(field: FieldInfo) -> str:
    if field.is_required():  # pydantic's default is then its PydanticUndefined marker
        return "none, required"
    value = field.get_default(call_default_factory=True)
    if value is None or value == "" or value == []:
        return "none"
    if isinstance(value, Path) and value.is_relative_to(Path.home()):
        return str("~" / value.relative_to(Path.home()))
    return str(value)


def _scalar_type(annotation: Any) -> type:
    if isinstance(annotation, types.UnionType):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation if annotation in (int, float, str) else str


def settings_from_args(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return Settings(**overrides)


def valid_settings(args: argparse.Namespace) -> Settings | None:
    """The settings from flags and environment, or None after saying what is wrong."""
    try:
        return settings_from_args(args)
    except (ValidationError, SettingsError) as exc:
        print(settings_problem(exc, args), file=sys.stderr)
        return None


def settings_problem(exc: ValidationError | SettingsError, args: argparse.Namespace) -> str:
    """One line per problem, naming the flag and the variable (`serve`, `up`) or the variable alone
    (commands without settings flags), in our words rather than pydantic's report."""
    flags = bool(getattr(args, "settings_flags", False))
    if isinstance(exc, ValidationError):
        lines = [validation_problem(error, flags) for error in exc.errors(include_url=False)]
    else:
        lines = [unparsable_variable(exc)]
    return "\n".join(f"tunnelvision {command_words(args)}: {line}" for line in lines)


def setting_name(field: str, flags: bool) -> str:
    """`--deadline-s (TUNNELVISION_DEADLINE_S)`, or the variable alone where there is no flag."""
    return f"{flag_name(field)} ({env_name(field)})" if flags else env_name(field)


def validation_problem(error: ErrorDetails, flags: bool) -> str:
    field = str(error["loc"][0]) if error["loc"] else ""
    if field not in Settings.model_fields:  # a rule across settings: name those it mentions
        return _name_settings(_reason(error), flags)
    given = error.get("input")
    # The value, to spot a typo; never a secret's.
    shown = isinstance(given, (str, int, float)) and "api_key" not in field
    return f"{setting_name(field, flags)}: {_reason(error)}" + (f" (got {given!r})" if shown else "")


def _reason(error: ErrorDetails) -> str:
    cause = (error.get("ctx") or {}).get("error")
    if error["type"] == "value_error" and cause is not None:
        return str(cause)  # our validator's words, without pydantic's "Value error, "
    return error["msg"][:1].lower() + error["msg"][1:]


def _name_settings(text: str, flags: bool) -> str:
    """`auth=access needs access_aud` -> `... needs --access-aud (TUNNELVISION_ACCESS_AUD)`."""
    names = sorted((name for name in Settings.model_fields if "_" in name), key=len, reverse=True)
    pattern = r"\b(" + "|".join(names) + r")\b"
    return re.sub(pattern, lambda found: setting_name(found.group(1), flags), text)


def unparsable_variable(exc: SettingsError) -> str:
    """pydantic-settings' `error parsing value for field "pipeline" from source ...`: a variable
    that must be JSON (a list) and is not."""
    found = re.search(r'field "(\w+)"', str(exc))
    field = found.group(1) if found else ""
    if field not in Settings.model_fields:
        return f"invalid settings: {exc}"
    variable = env_name(field)
    if typing.get_origin(Settings.model_fields[field].annotation) is list:
        return f"""{variable}: must be a JSON list, e.g. {variable}='["first", "second"]'"""
    return f"{variable}: must be JSON"


@needs_server
def run_serve(args: argparse.Namespace) -> int:
    settings = valid_settings(args)
    if settings is None:
        return 2
    if settings.ray:  # imported only here: Ray is an optional extra
        from tunnelvision.distributed.cluster import serve_on_ray

        return serve_on_ray(settings)
    from tunnelvision.server import serve

    return serve(settings)


@needs_server
def run_up(args: argparse.Namespace) -> int:
    settings = valid_settings(args)
    if settings is None:
        return 2
    from tunnelvision.tunnel import up

    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields}
    return up.run_up(settings, up.serve_command(overrides))


def add_models_reload_command(model_commands: Any) -> None:
    reload = model_commands.add_parser(
        "reload",
        help="load new weights into a running server and switch to them with no downtime (admin key)",
        description="Loads the pipeline's models anew beside the old ones, warms them up, switches new "
        "requests to them and frees the old copy once its requests have finished. If the new weights "
        "fail to load, the old ones go on serving and the reason is printed.",
    )
    reload.add_argument("name", help="the pipeline (see GET /v1/models), e.g. grounded-sam")
    reload.add_argument(
        "--source",
        default=None,
        help="DETECTOR+SEGMENTER or one model, each a hub id or a folder on the server "
        "(default: its current sources again, e.g. after writing new weights into the same folder)",
    )
    reload.add_argument("--url", default=None, help="server (default: TUNNELVISION_URL or 127.0.0.1:8000)")
    reload.add_argument(
        "--key", default=None, help="API key with the admin scope (default: TUNNELVISION_API_KEY)"
    )
    reload.add_argument(
        "--timeout", type=float, default=600.0, help="seconds to wait for the load (default 600)"
    )
    reload.set_defaults(handler=run_models_reload)


def run_models_reload(args: argparse.Namespace) -> int:
    import httpx

    from tunnelvision.client import APIError, Client

    try:
        with Client(args.url, args.key) as client:
            reloaded = client.reload_model(args.name, args.source, timeout=args.timeout)
    except APIError as exc:
        print(f"tunnelvision: reload failed: {exc}", file=sys.stderr)
        return 1
    except httpx.HTTPError as exc:
        print(f"tunnelvision: cannot reach the server: {exc}", file=sys.stderr)
        return 1
    pipeline = reloaded.pipeline
    print(
        f"reloaded {pipeline.name}: generation {pipeline.generation} from {pipeline.source} "
        f"(load {reloaded.load_s:.1f} s, warm-up {reloaded.warmup_s:.1f} s)"
    )
    return 0


@needs_server
def run_models_random(args: argparse.Namespace) -> int:
    from tunnelvision.models.random import write_random_models

    if args.family is not None:
        return write_one_family(args)
    detector, segmenter = write_random_models(args.out, args.size, args.seed)
    print(f"wrote {detector} and {segmenter} ({args.size}, random weights)")
    return 0


def write_one_family(args: argparse.Namespace) -> int:
    from tunnelvision.models.random_families import TorchvisionRequired, write_random_family

    try:
        folder = write_random_family(args.out, args.family, args.size, args.seed)
    except TorchvisionRequired as exc:
        print(f"tunnelvision: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {folder} ({args.family}, {args.size}, random weights)")
    return 0


PREDICT_HELP = """Images are segmented one request each; clips (.mp4 .mov .m4v .webm .mkv .avi) go up as
video jobs, with a progress bar of their tracked frames. Under --out, NAME is the input's path
relative to the inputs' common folder, extension kept:

  NAME.overlay.png, NAME.masks/000.png, NAME.json   an image's overlay, masks and answer
  NAME.video.json   a clip's tracked frames (RLE masks) and per-object summaries
  NAME.mot.txt      a clip's MOT Challenge lines: frame,id,left,top,width,height,score,-1,-1,-1
  NAME.overlay.mp4  the clip with the masks, boxes and ids drawn

A rerun skips images the --coco file has answers for and clips whose exports are all there."""


def add_predict_command(commands: Any) -> None:
    predict = commands.add_parser(
        "predict",
        help="segment images and track objects in clips (files, folders, globs) through a server",
        description=PREDICT_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    predict.add_argument("paths", nargs="+", help="image and clip files, folders (recursive) or globs")
    predict.add_argument(
        "--prompt",
        default=None,
        help="phrases separated by '.', e.g. 'forklift . person' (needed for images; clips take it "
        "unless --video-boxes or --video-points are given)",
    )
    predict.add_argument("--url", default=None, help="server (default: TUNNELVISION_URL or 127.0.0.1:8000)")
    predict.add_argument("--key", default=None, help="API key (default: TUNNELVISION_API_KEY)")
    predict.add_argument("--concurrency", type=int, default=4, help="images in flight at once (clips: one)")
    predict.add_argument(
        "--out",
        type=Path,
        default=None,
        help="write overlays, masks and JSON here, mirroring the inputs (clips need it)",
    )
    predict.add_argument(
        "--coco", type=Path, default=None, help="write COCO instances (RLE) to this file; a rerun adds to it"
    )
    predict.add_argument(
        "--force", action="store_true", help="redo images and clips that earlier runs answered"
    )
    predict.add_argument("--box-threshold", type=float, default=None)
    predict.add_argument("--text-threshold", type=float, default=None)
    predict.add_argument("--max-detections", type=int, default=None)
    predict.add_argument(
        "--model", default=None, help="pipeline for images (default: the server's first; see GET /v1/models)"
    )
    add_video_flags(predict)
    predict.set_defaults(handler=run_predict)


def add_video_flags(predict: argparse.ArgumentParser) -> None:
    video = predict.add_argument_group("clips")
    video.add_argument(
        "--video-model", default=None, help="video pipeline for clips (default: the server's first)"
    )
    video.add_argument(
        "--video-boxes",
        type=json_list,
        default=None,
        metavar="JSON",
        help="objects to follow, one box each on --video-frame: '[[x1,y1,x2,y2], ...]'",
    )
    video.add_argument(
        "--video-points",
        type=json_list,
        default=None,
        metavar="JSON",
        help="one object to follow, by points on --video-frame: '[[x,y,1], ...]' (0: background)",
    )
    video.add_argument(
        "--video-frame",
        type=int,
        default=None,
        help="the frame the boxes or points are on (default: --start)",
    )
    video.add_argument("--start", type=int, default=0, help="first frame to track (default 0)")
    video.add_argument(
        "--end", type=int, default=None, help="track up to this frame, exclusive (default: the last)"
    )
    video.add_argument("--stride", type=int, default=1, help="track every Nth frame (default 1)")
    video.add_argument(
        "--video-formats",
        type=video_formats,
        default=("json", "mot", "mp4"),
        metavar="LIST",
        help="exports to download, comma-separated from json, mot, mp4 (default: all three)",
    )
    video.add_argument(
        "--video-timeout",
        type=float,
        default=3600.0,
        help="seconds to wait for one clip's job before counting it failed (default 3600)",
    )


def json_list(text: str) -> list[Any]:
    import json

    try:
        value = json.loads(text)
    except ValueError:
        value = None
    if not isinstance(value, list) or not all(isinstance(item, list) for item in value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON list of lists, e.g. '[[10,20,110,120]]'")
    return value


def video_formats(text: str) -> tuple[str, ...]:
    formats = tuple(dict.fromkeys(word.strip() for word in text.split(",") if word.strip()))
    unknown = [fmt for fmt in formats if fmt not in ("json", "mot", "mp4")]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(f"{text!r}: choose from json, mot, mp4 (comma-separated)")
    return formats


def predict_problem(args: argparse.Namespace, images: bool, clips: bool) -> str | None:
    """What makes these inputs and flags unusable before anything is sent, or None."""
    phrases = normalize_phrases(args.prompt)
    if args.prompt is not None and not phrases:
        return "--prompt has no phrases: e.g. 'forklift . person'"
    if images and not phrases:
        return "images need --prompt: phrases separated by '.', e.g. 'forklift . person'"
    if clips and args.out is None:
        return "clips need --out: their exports (NAME.video.json, NAME.mot.txt, NAME.overlay.mp4) go there"
    if clips and not (phrases or args.video_boxes or args.video_points):
        return "clips need something to follow: --prompt, --video-boxes or --video-points"
    if args.video_boxes and args.video_points:
        return "give --video-boxes or --video-points, not both (points make one object)"
    return None


def video_fields(args: argparse.Namespace) -> dict[str, Any]:
    """`Client.track_video` arguments: boxes or points when given, else the text prompt."""
    shapes = {"boxes": args.video_boxes, "points": args.video_points}
    follow = shapes if any(shapes.values()) else {"prompt": args.prompt}
    fields = {
        **follow,
        "model": args.video_model,
        "frame": args.video_frame,
        "start": args.start,
        "end": args.end,
        "stride": args.stride,
        "box_threshold": args.box_threshold,
        "text_threshold": args.text_threshold,
    }
    return {k: v for k, v in fields.items() if v is not None}


def run_predict(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from tunnelvision.batch import (
        CocoWriter,
        PredictError,
        Predictor,
        Summary,
        VideoPredictor,
        find_images,
        predict,
        predict_videos,
    )
    from tunnelvision.client import Client

    jobs = find_images(args.paths, exclude=args.out)
    images, clips = [j for j in jobs if not j.is_video], [j for j in jobs if j.is_video]
    if not jobs:
        print("tunnelvision: no images found (nor clips)", file=sys.stderr)
        return 2
    options = {k: getattr(args, k) for k in ("box_threshold", "text_threshold", "max_detections", "model")}
    try:
        problem = predict_problem(args, bool(images), bool(clips))
        if problem is not None:
            raise PredictError(problem)
        coco = CocoWriter(args.coco if images else None, normalize_phrases(args.prompt))
    except (PredictError, ValueError) as exc:  # a bad prompt, an unusable --coco file
        print(f"tunnelvision: {exc}", file=sys.stderr)
        return 2
    if coco.new_labels:
        print(f"{args.coco}: new categories {', '.join(coco.new_labels)}; its images are asked for them too")
    try:
        client = Client(args.url, args.key)
    except ValueError as exc:  # a URL that is no http(s) URL
        print(f"tunnelvision: {exc}", file=sys.stderr)
        return 2
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    summary = Summary()
    try:
        with client, Progress(*columns, transient=True) as progress:
            if images:
                given = {k: v for k, v in options.items() if v is not None}
                predictor = Predictor(client, args.prompt, given, args.out, coco)
                summary = predict(images, predictor, args.concurrency, progress, force=args.force)
            if clips and summary.stopped is None:
                tracker = VideoPredictor(
                    client, video_fields(args), args.out, args.video_formats, args.video_timeout
                )
                summary = summary.plus(predict_videos(clips, tracker, progress, force=args.force))
            elif clips:
                summary.not_tried += len(clips)
    except KeyboardInterrupt:
        print("tunnelvision: interrupted; run the same command again to go on", file=sys.stderr)
        return 130
    for name, error in sorted(summary.failed.items()):
        print(f"failed: {name}: {error}", file=sys.stderr)
    if summary.stopped is not None:
        print(f"tunnelvision: stopped: {summary.stopped}", file=sys.stderr)
    tried = f", {summary.not_tried} not tried" if summary.not_tried else ""
    counts = f"{summary.done} done, {summary.skipped} skipped (already done), {len(summary.failed)} failed"
    print(counts + tried)
    return 1 if summary.failed or summary.stopped else 0


def normalize_phrases(prompt: str | None) -> list[str]:
    from tunnelvision.schemas import normalize_prompt

    return normalize_prompt(prompt) if prompt is not None else []


def add_tunnel_commands(commands: Any) -> None:
    tunnel = commands.add_parser("tunnel", help="Cloudflare Tunnel: config.yml, systemd units, quick tunnel")
    tunnel_commands = tunnel.add_subparsers(dest="tunnel_command", required=True)
    config = tunnel_commands.add_parser("config", help="write cloudflared's config.yml")
    config.add_argument("--hostname", required=True, help="public hostname, e.g. api.example.com")
    config.add_argument("--tunnel", required=True, help="tunnel UUID (`cloudflared tunnel list`)")
    config.add_argument("--credentials-file", required=True, help="the tunnel's credentials JSON")
    config.add_argument("--port", type=int, default=None, help="the API's port on this box (default 8000)")
    config.add_argument(
        "--origin",
        default=None,
        help="send traffic to http(s)://HOST:PORT instead of 127.0.0.1:PORT (another box, a Ray ingress)",
    )
    config.add_argument(
        "--topology",
        choices=["box", "replicas", "sites", "ray"],
        default="box",
        help="how the tunnel is used: one box (default), replicas of one tunnel, one tunnel per site "
        "behind Load Balancing, or a Ray cluster's ingress; prints what to do and what Cloudflare "
        "balances (docs/SCALING.md)",
    )
    config.add_argument("--metrics", default="127.0.0.1:20241", help="cloudflared metrics address")
    config.add_argument("--out", type=Path, default=None, help="file to write (default: print it)")
    config.set_defaults(handler=run_tunnel_config)
    systemd = tunnel_commands.add_parser("systemd", help="write the API's systemd unit and env file")
    systemd.add_argument("--out-dir", type=Path, default=Path("."), help="where to write them")
    systemd.add_argument("--user", default="tunnelvision", help="the service's user")
    systemd.add_argument(
        "--exec", dest="exec_path", default=None, help="the tunnelvision executable (default: this one)"
    )
    systemd.set_defaults(handler=run_tunnel_systemd)
    quick = tunnel_commands.add_parser(
        "quick",
        help="a throwaway trycloudflare.com URL for a running API (needs cloudflared and a key)",
    )
    quick.add_argument("--port", type=int, default=8000)
    quick.add_argument("--keys-file", type=Path, default=None, help=KEYS_FILE_HELP)
    quick.add_argument(
        "--insecure-no-auth",
        action="store_true",
        help="publish even though no authentication is configured (anyone with the URL can use it)",
    )
    quick.set_defaults(handler=run_tunnel_quick)


def add_doctor_command(commands: Any) -> None:
    doctor = commands.add_parser("doctor", help="why does the public URL fail? checks with remedies")
    doctor.add_argument("--port", type=int, default=None, help="the API's port (default: settings, 8000)")
    doctor.add_argument("--public-url", default=None, help="e.g. https://api.example.com")
    doctor.add_argument("--metrics", default=None, help="cloudflared metrics host:port")
    doctor.add_argument("--config", type=Path, default=None, help="cloudflared config.yml to check")
    doctor.add_argument("--json", action="store_true", help="machine-readable output")
    doctor.add_argument(
        "--key", default=None, help="API key for the live probes (default: env TUNNELVISION_API_KEY)"
    )
    doctor.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="where `tunnelvision up` keeps its state (default: settings)",
    )
    doctor.set_defaults(handler=run_doctor)


def run_tunnel_config(args: argparse.Namespace) -> int:
    from tunnelvision.tunnel.config import (
        DEFAULT_PORT,
        TunnelConfigError,
        build_config,
        config_notes,
        render_config,
        validate_with_cloudflared,
    )

    if args.origin is not None and args.port is not None:
        print("tunnelvision: give --origin or --port, not both", file=sys.stderr)
        return 2
    port = DEFAULT_PORT if args.port is None else args.port
    try:
        config = build_config(
            args.hostname, args.tunnel, args.credentials_file, port, args.metrics, args.origin
        )
    except TunnelConfigError as exc:
        print(f"tunnelvision: {exc}", file=sys.stderr)
        return 2
    text, code = render_config(config), 0
    if args.out is None:
        print(text, end="")
    else:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
        verdict = validate_with_cloudflared(args.out)
        if verdict is None:
            later = "validate later with `cloudflared tunnel ingress validate`"
            print(f"cloudflared is not installed here; {later}", file=sys.stderr)
        else:
            print(verdict[1], file=sys.stderr)
            code = 0 if verdict[0] else 1
    # The advice goes to stderr, so that without --out stdout is the YAML alone.
    for line in config_notes(config, args.topology):
        print(line, file=sys.stderr)
    return code


def run_tunnel_systemd(args: argparse.Namespace) -> int:
    import shutil

    from tunnelvision.tunnel.systemd import api_unit, env_file, next_steps

    settings = Settings()
    installed = args.exec_path or shutil.which("tunnelvision")
    command = [installed] if installed else [sys.executable, "-m", "tunnelvision.cli"]
    args.out_dir.mkdir(parents=True, exist_ok=True)
    unit, env = args.out_dir / "tunnelvision.service", args.out_dir / "tunnelvision.env"
    try:
        env_text = env_file(settings)
    except ValueError as exc:
        print(f"tunnelvision: {exc}", file=sys.stderr)
        return 2
    unit.write_text(api_unit(command, args.user, settings))
    env.write_text(env_text)
    print(f"wrote {unit} and {env}\n\n{next_steps(str(unit), str(env), command, args.user, settings.port)}")
    return 0


def run_tunnel_quick(args: argparse.Namespace) -> int:
    from tunnelvision.exposure import UnsafeExposure, require_auth_for_publishing
    from tunnelvision.tunnel.quick import run_quick_tunnel

    overrides: dict[str, Any] = {"insecure_no_auth": args.insecure_no_auth}
    if args.keys_file is not None:
        overrides["keys_file"] = args.keys_file
    try:
        warning = require_auth_for_publishing(Settings(**overrides))
    except UnsafeExposure as exc:
        print(f"tunnelvision: {exc}", file=sys.stderr)
        return 2
    if warning:
        print(f"tunnelvision: {warning}", file=sys.stderr)
    return run_quick_tunnel(args.port)


def run_doctor(args: argparse.Namespace) -> int:
    from tunnelvision.tunnel.doctor import DoctorOptions, all_ok, render, run_checks
    from tunnelvision.tunnel.up import read_state

    settings = Settings()
    up = read_state(args.data_dir or settings.data_dir)
    options = DoctorOptions(args.port, args.public_url, args.metrics, args.config, settings, up, key=args.key)
    checks = run_checks(options)
    print(render(checks, args.json))
    return 0 if all_ok(checks) else 1


def key_store(args: argparse.Namespace) -> KeyStore:
    return KeyStore(args.keys_file or Settings().keys_file)


def run_keys_add(args: argparse.Namespace) -> int:
    store = key_store(args)
    key = store.add(args.name, args.scopes)
    print(key)
    print(
        f"Key '{args.name}' ({','.join(args.scopes)}) added to {store.path}. "
        "It is shown only now: store it safely.",
        file=sys.stderr,
    )
    return 0


def run_keys_list(args: argparse.Namespace) -> int:
    entries = key_store(args).entries()
    for entry in entries:
        print(f"{entry.name}\t{entry.hint}...\t{entry.created}\t{','.join(entry.scopes) or '-'}")
    if not entries:
        print("no keys", file=sys.stderr)
    return 0


def run_keys_revoke(args: argparse.Namespace) -> int:
    key_store(args).revoke(args.name)
    print(f"revoked '{args.name}'", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
