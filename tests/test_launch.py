"""Slurm without Slurm: maect.launch's job construction (sbatch parameters, each task's torchrun-style environment
with MASTER_ADDR = the allocation's first node, the requeue hook's resubmission with resume=auto), a real
signal -> checkpoint hook -> requeue -> resume cycle through submitit's LocalExecutor (2 ranks, gloo), the sbatch
template of docs/distributed-and-slurm.md run by bash with stand-ins for scontrol and srun, and every command that
README.md and docs/*.md quote in their code blocks: shell syntax, modules, scripts, flags and config keys."""
import argparse
import functools
import glob
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import submitit
import torch

from maect import launch
from maect.hub import load_checkpoint
from fault_runner import FaultJob
from test_nnclr import ROOT, TINY, run_train

SLURM_ENV = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-08,12]",
             "SLURM_JOB_NUM_NODES": "3", "SLURM_NTASKS": "24", "SLURM_NODEID": "1", "SLURM_PROCID": "9",
             "SLURM_LOCALID": "1"}


def test_task_env_from_slurm_variables(monkeypatch):
    """submitit's Slurm job environment (SLURM_* variables as srun sets them for task 9 of 3 nodes x 8) -> the
    environment maect.dist.init reads; the rendezvous host is the first node of the compressed node list."""
    for k, v in SLURM_ENV.items():
        monkeypatch.setenv(k, v)
    env = launch.task_env(submitit.JobEnvironment())
    print(env)
    assert env == {"MASTER_ADDR": "gpu07", "MASTER_PORT": str(20000 + 123456 % 20000), "RANK": "9", "LOCAL_RANK": "1",
                   "WORLD_SIZE": "24", "LOCAL_WORLD_SIZE": "8", "GROUP_RANK": "1"}
    assert launch.task_env(submitit.JobEnvironment(), port=29500)["MASTER_PORT"] == "29500"
    assert launch.default_port("123456_7") == launch.default_port("1234567") == 20000 + 1234567 % 20000


def test_checkpoint_hook_resubmits_with_resume_auto(tmp_path):
    job = launch.TrainJob(["preset=tiny", "resume=", "out_dir=runs/x"], port=23000)
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission)
    path = tmp_path / "submitted.pkl"
    delayed.dump(path)                                    # what submitit stores for the requeued job
    back = submitit.helpers.DelayedSubmission.load(path).function
    assert isinstance(back, launch.TrainJob) and back.port == 23000
    assert back.train_args == ["preset=tiny", "out_dir=runs/x", "resume=auto"]


def test_dry_run_prints_the_sbatch_job(capsys):
    launch.main(["--nodes", "4", "--gpus-per-node", "8", "--partition", "p1", "--time", "240", "--account", "acc",
                 "--setup", "module load cuda", "--dry-run", "--", "preset=vit_b16", "out_dir=/ckpt/b16"])
    out = capsys.readouterr().out
    print(out)
    assert "4 node(s) x 8 task(s) = 32 ranks" in out
    assert "python -m maect.train preset=vit_b16 out_dir=/ckpt/b16 resume=auto" in out
    for line in ("#SBATCH --nodes=4", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --partition=p1", "#SBATCH --time=240", "#SBATCH --account=acc", "#SBATCH --requeue",
                 "#SBATCH --signal=USR2@120", "#SBATCH --open-mode=append", "module load cuda"):
        assert line in out.splitlines(), line
    assert re.search(r"^srun .* -m submitit\.core\._submit ", out, re.M)


def test_bad_arguments_are_one_line_errors(tmp_path):
    with pytest.raises(SystemExit, match=r"put the training arguments after --"):
        launch.main(["--nodes", "2", "preset=tiny"])
    with pytest.raises(SystemExit, match=r"nope"):
        launch.main(["--dry-run", "--", "preset=tiny", "nope=1"])
    with pytest.raises(SystemExit, match=r"mae\.batch_size=256 must be divisible by world size 24"):
        launch.main(["--nodes", "3", "--gpus-per-node", "8", "--dry-run", "--", "preset=tiny"])
    if subprocess.run(["which", "srun"], capture_output=True).returncode != 0:
        with pytest.raises(SystemExit, match=r"srun.*--cluster local"):
            launch.main(["--job-dir", str(tmp_path / "jobs"), "--", "preset=tiny"])


@pytest.mark.slow
@pytest.mark.parametrize("when", ["step", "save"])
def test_local_job_requeues_on_signal_and_resumes(tmp_path, monkeypatch, when):
    """2 ranks under submitit's LocalExecutor (gloo on CPU), the signal at a chosen point, never at a time that
    depends on the machine's speed:
      step  rank 0 sends itself SIGUSR2 (as Slurm would) right after step 5; only rank 0 has it, so the stop waits
            for the all-reduce of the flag at step 6 (signal_every=2)
      save  SIGUSR2 arrives inside torch.save of rank 0's step-4 checkpoint (a writer that signals mid-write): the
            save completes; the flags are all-reduced right after it (step 4), and that complete checkpoint is the
            one the job stops with (not written twice)
    Then submitit's hook requeues the job, and the next run continues from the stop's step (resume=auto) to the
    end of the stage; every checkpoint file of both runs loads and holds what it should."""
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))   # tasks import fault_runner
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    fault = "signal@mae:5:0" if when == "step" else "signal_in_save@mae:4"
    monkeypatch.setattr(launch, "TrainJob", functools.partial(FaultJob, faults=[fault]))   # what launch.main submits
    out, jobs = tmp_path / "out", tmp_path / "jobs"
    job = launch.main(["--cluster", "local", "--gpus-per-node", "0", "--tasks-per-node", "2", "--time", "10",
                       "--job-dir", str(jobs / "%j"), "--", *TINY, "stage=mae", "mae.epochs=0.0427",
                       "ckpt_every=2", "keep_last=100", "signal_every=2", "log_every=5", f"out_dir={out}"])  # 40 steps
    try:
        job.results()                                     # waits for the requeued run; raises if a task failed
    finally:
        job.cancel()
    log0 = open(glob.glob(str(jobs / "*" / "*_0_log.out"))[0]).read()
    err0 = open(glob.glob(str(jobs / "*" / "*_0_log.err"))[0]).read()
    print(log0[-3000:], err0[-2000:])
    assert "Caught signal SIGUSR2" in err0 and "Requeued job" in log0
    assert len(re.findall(r"maect\.launch task \(pid \d+\): MASTER_ADDR=\S+ MASTER_PORT=\d+ RANK=0", log0)) == 2
    assert "stopped on SIGUSR2" in log0 and (when == "step" or "injected SIGUSR2 inside torch.save" in log0)
    stop = 6 if when == "step" else 4
    assert re.search(rf"resuming from .*checkpoint-latest\.pth \(step {stop}\)", log0), "the requeued run did not resume"
    assert re.search(rf"stopped on SIGUSR2: checkpoint \S+ written.*\(step {stop}\)", log0)
    d = out / "mae"
    assert not [f for f in os.listdir(d) if ".tmp" in f]              # no partial file left behind
    final = load_checkpoint(str(d / "checkpoint-final.pth"))
    assert final["step"] == 40 and final["args"]["resume"] == "auto"
    prev = None
    for step in range(2, 40, 2):                                       # every checkpoint of both runs loads
        ck = load_checkpoint(str(d / f"checkpoint-{step:07d}.pth"))
        assert ck["step"] == step and set(ck) == set(final) and set(ck["model"]) == set(final["model"])
        if prev is not None:                                           # and each step changed the weights
            assert not torch.equal(ck["model"]["blocks.0.attn.qkv.weight"], prev["model"]["blocks.0.attn.qkv.weight"])
        prev = ck


# ------------------------------------------------------------------------------------------------ sbatch template
SLURM_PAGE = os.path.join(ROOT, "docs", "distributed-and-slurm.md")


def readme_sbatch() -> str:
    text = open(SLURM_PAGE).read()
    m = re.search(r"<!-- sbatch template[^>]*-->\s*```bash\n(.*?)```", text, re.S)
    assert m, f"{SLURM_PAGE} has no sbatch template block"
    return m.group(1)


def test_readme_sbatch_template(tmp_path):
    """bash runs the docs' sbatch template with stand-ins: scontrol (show hostnames / requeue) and srun (records its
    command line). MASTER_ADDR is the first node; on the pre-timeout signal the job requeues itself."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text('#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then printf "gpu07\\ngpu08\\n"; '
                                   f'else echo "$@" >> {tmp_path}/scontrol.txt; fi\n')
    (bin_ / "srun").write_text(f'#!/bin/bash\necho "$@" > {tmp_path}/srun.tmp\nmv {tmp_path}/srun.tmp '
                               f'{tmp_path}/srun.txt\nexec sleep 60 >/dev/null 2>&1\n')  # not holding our pipe
    for f in bin_.iterdir():
        f.chmod(0o755)
    script = tmp_path / "job.sbatch"
    script.write_text(readme_sbatch())
    env = {**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_NUM_NODES": "2"}
    p = subprocess.Popen(["bash", str(script)], cwd=tmp_path, env=env, start_new_session=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        t0 = time.time()
        while not (tmp_path / "srun.txt").exists():
            assert time.time() - t0 < 60 and p.poll() is None, p.stdout.read() if p.poll() is not None else "timeout"
            time.sleep(0.05)
        os.kill(p.pid, signal.SIGUSR1)                   # what --signal=B:USR1@... delivers to the batch shell
        out, _ = p.communicate(timeout=60)
    finally:
        try:                                              # the script and the srun stand-in's sleep (its group)
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    srun = (tmp_path / "srun.txt").read_text()
    print(out, srun)
    port = 20000 + 4242 % 20000
    assert f"--rdzv_endpoint=gpu07:{port}" in srun and "--nnodes=2" in srun and "--rdzv_id=4242" in srun
    assert re.search(r"torchrun .* -m maect\.train .*resume=auto", srun)
    assert (tmp_path / "scontrol.txt").read_text().split() == ["requeue", "4242"]
    assert "#SBATCH --signal=B:USR1@" in script.read_text() and "#SBATCH --requeue" in script.read_text()


# ------------------------------------------------------------------------------------------------ quoted commands
# Every fenced code block of README.md and docs/*.md: shell blocks (bash, sh or no language) pass `bash -n`, and each
# command in them that runs Python is checked without running it: `python -m maect.train` / `torchrun ... -m
# maect.train` overrides through the config parser's own validation (maect.validation.load_config), `python -m
# maect.launch` through its dry run, other `python -m maect...` modules and `python path/x.py` scripts through their
# own argparse parser (the module runs up to its parse_args, which stops it), other modules by existence, `./x` by
# existence; python blocks must compile.
DOC_PAGES = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
SHELL_LANGS = {"", "bash", "sh", "shell"}
SEPARATORS = {"&&", "||", ";", "|", "&", "(", ")", ";;"}
PYTHONS = {"python", "python3", sys.executable}


class Parsed(Exception):
    """Raised right after a parser accepted the arguments: the command parses, nothing of it runs."""


def code_blocks(path: str) -> list[tuple[str, int, str]]:
    """(language, first line number, body) of every fenced block of a markdown file."""
    text = open(os.path.join(ROOT, path)).read()
    return [(m.group(1).lower(), text.count("\n", 0, m.start()) + 2, m.group(2))
            for m in re.finditer(r"^```([\w+-]*)[^\n]*\n(.*?)^```", text, re.S | re.M)]


def shell_commands(body: str) -> list[list[str]]:
    """The simple commands of a shell block as token lists (continuations joined, comments dropped, split at
    && || ; | & and parentheses)."""
    import shlex
    out = []
    for line in re.sub(r"\\\n", " ", body).splitlines():
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split, lex.commenters = True, "#"
        cmd = []
        for tok in lex:
            if tok in SEPARATORS:
                out.append(cmd)
                cmd = []
            else:
                cmd.append(tok)
        out.append(cmd)
    return [c for c in out if c]


def run_parser_only(target: str, argv: list[str], script: bool) -> argparse.Namespace:
    """Run module (or script path) `target` as __main__ with sys.argv = argv until its argparse parser has accepted
    the arguments; returns the namespace. SystemExit(0) (--help) returns None; a parser error fails the test."""
    import runpy
    orig_args, orig_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    inside = []

    def parse_args(self, args=None, namespace=None):
        inside.append(1)
        try:
            ns = orig_args(self, args, namespace)
        finally:
            inside.pop()
        raise Parsed(ns)

    def parse_known_args(self, args=None, namespace=None):
        res = orig_known(self, args, namespace)
        if inside:            # parse_args' own call (and subparsers'): its unknown-argument check still follows
            return res
        raise Parsed(res[0])

    saved = sys.argv, list(sys.path), dict(os.environ)
    argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = parse_args, parse_known_args
    try:
        sys.argv = [target, *argv]
        if script:
            sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
            runpy.run_path(target, run_name="__main__")
        else:   # a fresh copy of the module (and of a package's __main__), the imported one put back afterwards
            hidden = {m: sys.modules.pop(m) for m in (target, f"{target}.__main__") if m in sys.modules}
            try:
                runpy.run_module(target, run_name="__main__", alter_sys=True)
            finally:
                sys.modules.update(hidden)
    except Parsed as p:
        return p.args[0]
    except SystemExit as e:
        if e.code in (0, None):
            return None
        raise AssertionError(f"{target} {' '.join(argv)}: exits {e.code!r}") from None
    finally:
        argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = orig_args, orig_known
        sys.argv, sys.path[:] = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
    raise AssertionError(f"{target} ran to its end without parsing its arguments with argparse")


def check_train_args(args: list[str], where: str) -> None:
    from maect import config as C
    from maect.validation import load_config
    try:
        load_config(args)
    except C.ConfigError as e:
        raise AssertionError(f"{where}: maect.train {' '.join(args)}: {e}") from None


def check_python(cmd: list[str], where: str) -> str:
    """One command that starts Python (possibly behind env assignments, srun, time, nice, torchrun); returns what
    was checked ('' when the command runs no Python)."""
    import importlib.util
    i = next((j for j, t in enumerate(cmd) if t in PYTHONS or os.path.basename(t) == "torchrun"), None)
    if i is None:
        return ""
    rest = cmd[i + 1:]
    if os.path.basename(cmd[i]) == "torchrun":
        assert "-m" in rest, f"{where}: torchrun without -m MODULE: {' '.join(cmd)}"
        rest = rest[rest.index("-m"):]
    if rest[:1] == ["-m"] and len(rest) > 1:
        mod, args = rest[1], rest[2:]
        if mod == "maect.train":
            check_train_args(args, where)
        elif mod == "maect.launch":
            argv = args[:args.index("--")] + ["--dry-run"] + args[args.index("--"):] if "--" in args else args
            try:
                launch.main(argv)
            except SystemExit as e:
                raise AssertionError(f"{where}: maect.launch {' '.join(args)}: {e}") from None
        elif mod.startswith("maect"):
            assert importlib.util.find_spec(mod) is not None, f"{where}: no module {mod}"
            ns = run_parser_only(mod, args, script=False)
            if ns is not None and getattr(ns, "overrides", None) and getattr(ns, "preset", None):
                check_train_args([f"preset={ns.preset}", *ns.overrides], where)
        else:
            assert importlib.util.find_spec(mod) is not None, f"{where}: no module {mod}"
        return f"-m {mod}"
    if rest and rest[0].endswith(".py"):
        path = os.path.join(ROOT, rest[0])
        assert os.path.exists(path), f"{where}: no script {rest[0]}"
        ns = run_parser_only(path, rest[1:], script=True)
        if ns is not None and getattr(ns, "overrides", None) and getattr(ns, "preset", None):
            check_train_args([f"preset={ns.preset}", *ns.overrides], where)
        return rest[0]
    return ""


@pytest.mark.parametrize("page", DOC_PAGES)
def test_every_quoted_command_parses(page, capsys):
    checked, errors = [], []
    for lang, line, body in code_blocks(page):
        where = f"{page}:{line}"
        if lang == "python":
            try:
                compile(body, where, "exec")
            except SyntaxError as e:
                errors.append(f"{where}: {e}")
            continue
        if lang not in SHELL_LANGS:
            continue
        r = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
        if r.returncode != 0:
            errors.append(f"{where}: bash -n: {r.stderr.strip()}")
            continue
        for cmd in shell_commands(body):
            try:
                if cmd[0].startswith("./"):
                    assert os.path.exists(os.path.join(ROOT, cmd[0])), f"{where}: no file {cmd[0]}"
                what = check_python(cmd, where)
            except AssertionError as e:      # every bad command of the page is named, not only the first
                errors.append(str(e).splitlines()[0])
                continue
            if what:
                checked.append(what)
    with capsys.disabled():
        print(f"\n{page}: {len(checked)} Python commands parse ({', '.join(sorted(set(checked)))})"
              + "".join(f"\n  FAILS {e}" for e in errors))
    assert not errors, "\n".join(errors)


def test_command_checker_catches_bad_keys_flags_and_scripts():
    """The checks above can fail: an unknown config key, a bad value, an unknown flag, a missing script."""
    for bad in (["python", "-m", "maect.train", "preset=tiny", "ct.nope=1"],
                ["torchrun", "--nproc_per_node=2", "-m", "maect.train", "preset=tiny", "ct.epochs=zero"],
                ["python", "-m", "maect.eval", "--ckpt", "x.pth", "--no-such-flag"],
                ["python", "bench/queue_lookup.py", "--no-such-flag"],
                ["python", "bench/no_such_script.py"],
                ["python", "-m", "maect.no_such_module"],
                ["python", "-m", "maect.launch", "--nodes", "2", "--", "preset=tiny", "nope=1"]):
        with pytest.raises(AssertionError):
            check_python(bad, "test")
    assert check_python(["python", "-m", "maect.export", "--ckpt", "a.pth", "--format", "timm", "--out", "b.pth"],
                        "test") == "-m maect.export"
    assert shell_commands("A=1 python3 -m x \\\n  --y 2 && echo hi  # c\n") == [["A=1", "python3", "-m", "x", "--y",
                                                                              "2"], ["echo", "hi"]]


# ------------------------------------------------------------------------------------------------ plain maect.train
def test_stop_handler_only_records():
    """The handler records the first signal and returns; a second one changes nothing; nothing is raised."""
    from maect import preempt
    preempt.clear()
    try:
        preempt.record(signal.SIGUSR2)
        preempt.record(signal.SIGTERM)
        assert preempt.requested() == signal.SIGUSR2 == preempt.agreed(3, 1, 10, "cpu")
    finally:
        preempt.clear()
    assert preempt.agreed(3, 1, 10, "cpu") == 0


@pytest.mark.slow
def test_train_stops_on_signal_with_exit_75_and_resumes(tmp_path):
    """python -m maect.train (one process): SIGUSR2 after step 3 -> the step-3 checkpoint, exit status 75; the same
    command with resume=auto continues from step 3, and its end equals an uninterrupted run's bit for bit."""
    args = [*TINY, "stage=mae", "mae.epochs=0.0107", "log_every=1"]            # 10 steps of 64
    r = run_train(args + [f"out_dir={tmp_path / 'a'}"], faults=["signal@mae:3"], ok=False)
    assert r.returncode == 75, r.stdout[-2000:] + r.stderr[-2000:]
    assert "stopped on SIGUSR2" in r.stderr and not (tmp_path / "a" / "mae" / "checkpoint-final.pth").exists()
    assert load_checkpoint(str(tmp_path / "a" / "mae" / "checkpoint-latest.pth"))["step"] == 3
    out = run_train(args + [f"out_dir={tmp_path / 'a'}", "resume=auto"]).stdout
    assert re.search(r"resuming from .*checkpoint-latest\.pth \(step 3\)", out)
    run_train(args + [f"out_dir={tmp_path / 'b'}"])
    a, b = (load_checkpoint(str(tmp_path / d / "mae" / "checkpoint-final.pth")) for d in "ab")
    assert a["step"] == b["step"] == 10
    assert all(torch.equal(v, b["model"][k]) for k, v in a["model"].items())
