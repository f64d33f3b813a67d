"""The command line shared by train.py, gan_train.py and finetune.py, and the exit-code contract:

    python <script>.py [--config FILE] [--print-config] [--force] [--eval-only] [dotted.key=value ...]

0 done (also after a graceful stop on a signal, with a checkpoint written); 2 a mistake the user can
fix (config, paths, data, launch), reported in one paragraph without a traceback, before any file is
written; 1 anything else. Imports stay light here: --help never imports torch.
"""
import argparse
import sys
import time

from lib import config as config_mod
from lib.errors import RunError, UserError

STARTED = time.time()


def parse(argv, schema, description, default_config=None, extra_args=None):
    keys = "\n".join(config_mod.describe(schema))
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"config keys (override any with key=value; values are YAML):\n{keys}")
    parser.add_argument("--config", metavar="FILE", default=default_config,
                        help=f"YAML config (default: {default_config or 'the schema defaults'})")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--force", action="store_true",
                        help="start over in a run directory that holds a different run (it is kept, renamed)")
    parser.add_argument("--eval-only", action="store_true", help="only evaluate the loaded weights")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.01")
    if extra_args is not None:
        extra_args(parser)
    return parser.parse_args(argv)


def run(main, *, schema=config_mod.Config, description="", default_config=None, defaults=None,
        preflight=None, argv=None, extra_args=None, command=None):
    """Parse the command line, load the config, call main(cfg), and turn errors into exit codes.

    default_config is the YAML file --config means when it is not given; defaults, a YAML file of
    the script's own defaults, lies under whichever --config file is read.

    extra_args(parser) adds a script's own flags; command(args) handles them and returns an exit
    code, or None to go on with training.
    """
    args = parse(sys.argv[1:] if argv is None else argv, schema, description, default_config, extra_args)
    code = _run(main, args, schema, defaults, preflight, command)
    if "lib.runlog" in sys.modules:                      # a failed run's wandb record says so (issue #15)
        sys.modules["lib.runlog"].close_wandb(code)
    if "lib.runtime" in sys.modules and argv is None:    # a real process, not a call from a test
        return sys.modules["lib.runtime"].exit_now(code)
    return code


def _run(main, args, schema, defaults, preflight, command):
    try:
        if command is not None:
            code = command(args)
            if code is not None:
                return code
        script_defaults = config_mod.read_yaml(defaults) if defaults else None
        cfg = config_mod.load(schema, args.config, args.overrides, script_defaults)
        if args.eval_only:
            cfg.train.eval_only = True
        cfg._force = args.force
        cfg._started = STARTED
        if args.print_config:
            _resolve(preflight or "lib.checks:preflight")(cfg)
            sys.stdout.write(config_mod.dump(cfg))
            return 0
        main(cfg)
        return 0
    except UserError as e:
        _report("error", e)
        return 2
    except RunError as e:
        _report("stopped", e)
        return 1
    except KeyboardInterrupt:
        _shutdown(ok=False)
        return 130
    except Exception as e:               # a lost peer: say so in a line, not a stack trace
        lost = "lib.runtime" in sys.modules and sys.modules["lib.runtime"].peer_failure(e)
        if lost:
            _report("stopped", RunError(lost))
            return 1
        _crash(e)
        return 1


def _crash(err):
    """Anything unexpected (the model, DeepSpeed, an out-of-memory error): leave the process group
    first (so teardown cannot abort), then print this rank's traceback once, named, and exit 1."""
    from lib import runtime
    from lib.runtime.faults import report_crash
    from lib.runtime.dist import mark_crashed
    world = runtime.CURRENT.world_size if runtime.CURRENT is not None else 1
    mark_crashed(runtime.process_rank())
    _shutdown(ok=False)
    report_crash(err, runtime.process_rank(), world)


def _resolve(fn):
    """A callable, or 'module:function' imported only now (so --help never imports torch)."""
    if callable(fn):
        return fn
    import importlib
    module, name = fn.split(":")
    return getattr(importlib.import_module(module), name)


def _report(kind, err):
    from lib import runtime
    rank = runtime.process_rank()
    started = runtime.CURRENT is not None
    _shutdown(ok=False)
    # Config errors are the same on every rank: say them once. Later errors may be rank-specific.
    if rank == 0:
        print(f"{kind}: {err}", file=sys.stderr, flush=True)
    elif started:
        print(f"[rank {rank}] {kind}: {err}", file=sys.stderr, flush=True)


def _shutdown(ok):
    from lib import runtime
    if runtime.CURRENT is not None:
        runtime.CURRENT.shutdown(ok=ok)
