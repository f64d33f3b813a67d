"""Mutation check: does the test suite catch the bugs that matter?

    python tests/mutation/run.py                  # baseline, then every mutant (tens of minutes)
    python tests/mutation/run.py --check          # catalogue sanity only: snippets, test ids (seconds)
    python tests/mutation/run.py --list           # the catalogue
    python tests/mutation/run.py --only NAME[,NAME] | --area AREA  [--jobs N] [--no-baseline]

Each mutant of tests/mutation/mutants.yaml is one single-point bug (a condition inverted, an offset
off by one, a call dropped) in sharding, resume, accumulation, precision, clipping, checkpoints,
EMA, batch-norm, signals or config validation. For each, a fresh copy of the repository (tracked and
untracked-not-ignored files) gets the bug and runs only the tests named for it:

    caught    pytest failed (exit 1; 2/3/4 and timeouts count too, reported as such)
    survived  the tests passed with the bug in: a hole in the tests (listed with its `why`)
    harness   nothing was tested (pytest exit 5, a missing test, a snippet not found exactly once)

The score is caught / (caught + survived); the exit status is 0 when it reaches --min-score (95)
and there was no harness problem. Standard library and PyYAML only; not part of pytest's default run.
"""
import argparse
import concurrent.futures
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    area: str
    file: str
    old: str            # a snippet that occurs exactly once in `file`
    new: str            # what it becomes: the bug
    tests: tuple        # pytest node ids (or "-k EXPR") that must catch it
    why: str            # the bug a user would pay for


def load_catalogue(path=HERE / "mutants.yaml"):
    """(areas, mutants) of the catalogue file."""
    import yaml
    data = yaml.safe_load(Path(path).read_text())
    return tuple(data["areas"]), [Mutant(**{**m, "tests": tuple(m["tests"])}) for m in data["mutants"]]


AREAS, MUTANTS = load_catalogue()

PYTEST_EXITS = {1: "caught", 2: "caught (collection error)", 3: "caught (internal error)", 4: "caught (usage error)"}
_print_lock = threading.Lock()


def say(*args):
    with _print_lock:
        print(*args, flush=True)


# -- the repository copy ---------------------------------------------------------------------

def repo_files():
    out = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=REPO, check=True,
                         capture_output=True).stdout.decode()
    return sorted({f for f in out.split("\0") if f})


def make_copy(dest, files):
    for rel in files:
        src = REPO / rel
        if not (src.exists() or src.is_symlink()):
            continue                                    # tracked but deleted in the work tree
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest / rel, follow_symlinks=False)


def mutated_text(root, m):
    """The file's text with the mutant applied; ValueError when `old` is not there exactly once."""
    text = (root / m.file).read_text()
    count = text.count(m.old)
    if count != 1:
        raise ValueError(f"{m.name}: the snippet occurs {count} times in {m.file} (must be exactly once)")
    return text.replace(m.old, m.new)


# -- tests ---------------------------------------------------------------------------------------

def pytest_args(tests):
    args = []
    for t in tests:
        args += ["-k", t[3:].strip()] if t.startswith("-k ") else [t]
    return args


def missing_tests(tests, root=REPO):
    """Node ids whose file or test function is not there (parametrize ids are not checked)."""
    missing = []
    for t in tests:
        if t.startswith("-k "):
            continue
        path, _, rest = t.partition("::")
        if not (root / path).is_file():
            missing.append(t)
        elif rest:
            name = rest.split("::")[-1].split("[")[0]
            if not re.search(rf"^\s*(async\s+)?def\s+{re.escape(name)}\s*\(", (root / path).read_text(), re.M):
                missing.append(t)
    return missing


def _descendants(pid):
    """pid's process tree from /proc (tests start launchers in new sessions, out of our group)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
        except (OSError, IndexError, ValueError):
            pass
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo += children.get(p, [])
    return tree


def run_pytest(root, args, timeout):
    """(exit code or None on timeout, seconds, output tail) of pytest on `args` in `root`."""
    env = dict(os.environ)
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not Path(p).resolve().is_relative_to(REPO)]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
           f"--basetemp={root.parent / 'pytest-tmp'}", *args]
    t = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         start_new_session=True)
    try:
        out, _ = p.communicate(timeout=timeout)
        code = p.returncode
    except subprocess.TimeoutExpired:
        for pid in reversed(_descendants(p.pid)):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        out, code = p.communicate()[0], None
    return code, time.perf_counter() - t, "\n".join(out.splitlines()[-15:])


def run_mutant(m, files, timeout):
    result = {"name": m.name, "area": m.area, "file": m.file, "tests": m.tests, "why": m.why}
    tests = [t for t in m.tests if t not in missing_tests(m.tests)]
    if missing_tests(m.tests):
        result["missing_tests"] = missing_tests(m.tests)
    if not [t for t in tests if not t.startswith("-k ")]:
        return {**result, "result": "harness: its tests do not exist yet", "code": None, "seconds": 0.0}
    with tempfile.TemporaryDirectory(prefix=f"mutant-{m.name}-") as tmp:
        root = Path(tmp) / "repo"
        make_copy(root, files)
        try:
            (root / m.file).write_text(mutated_text(root, m))
        except (ValueError, OSError) as e:
            return {**result, "result": f"harness: {e}", "code": None, "seconds": 0.0}
        code, seconds, tail = run_pytest(root, pytest_args(tests), timeout)
    if code is None:
        verdict = f"caught (timeout after {timeout} s)"
    elif code == 0:
        verdict = "survived"
    else:
        verdict = PYTEST_EXITS.get(code, f"harness: pytest exit {code}" + (" (no tests ran)" if code == 5 else ""))
    return {**result, "result": verdict, "code": code, "seconds": round(seconds, 1), "output_tail": tail}


def baseline(mutants, files, timeout):
    """The mutants' tests on the unmutated copy: they must pass, or a 'caught' would mean nothing."""
    plain, selections = [], []
    for m in mutants:
        tests = [t for t in m.tests if t not in missing_tests(m.tests)]
        if any(t.startswith("-k ") for t in tests):
            selections.append(tests)
        else:
            plain += [t for t in tests if t not in plain]
    groups = ([plain] if plain else []) + [s for i, s in enumerate(selections) if s not in selections[:i]]
    with tempfile.TemporaryDirectory(prefix="mutant-baseline-") as tmp:
        root = Path(tmp) / "repo"
        make_copy(root, files)
        for tests in groups:
            say(f"baseline: {len(tests)} tests / selections on the unmutated copy ...")
            code, seconds, tail = run_pytest(root, pytest_args(tests), timeout)
            if code != 0:
                sys.exit(f"baseline FAILED (pytest exit {code}, {seconds:.0f} s): the unmutated code does not pass "
                         f"the mutants' tests, so no mutant can be judged. Fix that first (or --no-baseline).\n{tail}")
            say(f"baseline: passed in {seconds:.0f} s")


# -- commands ------------------------------------------------------------------------------------

def check(mutants):
    """Every snippet occurs exactly once and its mutant compiles; every test file exists (a missing
    test function is a warning: tests may be written after their mutant). Returns the error count."""
    errors = 0
    names = [m.name for m in MUTANTS]
    for m in mutants:
        problems = []
        if names.count(m.name) > 1 or not re.fullmatch(r"[a-z0-9]+(-[a-z0-9]+)*", m.name):
            problems.append("name is duplicated or not kebab-case")
        if m.area not in AREAS:
            problems.append(f"unknown area '{m.area}'")
        if m.old == m.new or not m.tests or not m.why:
            problems.append("old == new, or no tests, or no why")
        try:
            compile(mutated_text(REPO, m), m.file, "exec")
        except (ValueError, OSError, SyntaxError) as e:
            problems.append(f"{type(e).__name__}: {e}")
        for t in missing_tests(m.tests):
            if (REPO / t.split("::")[0]).is_file():
                say(f"  warning: {m.name}: {t} does not exist (yet)")
            else:
                problems.append(f"no test file for {t}")
        errors += bool(problems)
        for p in problems:
            say(f"  ERROR: {m.name}: {p}")
    say(f"check: {len(mutants)} mutants, {errors} with errors")
    return errors


def summary(results, min_score):
    say("\n" + f"{'mutant':48s} {'area':26s} {'result':32s} {'s':>6s}")
    for r in results:
        say(f"{r['name']:48s} {r['area']:26s} {r['result']:32s} {r['seconds']:6.0f}")
    caught = sum(r["result"].startswith("caught") for r in results)
    survived = [r for r in results if r["result"] == "survived"]
    harness = [r for r in results if r["result"].startswith("harness")]
    scored = caught + len(survived)
    score = 100.0 * caught / scored if scored else 0.0
    not_run = f"; {len(harness)} not run (harness)" if harness else ""
    say(f"\nscore: {caught}/{scored} ({score:.1f}%) caught" + not_run)
    for r in survived:
        say(f"  SURVIVED {r['name']} ({r['file']}): {r['why']}\n           tests: {' '.join(r['tests'])}")
    for r in harness:
        say(f"  HARNESS  {r['name']}: {r['result']}" + (f" {r['missing_tests']}" if r.get("missing_tests") else ""))
    return score, bool(scored) and score >= min_score and not harness


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", help="comma-separated mutant names")
    ap.add_argument("--area", choices=AREAS)
    ap.add_argument("--list", action="store_true", help="print the catalogue and exit")
    ap.add_argument("--check", action="store_true", help="check snippets and test ids; run nothing")
    ap.add_argument("--jobs", type=int, default=1, help="mutants run at once (default 1)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per mutant (default 600)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the unmutated run of the tests")
    ap.add_argument("--min-score", type=float, default=95.0, help="percent caught needed for exit 0")
    ap.add_argument("--report", default="/tmp/mutation_report.json", help="JSON report path")
    a = ap.parse_args(argv)
    mutants = list(MUTANTS)
    if a.only:
        wanted = a.only.split(",")
        unknown = set(wanted) - {m.name for m in mutants}
        if unknown:
            ap.error(f"unknown mutant(s): {', '.join(sorted(unknown))}")
        mutants = [m for m in mutants if m.name in wanted]
    if a.area:
        mutants = [m for m in mutants if m.area == a.area]
    if a.list:
        for m in mutants:
            say(f"{m.name:48s} {m.area:26s} {m.file:18s} {' '.join(m.tests)}")
        return 0
    if a.check:
        return 1 if check(mutants) else 0
    files = repo_files()
    if not a.no_baseline:
        baseline(mutants, files, 3 * a.timeout)
    results = []
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        futures = {pool.submit(run_mutant, m, files, a.timeout): m for m in mutants}
        for fut in concurrent.futures.as_completed(futures):
            r = fut.result()
            results.append(r)
            say(f"{r['name']:48s} {r['area']:26s} {r['result']:32s} {r['seconds']:6.0f} s")
    order = {m.name: i for i, m in enumerate(mutants)}
    results.sort(key=lambda r: order[r["name"]])
    score, passed = summary(results, a.min_score)
    Path(a.report).write_text(json.dumps({"score": score, "min_score": a.min_score, "passed": passed,
                                          "results": results}, indent=2) + "\n")
    say(f"report: {a.report}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
