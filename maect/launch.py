"""python -m maect.launch --nodes N --gpus-per-node G --partition P --time MIN [--dry-run] -- KEY=VALUE ...

Submits `maect.train KEY=VALUE ...` as one multi-node Slurm job through submitit (`pip install 'maect[slurm]'`), which
requeues itself on preemption or time-out and continues with resume=auto. torchrun stays the primary launcher (the
README's sbatch template runs torchrun under srun); this is the alternative for clusters where jobs are preempted or
outlive their time limit, in the style of official MAE's submitit_pretrain.py. Nothing else in maect needs Slurm.

The job: N nodes x G tasks per node (one task per GPU: task = DDP rank), srun starts them; each task unpickles TrainJob,
sets the environment torchrun would give a worker (task_env), and calls maect.train.main in-process:
  MASTER_ADDR   the allocation's first node: submitit expands SLURM_JOB_NODELIST ('gpu[07-08,12]' -> gpu07, gpu08,
                gpu12) as `scontrol show hostnames $SLURM_JOB_NODELIST | head -1` does; rank 0 runs there
  MASTER_PORT   --port, else 20000 + (job id mod 20000): equal on every task, different for jobs sharing a node
  RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, GROUP_RANK   SLURM_PROCID, SLURM_LOCALID, SLURM_NTASKS, ..., SLURM_NODEID
Requeue: sbatch gets --signal=USR2@<--signal-delay> (a warning that many seconds before the time limit) and --requeue.
On that signal, and on the one Slurm sends a preempted job, submitit calls TrainJob.checkpoint on global rank 0: it
returns a resubmission of the same command with resume=auto, which submitit stores and requeues (`scontrol requeue`:
same job id, same log files, appended). Time-outs are requeued at most --max-timeouts times; preemptions always.
maect's own handler only records the signal (maect.preempt): at the next step boundary every rank agrees (an all-reduce
of the flag every signal_every steps), the stage's checkpoint is written (atomically: a kill never corrupts one), and
only then, outside any signal handler, submitit's requeue path runs. resume=auto continues each stage from its latest
checkpoint and skips finished stages, so a requeued job redoes nothing. The first submission carries resume=auto too, so a requeue
Slurm does on its own (a node failure) also continues instead of starting over; an out_dir that already holds
checkpoints of the same config is therefore continued, and one with another config is refused with the differing keys.

--cluster local runs the same job on this machine (submitit's LocalExecutor: one node, tasks as subprocesses, the same
signal and requeue path), --cluster debug in this process; --dry-run prints the training command, the executor's
parameters and the sbatch script, and submits nothing.
"""
from __future__ import annotations

import argparse
import os
import sys

from maect import config as C
from maect.validation import load_config

RESUME = "resume=auto"
ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def with_resume(train_args: list[str]) -> list[str]:
    """train_args with any resume=... replaced by resume=auto (appended last, so it wins over a preset)."""
    return [a for a in train_args if not a.startswith("resume=")] + [RESUME]


def default_port(job_id: str) -> int:
    """20000 + (job id mod 20000): the same on every task of a job (also after a requeue: the id is kept), and jobs
    sharing a node get different ports unless their ids are 20000 apart. Array jobs ('123_4') use the numeric part."""
    digits = "".join(ch for ch in str(job_id) if ch.isdigit()) or "0"
    return 20000 + int(digits) % 20000


def task_env(job_env, port: int | None = None) -> dict[str, str]:
    """The torchrun-style environment of one task (a DDP rank), from submitit's JobEnvironment (or anything with its
    attributes: hostnames, raw_job_id, global_rank, local_rank, num_tasks, num_nodes, node). MASTER_ADDR is the
    allocation's first node."""
    hosts = list(job_env.hostnames)
    if not hosts:
        raise RuntimeError("the job's node list is empty (SLURM_JOB_NODELIST unset?)")
    return {"MASTER_ADDR": hosts[0], "MASTER_PORT": str(port or default_port(job_env.raw_job_id)),
            "RANK": str(job_env.global_rank), "LOCAL_RANK": str(job_env.local_rank),
            "WORLD_SIZE": str(job_env.num_tasks), "LOCAL_WORLD_SIZE": str(job_env.num_tasks // job_env.num_nodes),
            "GROUP_RANK": str(job_env.node)}


class TrainJob:
    """What submitit pickles and every task runs: one DDP rank of `maect.train TRAIN_ARGS`. checkpoint() is
    submitit's requeue hook (called on global rank 0 when the job is signalled before a time-out or preemption)."""

    def __init__(self, train_args: list[str], port: int | None = None):
        self.train_args, self.port = list(train_args), port

    def __call__(self) -> None:
        import signal
        import submitit
        from maect import preempt, train
        env = task_env(submitit.JobEnvironment(), self.port)
        os.environ.update(env)
        print(f"maect.launch task (pid {os.getpid()}): " + " ".join(f"{k}={env[k]}" for k in ENV_KEYS), flush=True)
        # submitit's checkpoint-and-requeue handler, replaced by maect's (which only records the signal) in
        # train.run; it runs below, outside any signal handler, once the loop has written its checkpoint
        requeue = signal.getsignal(preempt.SIGNALS[0])
        try:
            train.main(self.train_args, exit_on_stop=False)
        except preempt.Preempted as e:
            if callable(requeue):   # rank 0: checkpoint() -> the resubmission stored, the job requeued, exit
                requeue(e.signum, None)
            sys.exit(preempt.REQUEUE_EXIT)    # the other ranks (submitit's handler returns there)

    def checkpoint(self, *args, **kwargs):
        """The resubmission submitit requeues: the same command with resume=auto (training state lives in the
        checkpoints maect writes by itself, not in this object)."""
        import submitit
        return submitit.helpers.DelayedSubmission(TrainJob(with_resume(self.train_args), self.port))


def slurm_parameters(a: argparse.Namespace) -> dict:
    """SlurmExecutor parameters (sbatch option names) for the job."""
    p = dict(job_name=a.job_name, nodes=a.nodes, ntasks_per_node=a.tasks_per_node, gpus_per_node=a.gpus_per_node,
             cpus_per_task=a.cpus_per_task, time=a.time, signal_delay_s=a.signal_delay,
             additional_parameters={"requeue": True})
    for key in ("partition", "account", "qos", "constraint"):
        if getattr(a, key):
            p[key] = getattr(a, key)
    if a.mem_gb:
        p["mem"] = f"{a.mem_gb}GB"
    if a.setup:
        p["setup"] = list(a.setup)
    return p


def local_parameters(a: argparse.Namespace) -> dict:
    """LocalExecutor parameters: one node, the same tasks, time-out and signal delay."""
    return dict(tasks_per_node=a.tasks_per_node, gpus_per_node=a.gpus_per_node, timeout_min=a.time,
                signal_delay_s=a.signal_delay)


def make_executor(a: argparse.Namespace, folder: str):
    try:
        import submitit
    except ImportError:
        raise RuntimeError("maect.launch needs submitit: pip install 'maect[slurm]' (or pip install submitit)") from None
    if a.cluster == "debug":
        return submitit.DebugExecutor(folder)
    if a.cluster == "local":
        ex = submitit.LocalExecutor(folder, max_num_timeout=a.max_timeouts)
        ex.update_parameters(**local_parameters(a))
        return ex
    try:
        ex = submitit.SlurmExecutor(folder, max_num_timeout=a.max_timeouts)
    except RuntimeError as exc:   # no srun on this machine
        raise RuntimeError(f"{exc} --cluster local runs the job on this machine; --dry-run prints it") from None
    ex.update_parameters(**slurm_parameters(a))
    return ex


def sbatch_script(a: argparse.Namespace, folder: str) -> str:
    """The sbatch file submitit writes for this job (its own generator; the command line is what SlurmExecutor
    runs in every task)."""
    from submitit.slurm.slurm import _make_sbatch_string   # submitit's generator, so the dry run shows the real file
    cmd = f"{sys.executable} -u -m submitit.core._submit {folder}"
    return _make_sbatch_string(command=cmd, folder=folder, **slurm_parameters(a))


def check_world(cfg: C.Config, world: int) -> None:
    """The global batch sizes of the stages this run trains must split over the ranks (the same check train does,
    here before anything waits in a queue)."""
    from maect.train import per_rank
    stages = {"pipeline": ("mae", "head", "ct"), "ct_pipeline": ("head", "ct")}.get(cfg.stage, (cfg.stage,))
    for s in stages:
        per_rank(getattr(cfg, s).batch_size, world, f"{s}.batch_size", cfg.mae.accum_steps if s == "mae" else 1)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv and not any(x in ("-h", "--help") for x in argv):
        raise SystemExit("maect.launch: put the training arguments after --, e.g. "
                         "python -m maect.launch --nodes 2 --gpus-per-node 8 --time 240 -- preset=vit_b16 out_dir=runs/b16")
    i = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(prog="python -m maect.launch", description=__doc__.split("\n\n")[1])
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (0 on CPU nodes)")
    p.add_argument("--tasks-per-node", type=int, default=None, help="ranks per node (default: --gpus-per-node, or 1)")
    p.add_argument("--partition", default=None)
    p.add_argument("--time", type=int, default=60, help="time limit of one run of the job, minutes")
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--constraint", default=None)
    p.add_argument("--cpus-per-task", type=int, default=10, help="CPU cores per rank (data loading)")
    p.add_argument("--mem-gb", type=int, default=None, help="memory per node, GB (default: the partition's)")
    p.add_argument("--setup", action="append", default=[], help="shell line run before srun (module load ...)")
    p.add_argument("--job-name", default="maect")
    p.add_argument("--job-dir", default="runs/slurm/%j", help="submitit's folder: pickles and logs (%%j: job id)")
    p.add_argument("--port", type=int, default=None, help="MASTER_PORT (default: 20000 + job id mod 20000)")
    p.add_argument("--signal-delay", type=int, default=120, help="seconds between the warning signal and the kill")
    p.add_argument("--max-timeouts", type=int, default=3, help="how often a timed-out job is requeued")
    p.add_argument("--cluster", default="slurm", choices=("slurm", "local", "debug"))
    p.add_argument("--dry-run", action="store_true", help="print the job, submit nothing")
    a = p.parse_args(argv[:i])
    a.tasks_per_node = a.tasks_per_node or max(1, a.gpus_per_node)
    for key in ("nodes", "time", "cpus_per_task", "signal_delay"):
        if getattr(a, key) < 1:
            p.error(f"--{key.replace('_', '-')} must be >= 1, got {getattr(a, key)}")
    if a.cluster != "slurm" and a.nodes != 1:
        p.error(f"--cluster {a.cluster} runs on this machine only: --nodes must be 1, got {a.nodes}")
    return a, argv[i + 1:]


def main(argv: list[str] | None = None):
    a, train_args = parse_args(sys.argv[1:] if argv is None else argv)
    train_args = with_resume(train_args)
    try:
        cfg = load_config(train_args)              # bad keys fail here, not after hours in the queue
        check_world(cfg, a.nodes * a.tasks_per_node)
    except C.ConfigError as e:
        sys.exit(f"maect.launch: {e}")
    folder = os.path.abspath(a.job_dir)
    world = a.nodes * a.tasks_per_node
    print(f"maect.launch: {a.nodes} node(s) x {a.tasks_per_node} task(s) = {world} ranks, {a.time} min per run, "
          f"requeued on preemption / time-out with resume=auto\n  train: python -m maect.train {' '.join(train_args)}")
    if a.dry_run:
        params = slurm_parameters(a) if a.cluster == "slurm" else local_parameters(a)
        print(f"  executor ({a.cluster}): {params}\n  job folder: {folder}\n  each task: MASTER_ADDR = first node of "
              f"SLURM_JOB_NODELIST, MASTER_PORT = {a.port or '20000 + job id mod 20000'}, RANK = SLURM_PROCID, "
              f"LOCAL_RANK = SLURM_LOCALID, WORLD_SIZE = {world}")
        if a.cluster == "slurm":
            print("---- sbatch script (submitit writes it) ----\n" + sbatch_script(a, folder))
        return None
    try:
        job = make_executor(a, folder).submit(TrainJob(train_args, a.port))
    except RuntimeError as e:
        sys.exit(f"maect.launch: {e}")
    print(f"submitted job {job.job_id}; logs: {folder.replace('%j', str(job.job_id))}/{job.job_id}_<task>_log.out")
    return job


if __name__ == "__main__":
    main()
